"""Models with random weights for the tests: any family's architecture at full size from the pack's shipped
configs (what ComfyUI recognises as SD 1.x, 2.x or SDXL), or a "mini" SDXL: SDXL's exact block layout (three levels,
two layers a level, 1/2/10 transformer blocks, the text_time embedding, two text encoders, a four-level VAE) at
narrow widths, for the key maps and diffusers' kohya-SDXL conversion, which depend on the layout's names and not on
its widths."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
SDXL = PACK / "configs" / "sdxl"
#: the toy's tokenizer (a CLIP tokenizer with its own small vocabulary): the mini model's text encoders use it
TOY_TOKENIZER = PACK / "trainers" / "toy" / "weights" / "pipeline" / "tokenizer"

#: narrow widths; the cross-attention stays 2048 wide, SDXL's, so the family is recognised from the weights
MINI_UNET = {"block_out_channels": [32, 64, 64], "attention_head_dim": [1, 2, 2], "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 8}
MINI_VAE = {"block_out_channels": [32, 32, 64, 64], "sample_size": 64}
MINI_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
             "projection_dim": 32}
MINI_TEXT_2 = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2, "num_hidden_layers": 2,
               "projection_dim": 32}


def mini_sdxl_config(folder: Path) -> Path:
    """A copy of configs/sdxl with the mini widths (the toy tokenizer's vocabulary size)."""
    from transformers import CLIPTokenizer

    shutil.copytree(SDXL, folder)
    vocab = len(CLIPTokenizer.from_pretrained(str(TOY_TOKENIZER)))
    for sub, change in (("unet", MINI_UNET), ("vae", MINI_VAE), ("text_encoder", {**MINI_TEXT, "vocab_size": vocab}),
                        ("text_encoder_2", {**MINI_TEXT_2, "vocab_size": vocab})):
        path = folder / sub / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}, indent=1))
    return folder


def random_model(family: str, tokenizer_dir: Path, config: Path | None = None, dtype=None, seed: int = 0):
    """An FTModel of ``family``'s architecture with random weights, from ``config`` (a folder in the layout of
    configs/<family>, which it defaults to), its tokenizers from ``tokenizer_dir``'s vocab.json and merges.txt with
    each config's padding; each part is cast to ``dtype`` as soon as it is built, so a full SDXL (2.6 B UNet weights)
    peaks at its UNet in fp32."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from comfyui_finetune.trainers.families.registry import FAMILIES
    from comfyui_finetune.trainers.model.model import FTModel

    config = Path(config) if config else FAMILIES[family].config_dir
    second = (config / "text_encoder_2").is_dir()  # SDXL's OpenCLIP bigG, with its projection

    def cast(m):
        return (m.to(dtype) if dtype is not None else m).eval()

    torch.manual_seed(seed)
    with torch.inference_mode(False):
        unet = cast(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config / "unet"))))
        vae = cast(AutoencoderKL.from_config(AutoencoderKL.load_config(str(config / "vae"))))
        te = cast(CLIPTextModel(CLIPTextConfig.from_pretrained(str(config / "text_encoder"))))
        te2 = cast(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(config / "text_encoder_2")))
                   ) if second else None

    def tokenizer(sub):
        pad = json.loads((config / sub / "tokenizer_config.json").read_text())["pad_token"]
        return CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                             model_max_length=77, pad_token=pad)

    sched = DDIMScheduler.from_pretrained(str(config / "scheduler"))
    model = FTModel(family, f"random-{family}", unet, vae, te, tokenizer("tokenizer"), dict(sched.config),
                    text_encoder_2=te2, tokenizer_2=tokenizer("tokenizer_2") if second else None)
    if dtype is not None:
        model.dtype = dtype
    return model
