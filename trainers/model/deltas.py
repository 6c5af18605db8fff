"""Weights shared with the base model, and adapters applied live on top of them.

ComfyUI caches every node's output, so a node never changes the model it receives; but a full copy of an SD 1.5
model is ~4 GB in fp32 (SDXL: ~10 GB), so the pack never makes one either. :func:`share` gives a module whose
every parameter and buffer *is* the base's tensor (new ``Parameter`` objects over the same storage, so
``requires_grad`` and ``.to()`` stay private to the copy), and adapters are applied live as
``torch.nn.utils.parametrize`` parametrizations (``weight = original + strength * delta``), recomputed when the
layer runs (once per sampling run under :func:`cached`), as ComfyUI's ModelPatcher patches and restores instead of
merging into a copy. Anything that trains its base weights takes a plain copy of just those parts first
(:func:`materialize`), and files are written from :func:`plain_state_dict`, whose names and values are those of the
merged weights.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch.nn.utils import parametrize


def share(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the very tensors of ``module`` (no weight is
    copied). Changing flags, devices or dtypes of the copy leaves ``module`` alone; changing values in place would
    not: train only what :func:`materialize` copied, or what an adapter adds."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.data, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b
    return _own_classes(copy.deepcopy(module, memo))


def _own_classes(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy keeps the class torch made for each parametrized layer, shared with the original: adding or
    removing a parametrization changes that class, so each copy gets its own."""
    for m in module.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, body)
    return module


def materialize(module: torch.nn.Module) -> torch.nn.Module:
    """A plain copy with its own weights, live adapters merged in: what a full fine-tune trains, or a file is
    written from when every value must be its own."""
    out = _own_classes(copy.deepcopy(module))
    for m in list(out.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return out


def has_deltas(module: torch.nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in module.modules())


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as if every live adapter were merged: the same key names as the plain module, the
    merged values (computed per layer, without copying the rest)."""
    if not has_deltas(module):
        return module.state_dict()
    out = {}
    for k, v in module.state_dict().items():
        if ".parametrizations." not in f".{k}":
            out[k] = v
    with torch.no_grad():
        for path, m in module.named_modules():
            if parametrize.is_parametrized(m):
                for name in m.parametrizations:
                    out[f"{path}.{name}" if path else name] = getattr(m, name).detach()
    return out


def delta_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors of the live adapters (for fingerprints: two different LoRAs on one base are two models)."""
    return [(n, b) for n, b in module.named_buffers() if ".parametrizations." in f".{n}"]


@contextlib.contextmanager
def cached():
    """Compute each live-adapted weight once for the whole block (sampling), instead of at every forward."""
    with parametrize.cached():
        yield


class LowRankDelta(torch.nn.Module):
    """``weight + scale * up @ down``: a LoRA applied live (linear, or conv with a kernel-sized ``down``)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("down", down.detach().float().contiguous())
        self.register_buffer("up", up.detach().float().contiguous())
        self.scale = float(scale)

    def delta(self) -> torch.Tensor:
        down, up = self.down, self.up
        if down.ndim == 2:
            return up.flatten(1) @ down
        # conv: down (r, in, kh, kw), up (out, r, 1, 1)
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        d = self.delta()
        return weight + (d.reshape(weight.shape) * self.scale).to(weight.dtype)


def attach(module: torch.nn.Module, delta: torch.nn.Module, name: str = "weight") -> None:
    """Apply ``delta`` (a parametrization such as :class:`LowRankDelta`) to ``module.<name>`` live; several stack."""
    w = getattr(module, name)
    delta.to(w.device)
    parametrize.register_parametrization(module, name, delta)


class HadamardDelta(LowRankDelta):
    """LoHa (LyCORIS): ``weight + scale * (w1_a @ w1_b) * (w2_a @ w2_b)``, the product taken element by element."""

    def __init__(self, w1_a, w1_b, w2_a, w2_b, scale: float):
        torch.nn.Module.__init__(self)
        for name, t in (("w1_a", w1_a), ("w1_b", w1_b), ("w2_a", w2_a), ("w2_b", w2_b)):
            self.register_buffer(name, t.detach().float().contiguous())
        self.scale = float(scale)

    def delta(self) -> torch.Tensor:
        return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)


class KroneckerDelta(LowRankDelta):
    """LoKr (LyCORIS): ``weight + scale * kron(w1, w2)``, each factor whole or as a low-rank pair."""

    def __init__(self, w1, w2, scale: float):
        torch.nn.Module.__init__(self)
        for name, t in (("w1", w1), ("w2", w2)):
            if isinstance(t, tuple):
                self.register_buffer(f"{name}_a", t[0].detach().float().contiguous())
                self.register_buffer(f"{name}_b", t[1].detach().float().contiguous())
            else:
                self.register_buffer(name, t.detach().float().contiguous())
        self.scale = float(scale)

    def _factor(self, name: str) -> torch.Tensor:
        whole = getattr(self, name, None)
        return whole if whole is not None else getattr(self, f"{name}_a") @ getattr(self, f"{name}_b")

    def delta(self) -> torch.Tensor:
        w1, w2 = self._factor("w1"), self._factor("w2")
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)


def input_norm(w: torch.Tensor) -> torch.Tensor:
    """The norm of each input channel of weight ``w`` (out, in, ...), shaped (1, in, 1...) like a ``dora_scale``."""
    cols = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
    return cols.reshape(w.shape[1], *[1] * (w.ndim - 1)).transpose(0, 1)


class DecomposedDelta(torch.nn.Module):
    """DoRA: ``inner`` (a LoRA, LoHa or LoKr at strength 1) merged, then rescaled by ``dora_scale`` over its norm,
    as ComfyUI's ``weight_decompose`` computes it: an input-axis ``dora_scale`` (1, in, ...) divides by each input
    channel's norm of the merged weight (as A1111, Forge and LyCORIS do too); an output-axis one (out, 1, ...) by
    each output row's norm of the weight before the change. ``strength`` then moves from the weight to that result."""

    def __init__(self, inner: LowRankDelta, dora_scale: torch.Tensor, strength: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("dora_scale", dora_scale.detach().float().contiguous())
        self.strength = float(strength)

    def delta(self) -> torch.Tensor:
        return self.inner.delta()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()  # ComfyUI patches in float32, whatever the model's dtype
        merged = w + self.inner.delta().reshape(weight.shape) * self.inner.scale
        m = self.dora_scale
        m = m.reshape(m.shape[:2] if m.ndim > 1 else (-1, 1))
        m = m.reshape(*m.shape, *[1] * (w.ndim - 2))
        if m.shape[0] == w.shape[0]:  # output axis: the norm of the weight before the change
            norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.ndim - 1))
        else:
            norm = input_norm(merged)
        out = merged * (m / (norm + torch.finfo(torch.float32).eps))
        if self.strength != 1.0:
            out = w + self.strength * (out - w)
        return out.to(weight.dtype)
