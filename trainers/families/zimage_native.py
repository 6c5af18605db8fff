"""ComfyUI's native layout of a Z-Image transformer (the NextDiT single file its UNETLoader reads from
``models/diffusion_models``, and the layout Z-Image's own releases ship), to and from diffusers' names.

The two differ by names and one fusion (the published facts: ComfyUI's ``comfy.utils.z_image_to_diffusers`` and
diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``): each block's ``attention.to_q / to_k / to_v``
are one ``attention.qkv`` (rows q, k, v), ``to_out.0`` is ``out``, ``norm_q / norm_k`` are ``q_norm / k_norm``, and
the patch size's ``all_x_embedder.2-1`` / ``all_final_layer.2-1`` are ``x_embedder`` / ``final_layer``. ComfyUI
0.8 reads only this layout for Z-Image (it converts no diffusers-layout Z-Image), so the pack writes it.
"""
from __future__ import annotations

import torch

#: diffusers' name pieces -> native ones (applied in this order; the patch-size keys are at the start of a name)
RENAMES = ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
           (".attention.norm_k.", ".attention.k_norm."))
HEADS = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."))
QKV = ("to_q", "to_k", "to_v")


def native_name(key: str) -> str:
    """The native name of a diffusers Z-Image weight (not for to_q / to_k / to_v, which are fused)."""
    for a, b in HEADS:
        if key.startswith(a):
            return b + key[len(a):]
    for a, b in RENAMES:
        key = key.replace(a, b)
    return key


def diffusers_name(key: str) -> str:
    for a, b in HEADS:
        if key.startswith(b):
            return a + key[len(b):]
    for a, b in RENAMES:
        key = key.replace(b, a)
    return key


def to_native(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers ``ZImageTransformer2DModel`` state dict in ComfyUI's native layout, under ``prefix`` (a whole
    checkpoint's ``model.diffusion_model.``; none for UNETLoader's files)."""
    out: dict[str, torch.Tensor] = {}
    fused = {k.rsplit(".attention.", 1)[0] for k in state if ".attention.to_q." in k}
    for block in sorted(fused):
        for end in ("weight", "bias"):
            parts = [state.get(f"{block}.attention.{x}.{end}") for x in QKV]
            if all(p is not None for p in parts):
                out[f"{prefix}{block}.attention.qkv.{end}"] = torch.cat(parts, dim=0)
    for k, v in state.items():
        if not any(f".attention.{x}." in k for x in QKV):
            out[prefix + native_name(k)] = v
    return out


def from_native(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A native-layout Z-Image state dict (under ``prefix``) in diffusers' names: the inverse of
    :func:`to_native` (ComfyUI's unused ``norm_final`` dropped, as diffusers' converter drops it)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k == "norm_final.weight":
            continue
        if ".attention.qkv." in k:
            block, end = k.split(".attention.qkv.")
            for x, part in zip(QKV, torch.chunk(v, 3, dim=0)):
                out[f"{block}.attention.{x}.{end}"] = part
        else:
            out[diffusers_name(k)] = v
    return out
