"""Adapters on any torch module through peft's own API — never through diffusers' or transformers' wrappers.

``ModelMixin.add_adapter`` (diffusers) and ``PreTrainedModel.add_adapter`` (transformers) are thin layers over
peft that each library gates on its own idea of the right peft version: transformers 5.24 refuses every peft
below 0.22, which the registry does not have, so training a text-encoder LoRA broke with no change on our side.
peft's model-agnostic functions (``inject_adapter_in_model``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict`` and the ``BaseTunerLayer`` layers they create) work on a UNet and a text encoder
alike, in every peft the pack declares, so the pack uses only those. ``tests/test_adapters.py`` fails if a
module of the pack calls a wrapper again.
"""
from __future__ import annotations

import torch


def inject(module: torch.nn.Module, config, name: str) -> None:
    """Put adapter ``name`` (a peft config such as ``LoraConfig``) on ``module`` in place.

    peft marks every base parameter as frozen while injecting; the flags are restored by :func:`remove`."""
    from peft import inject_adapter_in_model

    if not hasattr(module, "_ft_requires_grad"):
        module._ft_requires_grad = {n: p.requires_grad for n, p in module.named_parameters()}
    inject_adapter_in_model(config, module, adapter_name=name)


def state(module: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors, with peft's adapter-free key names (``...lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=name)


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Load tensors from :func:`state` into adapter ``name``; a tensor the adapter does not have is an error."""
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(module, tensors, adapter_name=name)
    unexpected = list(getattr(res, "unexpected_keys", None) or [])
    if unexpected:
        raise ValueError(f"checkpoint does not match this adapter setup: unexpected {unexpected[:3]}")


def parameters(module: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The trainable tensors of adapter ``name``, in a stable order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for _, layer in _tuner_layers(module, BaseTunerLayer):
        for attr in layer.adapter_layer_names:
            store = getattr(layer, attr, None)
            if isinstance(store, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and name in store:
                item = store[name]
                out.extend(item.parameters() if isinstance(item, torch.nn.Module) else [item])
    return out


def remove(module: torch.nn.Module, merge: bool = False) -> None:
    """Take every adapter layer out of ``module``, leaving its original layers (and their ``requires_grad``) as
    before :func:`inject`; with ``merge``, the active adapters are first added into the original weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, layer in _tuner_layers(module, BaseTunerLayer):
        if merge:
            layer.merge()
        parent, _, child = path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    flags = module.__dict__.pop("_ft_requires_grad", None)
    if flags is not None:
        for n, p in module.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))


def has_adapters(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def tuner_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost peft layers of ``module`` with their paths."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return _tuner_layers(module, BaseTunerLayer)


def _tuner_layers(module: torch.nn.Module, cls) -> list[tuple[str, torch.nn.Module]]:
    """The outermost peft layers of ``module`` with their paths (a layer's own ``base_layer`` is not listed)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for path, m in module.named_modules():
        if isinstance(m, cls) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, m))
    return found
