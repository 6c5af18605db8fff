"""Z-Image from the three files ComfyUI users hold it as: the transformer in ``models/diffusion_models`` (ComfyUI's
native layout, what its UNETLoader reads), the Qwen3 text encoder in ``models/text_encoders`` (CLIPLoader's), and the
Flux VAE in ``models/vae`` (VAELoader's). Each part's shape is read from its weights, as ComfyUI does (the depth of a
shallow test transformer, the width of a toy's), with the rest from the shipped configs/zimage; only safetensors are
read, and nothing is downloaded: the tokenizer is ComfyUI's own Qwen vocabulary (``comfy/text_encoders/
qwen25_tokenizer``, which ComfyUI reads Z-Image's prompts with)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..families.registry import FAMILIES
from ..families.zimage import CHECKPOINT
from ..families.zimage_native import from_native
from ..runs.reading import FileTensors, tensors_of
from .loading import resolve_device, resolve_dtype
from .model import FTModel

CONFIG = FAMILIES["zimage"].config_dir
#: where a transformer's and a Qwen3's tensors may sit: UNETLoader's and CLIPLoader's files (none, or the Qwen3's
#: ``model.``), a whole checkpoint (ComfyUI's CheckpointSave: ``model.diffusion_model.``, ``text_encoders.``), a
#: CLIP's own state dict; the longer first (a checkpoint's ``model.diffusion_model.`` starts with ``model.``)
PREFIXES = (CHECKPOINT["transformer"], "diffusion_model.")
TEXT_ENCODER_PREFIXES = (CHECKPOINT["text_encoder"], CHECKPOINT["text_encoder"].removeprefix("text_encoders."),
                         "model.")


def transformer_config(state: dict[str, torch.Tensor]) -> dict:
    """The diffusers config of a Z-Image transformer from its diffusers-named weights: width and caption width from
    the caption embedder, depths counted, heads from the q-norm's width (each head's), the rest Z-Image's."""
    base = json.loads((CONFIG / "transformer" / "config.json").read_text())
    dim, cap = state["cap_embedder.1.weight"].shape
    head = state["layers.0.attention.norm_q.weight"].shape[0]
    count = lambda p: len({k.split(".")[1] for k in state if k.startswith(p + ".")})  # noqa: E731
    base.update(dim=int(dim), cap_feat_dim=int(cap), n_layers=count("layers"), n_refiner_layers=count("noise_refiner"),
                n_heads=int(dim // head), n_kv_heads=int(dim // head),
                in_channels=int(state["all_x_embedder.2-1.weight"].shape[1] // 4))
    if sum(base["axes_dims"]) != head:  # RoPE's three axes share a head: Z-Image's 32 + 48 + 48 of 128, in scale
        side = 3 * head // 8
        base["axes_dims"] = [head - 2 * side, side, side]
    return {k: v for k, v in base.items() if not k.startswith("_")}


def text_encoder_config(state: dict[str, torch.Tensor]) -> dict:
    """A Qwen3 config from its weights (transformers' names, without ``model.``)."""
    base = json.loads((CONFIG / "text_encoder" / "config.json").read_text())
    vocab, hidden = state["embed_tokens.weight"].shape
    head = state["layers.0.self_attn.q_norm.weight"].shape[0]
    base.update(vocab_size=int(vocab), hidden_size=int(hidden), head_dim=int(head),
                num_hidden_layers=len({k.split(".")[1] for k in state if k.startswith("layers.")}),
                num_attention_heads=int(state["layers.0.self_attn.q_proj.weight"].shape[0] // head),
                num_key_value_heads=int(state["layers.0.self_attn.k_proj.weight"].shape[0] // head),
                intermediate_size=int(state["layers.0.mlp.gate_proj.weight"].shape[0]))
    return base


def _prefix(names, prefixes: tuple[str, ...]) -> str:
    """The first of ``prefixes`` that some name starts with ("" if none: the names are a part's own)."""
    return next((p for p in prefixes if any(k.startswith(p) for k in names)), "")


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state


def _stripped(state: dict, prefixes: tuple[str, ...]) -> dict:
    return _strip(state, _prefix(state, prefixes))


def _file(path: Path, what: str) -> FileTensors:
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{what} {path.name}: only .safetensors files are read (a {path.suffix} file is a pickle "
                         "that can run code when opened); convert it to safetensors first")
    return FileTensors(path, what)


def load_zimage_files(transformer: str | Path, text_encoder: str | Path, vae: str | Path,
                      tokenizer_dir: str | Path | None, device: str = "auto", dtype: str = "auto",
                      offload: bool = False) -> FTModel:
    """An FTModel of the Z-Image family from ComfyUI's three files (see the module's text)."""
    from ..runs.reading import header

    transformer, text_encoder, vae = Path(transformer), Path(text_encoder), Path(vae)
    what = f"diffusion model {transformer.name}"
    if transformer.suffix.lower() == ".safetensors":  # its names checked before anything is read
        _check_dit(_stripped(header(transformer, "diffusion model")[0], PREFIXES), what)
    # each file read a group of tensors at a time, copied into its part
    return zimage_from_states(_file(transformer, "diffusion model"), _file(text_encoder, "text encoder"),
                              _file(vae, "VAE"), transformer.stem, tokenizer_dir, device, dtype, offload, what=what)


#: the key that says a single-file checkpoint is a whole Z-Image (ComfyUI's CheckpointSave layout)
CHECKPOINT_KEY = "model.diffusion_model.cap_embedder.1.weight"


def load_zimage_checkpoint(path: str | Path, tokenizer_dir: str | Path | None, device: str = "auto",
                           dtype: str = "auto", offload: bool = False) -> FTModel:
    """A whole Z-Image in one file, as ComfyUI's CheckpointSave writes it (Model to ComfyUI -> Save Checkpoint, and
    the all-in-one Z-Image checkpoints): read a part at a time, so the file is never held whole beside the model."""
    from ..runs.reading import header

    path = Path(path)
    keys = list(header(path, "checkpoint")[0])
    parts = {part: [k for k in keys if k.startswith(prefix)] for part, prefix in CHECKPOINT.items()}
    missing = [part for part, ks in parts.items() if not ks]
    if missing:
        raise ValueError(f"{path.name}: a Z-Image checkpoint holds the transformer, the Qwen3 text encoder and the "
                         f"VAE; this one has no {' and no '.join(missing)} (keys under {CHECKPOINT[missing[0]]!r}): "
                         "load a transformer alone from models/diffusion_models with Load Z-Image and its two other "
                         "files")
    return zimage_from_states(*(FileTensors(path, "checkpoint", keys=ks) for ks in parts.values()), path.stem,
                              tokenizer_dir, device, dtype, offload, what=f"checkpoint {path.name}")


def _dit_names(dit: dict, what: str):
    """What turns a group of a Z-Image transformer's tensors (from the native layout under any of ``PREFIXES``, or
    already in diffusers' names) into diffusers' names, told from all of its names (``dit``)."""
    prefix = _prefix(dit, PREFIXES)
    native = "layers.0.attention.qkv.weight" in _check_dit(_strip(dit, prefix), what)
    return lambda group: from_native(_strip(group, prefix)) if native else _strip(group, prefix)


def _te_names(te: dict):
    """The same for a Qwen3's tensors: transformers' names without ``model.``, its unused lm_head left out."""
    prefix = _prefix(te, TEXT_ENCODER_PREFIXES)
    return lambda group: {k: v for k, v in _strip(group, prefix).items() if k != "lm_head.weight"}


def _fill(module: torch.nn.Module, part, convert, what: str) -> None:
    """Copy a part's tensors (a dict, or a file's read a group at a time) into ``module``, each cast to the
    module's precision as it is copied, as strictly as load_state_dict: every weight once, nothing left over."""
    want, seen = set(module.state_dict()), set()
    for group in tensors_of(part).groups():
        group = convert(group)
        extra = sorted(set(group) - want)
        if extra:
            raise ValueError(f"{what}: {len(extra)} of its tensors fit no weight of the model it should be (e.g. "
                             f"{extra[0]}): it is another model's file")
        module.load_state_dict(group, strict=False)
        seen.update(group)
        del group
    if want - seen:
        raise ValueError(f"{what}: {len(want - seen)} of the model's weights are not in it (e.g. "
                         f"{sorted(want - seen)[0]}): the file is cut short or is another model's")


def _check_dit(names, what: str):
    """``names`` (a transformer's weights or their names, without a prefix), if they are a Z-Image transformer's."""
    if "cap_embedder.1.weight" not in names or not any(
            k in names for k in ("layers.0.attention.qkv.weight", "layers.0.attention.to_q.weight")):
        raise ValueError(f"{what} is not a Z-Image transformer: it has no cap_embedder / layers.0.attention.qkv "
                         "weights (ComfyUI's Z-Image layout)")
    return names


def zimage_from_states(dit, text_encoder, vae, name: str, tokenizer_dir: str | Path | None,
                       device: str = "auto", dtype: str = "auto", offload: bool = False,
                       what: str = "diffusion model") -> FTModel:
    """An FTModel of the Z-Image family from the three parts' tensors as ComfyUI holds them, under any of the
    prefixes above (the transformer in its native layout or diffusers' names, the VAE in either layout): the files
    ComfyUI's loaders read, or one whole checkpoint given three times (CheckpointSave's, or the MODEL, CLIP and VAE
    a ComfyUI graph holds). A part may be a file's tensors (``FileTensors``), read a group at a time as they are
    copied in, so a file is never held whole beside its module. The tensors are copied into the pack's own modules
    (ComfyUI's stay ComfyUI's), one part at a time."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    dit, text_encoder, vae = tensors_of(dit), tensors_of(text_encoder), tensors_of(vae)
    fam = FAMILIES["zimage"]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, fam)
    # each part is built in its precision and its file's tensors copied in a group at a time (cast on the way):
    # Z-Image's transformer built in fp32 first would hold 24.6 GB, the whole file beside it 12.3 GB more
    with torch.inference_mode(False), built_in(dt):
        convert = _dit_names(dit.meta(), what)  # names and shapes, nothing read from a file yet
        dit_model = ZImageTransformer2DModel.from_config(transformer_config(convert(dit.meta())))
        _fill(dit_model, dit, convert, what)
        convert = _te_names(text_encoder.meta())
        te = Qwen3Model(Qwen3Config(**text_encoder_config(convert(text_encoder.meta()))))
        _fill(te, text_encoder, convert, "text encoder")
    with torch.inference_mode(False):
        vae_model = _vae(vae.whole(), dt)
    sched = json.loads((CONFIG / "scheduler" / "scheduler_config.json").read_text())
    model = FTModel(fam, name, dit_model.eval(), vae_model.eval(), te.eval(), _tokenizer(tokenizer_dir), sched)
    model.prediction_source = "flow matching (Z-Image)"
    if "turbo" in name.lower():  # Base and Turbo have the same keys and shapes: only the name tells them apart
        model.prediction_source = ("flow matching; Z-Image Turbo by its name: it draws in 8 steps at cfg 1, and "
                                   "LoRAs are trained on Base and applied to it")
        model.sample_cfg = 1.0  # cfg 0 (auto) draws it unguided, as it was distilled to
    return model.to(dev, dt, offload=offload)


@contextlib.contextmanager
def built_in(dtype: torch.dtype):
    """Modules made inside are made in ``dtype`` (torch's default dtype for the block); Z-Image's rotary tables and
    Qwen3's are computed in their own explicit precision."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _vae(state: dict[str, torch.Tensor], dt: torch.dtype):
    """The Flux VAE from its original layout (``encoder.down.0.block...``, as Black Forest Labs ship ae.safetensors)
    or diffusers' (``encoder.down_blocks...``), with Z-Image's scale and shift."""
    from diffusers import AutoencoderKL

    state = _stripped(state, ("first_stage_model.", CHECKPOINT["vae"]))
    if any(k.startswith("encoder.down_blocks.") for k in state):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIG / "vae")))
        vae.load_state_dict(state, strict=True)
        return vae.to(dt)
    return AutoencoderKL.from_single_file(state, config=str(CONFIG), subfolder="vae", local_files_only=True,
                                          torch_dtype=dt)


def _tokenizer(tokenizer_dir: str | Path | None):
    from transformers import Qwen2Tokenizer

    folder = Path(tokenizer_dir) if tokenizer_dir else None
    if folder is None or not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(
            "Z-Image's prompts are read with Qwen's vocabulary (vocab.json and merges.txt), which the pack does not "
            "ship: inside ComfyUI it is taken from ComfyUI's comfy/text_encoders/qwen25_tokenizer; outside it, give "
            "that folder (or a diffusers Z-Image folder's tokenizer/)")
    tok = Qwen2Tokenizer.from_pretrained(str(folder))
    tok.pad_token = "<|endoftext|>"
    return tok


def load_zimage_folder(folder: str | Path, device: str = "auto", dtype: str = "auto", offload: bool = False,
                       family: str | None = None) -> FTModel:
    """A diffusers ZImagePipeline folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/): Save
    Checkpoint's, the toy Z-Image's, or one from the Hub copied into models/diffusers. The family is told by the
    transformer's caption width (the toy's 64, Z-Image's 2560) unless ``family`` names it."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Model

    from ..runs.reading import check_finite, header

    folder = Path(folder)
    for sub in ("transformer", "vae", "text_encoder"):
        files = sorted((folder / sub).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder / sub} has no .safetensors weights (a Z-Image folder holds transformer/, "
                                    "vae/ and text_encoder/ weights as safetensors)")
        for f in files:  # the headers: a file cut short is named
            header(f, f"{folder.name}/{sub}:")
    with torch.inference_mode(False):
        dit = ZImageTransformer2DModel.from_pretrained(str(folder / "transformer"), use_safetensors=True,
                                                       local_files_only=True).eval()
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), use_safetensors=True, local_files_only=True).eval()
        te = Qwen3Model.from_pretrained(str(folder / "text_encoder"), use_safetensors=True,
                                        local_files_only=True).eval()
    for sub, part in (("transformer", dit), ("vae", vae), ("text_encoder", te)):
        check_finite(dict(part.named_parameters()), f"{folder.name}/{sub}")
    name = family or ("toy_zimage" if dit.config.cap_feat_dim == FAMILIES["toy_zimage"].context_dim else "zimage")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    model = FTModel(name, folder.name, dit, vae, te, Qwen2Tokenizer.from_pretrained(str(folder / "tokenizer")), sched)
    model.prediction_source = "flow matching (Z-Image)"
    dev = resolve_device(device)
    return model.to(dev, resolve_dtype(dtype, dev, model.family), offload=offload)
