"""DoRA (weight-decomposed LoRA) with its magnitude on the *input* axis: the layout every SD tool applies alike.

DoRA writes an adapted weight as a direction times a learned magnitude: ``W' = m * (W + dW) / ||W + dW||``, with
``dW`` a LoRA. Which norm is taken decides whether a file draws the same everywhere:

- input axis, ``m`` of shape ``(1, in)`` (``(1, in, 1, 1)`` for a convolution), one norm per input channel over
  the merged weight: what LyCORIS saves by default (``dora_wd``) and what ComfyUI's ``weight_decompose``, A1111's
  and Forge's ``apply_weight_decompose`` and LyCORIS all compute the same way;
- output axis, ``m`` of shape ``(out, 1)``: peft's ``use_dora``. ComfyUI and Forge normalise it by the *original*
  weight's norm, LyCORIS by the merged one, and A1111 reads only the input axis, so such a file draws differently
  from tool to tool.

The pack therefore trains the input-axis kind itself, on top of peft's own LoRA layers: each adapted layer gets a
magnitude parameter, and a forward pre-hook scales the layer's input by ``m / ||W + dW||`` per input channel, which
for a linear or convolution layer is the same as scaling the merged weight's columns. As in the DoRA paper (and
peft), the norm is treated as a constant in the backward pass. Files carry the magnitudes as ``<module>.dora_scale``
beside the LoRA's ``lora_down`` / ``lora_up`` / ``alpha``; :class:`.deltas.DecomposedDelta` applies them.
"""
from __future__ import annotations

import functools

import torch

from . import tuners as adapters
from ..model.deltas import input_norm

#: the magnitude's attribute on a peft LoRA layer, and its name in a file (``<kohya module>.dora_scale``)
ATTR = "ft_dora_scale"
SUFFIX = "dora_scale"


def _scale_input(adapter: str, layer: torch.nn.Module, args: tuple) -> tuple:
    with torch.no_grad():
        merged = layer.get_base_layer().weight.float() + layer.get_delta_weight(adapter).float()
        norm = input_norm(merged) + torch.finfo(torch.float32).eps
    s = getattr(layer, ATTR) / norm
    x = args[0]
    return (x * s.to(x.dtype),) + tuple(args[1:])


class Magnitudes:
    """The DoRA magnitudes on every peft LoRA layer of a module: trainable parameters, saved and loaded by path."""

    def __init__(self, module: torch.nn.Module, adapter: str):
        self.layers: dict[str, torch.nn.Module] = {}
        self.handles = []
        for path, layer in adapters.tuner_layers(module):
            if adapter not in getattr(layer, "lora_A", {}):
                continue
            w = layer.get_base_layer().weight
            if w.ndim not in (2, 4):
                raise ValueError(f"DoRA: layer {path} has a {w.ndim}-d weight; only linear and 2-d convolution "
                                 "layers can be decomposed (choose adapter lora for these targets)")
            layer.register_parameter(ATTR, torch.nn.Parameter(input_norm(w.detach().float())))
            self.handles.append(layer.register_forward_pre_hook(functools.partial(_scale_input, adapter)))
            self.layers[path] = layer

    def parameters(self) -> list[torch.nn.Parameter]:
        return [getattr(layer, ATTR) for layer in self.layers.values()]

    def state(self) -> dict[str, torch.Tensor]:
        """``<layer path>.dora_scale`` -> magnitude."""
        return {f"{path}.{SUFFIX}": getattr(layer, ATTR) for path, layer in self.layers.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        want = set(self.state())
        if set(tensors) != want:
            missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
            raise ValueError(f"checkpoint does not match this DoRA setup: missing {missing[:3]}, unexpected "
                             f"{extra[:3]}")
        with torch.no_grad():
            for path, layer in self.layers.items():
                getattr(layer, ATTR).copy_(tensors[f"{path}.{SUFFIX}"])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for layer in self.layers.values():
            delattr(layer, ATTR)
        self.handles, self.layers = [], {}
