"""The original (LDM) single-file layout of the Stable Diffusion lineage: the key maps from diffusers' module names.

The mapping is a published fact of the two layouts (UNet ``input_blocks``/``middle_block``/``output_blocks``, SDXL's
pooled-text and time-id embedding ``label_emb``, VAE ``encoder.down.N.block``, CLIP and OpenCLIP text encoders
under the prefixes each family's ``text_encoder_files`` gives: ``cond_stage_model.*``, SDXL's
``conditioner.embedders.0/1.*``). Full-model files (:mod:`...model.checkpoint`), ControlNet files and SDXL's LoRA
names use it.
"""
from __future__ import annotations

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    for k, v in RESNET.items():
        if rest.startswith(k + "."):
            return v + rest[len(k):]
    raise KeyError(rest)


def unet_key(k: str, layers_per_block: int, up_attn: list[bool]) -> str:
    """diffusers UNet2DConditionModel key -> original ``model.diffusion_model.*`` key."""
    n = layers_per_block + 1
    p = k.split(".")
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    two = p[0] in ("time_embedding", "add_embedding")
    head = ".".join(p[:2]) if two else p[0]
    if head in simple:
        return simple[head] + "." + ".".join(p[2 if two else 1:])
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            return f"input_blocks.{n * i + int(p[3]) + 1}.0.{_resnet('.'.join(p[4:]))}"
        if p[2] == "attentions":
            return f"input_blocks.{n * i + int(p[3]) + 1}.1.{'.'.join(p[4:])}"
        if p[2] == "downsamplers":
            return f"input_blocks.{n * (i + 1)}.0.op.{'.'.join(p[5:])}"
    if p[0] == "mid_block":
        if p[1] == "attentions":
            return f"middle_block.1.{'.'.join(p[3:])}"
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}.{_resnet('.'.join(p[3:]))}"
    if p[0] == "up_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            return f"output_blocks.{n * i + int(p[3])}.0.{_resnet('.'.join(p[4:]))}"
        if p[2] == "attentions":
            return f"output_blocks.{n * i + int(p[3])}.1.{'.'.join(p[4:])}"
        if p[2] == "upsamplers":
            return f"output_blocks.{n * i + n - 1}.{2 if up_attn[i] else 1}.conv.{'.'.join(p[5:])}"
    raise KeyError(f"no original-layout name for UNet weight {k}")


def vae_key(k: str, num_up: int) -> str:
    p = k.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return k
    side, rest = p[0], p[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return f"{side}.{'.'.join(rest)}"
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out.{'.'.join(rest[1:])}"
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:]).replace('conv_shortcut', 'nin_shortcut')}"
        inner = ".".join(rest[3:])
        for a, b in VAE_ATTN.items():
            if inner.startswith(a + "."):
                return f"{side}.mid.attn_1.{b}{inner[len(a):]}"
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1]) if rest[0] == "down_blocks" else num_up - 1 - int(rest[1])
        level = "down" if rest[0] == "down_blocks" else "up"
        if rest[2] == "resnets":
            return f"{side}.{level}.{i}.block.{rest[3]}.{'.'.join(rest[4:]).replace('conv_shortcut', 'nin_shortcut')}"
        if rest[2] in ("downsamplers", "upsamplers"):
            return f"{side}.{level}.{i}.{'downsample' if level == 'down' else 'upsample'}.conv.{'.'.join(rest[5:])}"
    raise KeyError(f"no original-layout name for VAE weight {k}")


OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def open_clip_text_encoder(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict in OpenCLIP's layout under ``prefix`` (q/k/v fused
    into ``in_proj``, the projection as OpenCLIP's ``text_projection`` matrix, the transpose of transformers').
    SD 2.x: diffusers keeps 23 of OpenCLIP-H's 24 layers (SD 2.x reads the penultimate one), so the 24th layer and
    the projection are absent, as in every diffusers-to-original conversion; SDXL's OpenCLIP-bigG has all 32 and
    its projection (the pooled embedding)."""
    sd = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
          for k, v in state.items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight")}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").t()
    for k in [k for k in sd if k.startswith("text_model.final_layer_norm.")]:
        out["ln_final." + k.rsplit(".", 1)[1]] = sd.pop(k)
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        pre = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{pre}self_attn.{x}_proj.{kind}") for x in "qkv"])
        for k in [k for k in sd if k.startswith(pre)]:
            rest = k[len(pre):]
            name = next(b + rest[len(a):] for a, b in OPEN_CLIP.items() if rest.startswith(a + "."))
            out[f"transformer.resblocks.{i}.{name}"] = sd.pop(k)
    if sd:
        raise KeyError(f"text-encoder weights without an OpenCLIP name: {sorted(sd)[:3]}")
    return {prefix + k: v for k, v in out.items()}


def clip_text_encoder(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict under ``prefix`` with transformers' own names (``text_model.*``)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


TEXT_ENCODER_LAYOUTS = {"clip": clip_text_encoder, "open_clip": open_clip_text_encoder}
