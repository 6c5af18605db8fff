"""Load base models from local files only: the toy, a diffusers folder, or a single-file SD 1.x/2.x/XL checkpoint.

Nothing here reaches the network: diffusers and transformers are called with local paths and
``local_files_only=True``, single files are converted with the configs shipped in the pack's ``configs/``, and
only safetensors are read (a pickled ``.ckpt`` can run code, so it is refused).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..families.base import Family
from ..families.registry import PREDICTIONS, family_for_checkpoint, family_for_unet
from .model import FTModel

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was chosen but torch sees no CUDA GPU; choose 'auto' or 'cpu'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, family: Family) -> torch.dtype:
    """The weights' dtype: ``dtype``, or for auto the ``family``'s on a GPU, fp32 on the CPU."""
    if dtype == "auto":
        return DTYPES[family.gpu_dtype] if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype == "fp16":
        raise ValueError("fp16 on the CPU is slow and unsupported for some ops; use fp32 or bf16 there")
    return DTYPES[dtype]


def load_diffusers_folder(folder: str | Path, device: str = "auto", dtype: str = "auto",
                          prediction: str = "auto", offload: bool = False) -> FTModel:
    """A diffusers folder; its scheduler config says what it predicts, unless ``prediction`` names it. An SDXL
    layout (text_encoder_2/ and tokenizer_2/ beside the rest) gives a model with both text encoders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..runs.reading import check_finite, header

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder: it has no model_index.json "
                                "(expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/ inside)")
    xl = (folder / "text_encoder_2").is_dir()
    for sub in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if xl else ()):
        if not list((folder / sub).glob("*.safetensors")):
            has_bin = bool(list((folder / sub).glob("*.bin")))
            raise FileNotFoundError(
                f"{folder / sub} has no .safetensors weights" + (
                    " (only a pickled .bin, which the pack refuses to load because it can run code: convert it "
                    "to safetensors first)" if has_bin else ""))
    for sub in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if xl else ()):
        for weights in sorted((folder / sub).glob("*.safetensors")):  # the headers: a file cut short is named
            header(weights, f"{folder.name}/{sub}:")
    with torch.inference_mode(False):
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), use_safetensors=True, local_files_only=True)
        fam = family_for_unet(unet.config)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, fam)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), use_safetensors=True, local_files_only=True)
        te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True, local_files_only=True)
        te2 = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"), use_safetensors=True,
                                                          local_files_only=True).eval() if xl else None
    for sub, part in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2)):
        if part is not None:  # the values, as read (one pass over memory, not over the files again)
            check_finite(dict(part.named_parameters()), f"{folder.name}/{sub}")
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True) if xl else None
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    model = FTModel(fam.name, folder.name, unet.eval(), vae.eval(), te.eval(), tok, sched, text_encoder_2=te2,
                    tokenizer_2=tok2)
    if model.conditioned_on_time_ids != xl:
        raise ValueError(f"{folder.name}: its UNet {'expects' if not xl else 'does not take'} SDXL's pooled text "
                         f"embedding and time ids, but the folder {'has no' if not xl else 'has a'} text_encoder_2")
    if prediction == "auto":
        set_prediction(model, sched.get("prediction_type", "epsilon"), None, "the folder's scheduler config")
    else:
        set_prediction(model, prediction, None, "set by the prediction input")
    return model.to(dev, dt, offload=offload)  # offload: the weights never all on the GPU


def read_checkpoint_header(path: Path) -> dict[str, tuple[int, ...]]:
    from ..runs.reading import header

    return header(path, "checkpoint")[0]


def load_single_file(path: str | Path, tokenizer_dir: str | Path | None, device: str = "auto",
                     dtype: str = "auto", prediction: str = "auto", offload: bool = False) -> FTModel:
    """Load an original-layout SD 1.x/2.x/XL checkpoint file (:func:`model_from_single_file_state` on its
    tensors)."""
    from ..runs.reading import read

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors checkpoints are loaded; a {path.suffix} file is a pickle "
                         "that can run code when opened. Convert it to safetensors first")
    shapes = read_checkpoint_header(path)  # a damaged file is named here, before anything is read
    try:
        family_for_checkpoint(shapes)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    return model_from_single_file_state(read(path, "checkpoint")[0], path.stem, tokenizer_dir, device, dtype,
                                        prediction, offload=offload)


def model_from_single_file_state(state: dict[str, torch.Tensor], name: str, tokenizer_dir: str | Path | None,
                                 device: str = "auto", dtype: str = "auto", prediction: str = "auto",
                                 config_dir: str | Path | None = None, borrowed: bool = False,
                                 offload: bool = False) -> FTModel:
    """An FTModel from an original-layout SD 1.x/2.x/XL state dict (a checkpoint file's tensors, or a model ComfyUI
    holds), converted by diffusers' single-file loaders with the family's shipped configs (``config_dir``: another
    folder of the same layout). Its prediction type (and with it the native size, for SD 2.x) is detected from the
    weights by the family, unless ``prediction`` names it.

    ``state`` is consumed: each part's tensors leave it once the part is built, so an SDXL file (7 GB in fp16) is
    never held twice. ``borrowed``: its tensors belong to a live model (ComfyUI's, which patches and restores its
    weights in place, and loads them as inference tensors), and the model keeps none of them. Each part is built
    straight from the lender's tensors (weights on a GPU come to the CPU first), and what the build would keep as
    it is (the same dtype on the same device) is copied, one part at a time, so the lender's weights are never all
    held twice. ``offload`` (a GPU ``device``): the model stays in CPU memory (see :meth:`FTModel.to`)."""
    import diffusers

    fam = family_for_checkpoint({k: tuple(v.shape) for k, v in state.items()})
    cfg_dir = Path(config_dir) if config_dir else fam.config_dir
    toks = [_tokenizer(name, fam.label, cfg_dir, sub, tokenizer_dir)
            for sub in ("tokenizer", "tokenizer_2")[:len(fam.text_encoder_files)]]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, fam)
    cfg = str(cfg_dir)
    if prediction == "auto":
        prediction, how = (fam.detect(state), "detected from the weights") if fam.detect else (None, "")
    else:
        how = "set by the prediction input"
    zero_snr = "ztsnr" in state
    # diffusers loads each part straight into torch_dtype, then warns about a .to(torch_dtype) that does nothing
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        unet, vae, encoders = _build_parts(state, fam, cfg, dt, borrowed)
    finally:
        quiet.setLevel(level)
    scheduler = json.loads((cfg_dir / "model_index.json").read_text())["scheduler"][1]
    sched = dict(getattr(diffusers, scheduler).from_pretrained(cfg, subfolder="scheduler").config)
    if zero_snr:  # ComfyUI's marker for models trained with zero terminal SNR (some SDXL v-prediction fine-tunes)
        sched["rescale_betas_zero_snr"] = True
    model = FTModel(fam.name, name, unet.eval(), vae.eval(), encoders[0], toks[0], sched,
                    text_encoder_2=encoders[1] if len(encoders) > 1 else None,
                    tokenizer_2=toks[1] if len(toks) > 1 else None)
    if prediction is None:
        prediction, how = sched["prediction_type"], "the family's config"
    set_prediction(model, prediction, fam.size_for(prediction), how)
    return model.to(dev, dt, offload=offload)  # offload: the weights never all on the GPU


def _build_parts(state: dict, fam, cfg: str, dt: torch.dtype, borrowed: bool = False):
    """The UNet, VAE (fp16 models: built in fp32, see FTModel.part_dtype) and text encoders, each built in ``dt`` by
    diffusers' single-file converters; each part's tensors leave ``state`` once it is built (``borrowed``: see
    :func:`model_from_single_file_state`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vae_dt = torch.float32 if dt == torch.float16 else dt
    lent: set[int] = set()

    def own(prefix: str, part_dt: torch.dtype) -> None:  # a part at a time: the lender's weights are never all doubled
        if borrowed:
            lent.clear()
            lent.update(_lend(state, prefix, part_dt))

    def unshare(part):
        for t in [*part.parameters(), *part.buffers()]:
            if t.untyped_storage().data_ptr() in lent:  # the build kept the lender's tensor itself (or a view)
                t.data = t.data.clone()
        return part

    with torch.inference_mode(False):
        own("model.diffusion_model.", dt)
        unet = unshare(UNet2DConditionModel.from_single_file(state, config=cfg, subfolder="unet",
                                                             local_files_only=True, torch_dtype=dt))
        _drop(state, "model.diffusion_model.")
        own("first_stage_model.", vae_dt)
        vae = unshare(AutoencoderKL.from_single_file(state, config=cfg, subfolder="vae", local_files_only=True,
                                                     torch_dtype=vae_dt))
        _drop(state, "first_stage_model.")
        encoders = []
        for i, (_, prefix) in enumerate(fam.text_encoder_files):
            cls = CLIPTextModel if i == 0 else CLIPTextModelWithProjection
            own(prefix, dt)
            encoders.append(unshare(create_diffusers_clip_model_from_ldm(
                cls, state, subfolder="text_encoder" if i == 0 else "text_encoder_2", config=cfg,
                local_files_only=True, torch_dtype=dt).eval()))
            _drop(state, prefix)
    return unet, vae, encoders


def _lend(state: dict, prefix: str, dt: torch.dtype) -> set[int]:
    """Make ``state``'s tensors under ``prefix`` (the lender's) fit for building a part in ``dt`` that keeps none of
    them: on a GPU they come to the CPU (a copy); inference tensors (ComfyUI loads its models in inference mode),
    which no parameter can be made of, are copied where the build would keep them as they are (in ``dt`` already);
    the storages of the others are returned, for the copy after the build (``unshare``)."""
    ptrs = set()
    for k in [k for k in state if k.startswith(prefix)]:
        v = state[k].detach()
        if v.device.type != "cpu":
            state[k] = v.to("cpu")
        elif v.is_inference():
            if v.dtype == dt or not v.is_floating_point():
                state[k] = v.clone()
        else:
            ptrs.add(v.untyped_storage().data_ptr())
    return ptrs


def _drop(state: dict, prefix: str) -> None:
    for k in [k for k in state if k.startswith(prefix)]:
        del state[k]


def _tokenizer(name: str, label: str, cfg_dir: Path, sub: str, tokenizer_dir: str | Path | None):
    """A CLIP tokenizer from ``tokenizer_dir``'s vocabulary (ComfyUI's comfy/sd1_tokenizer; every CLIP of SD 1.x,
    2.x and SDXL shares it) with the shipped config's padding."""
    from transformers import CLIPTokenizer

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else cfg_dir / "tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        raise FileNotFoundError(
            f"{name} is a {label} checkpoint, which needs the CLIP tokenizer files vocab.json and "
            f"merges.txt. Inside ComfyUI they are taken from ComfyUI's comfy/sd1_tokenizer; outside it, copy "
            f"them into {cfg_dir / 'tokenizer'}")
    pad = json.loads((cfg_dir / sub / "tokenizer_config.json").read_text())["pad_token"]
    return CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77, pad_token=pad)


def set_prediction(model: FTModel, prediction: str, native_size: int | None = None, how: str = "") -> None:
    """Make ``model`` train and sample as a ``prediction`` model ("epsilon" / "v_prediction") of ``native_size``
    pixels (None: as its UNet config says)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction {prediction!r} is not one of auto, {', '.join(PREDICTIONS)}")
    model.scheduler_config["prediction_type"] = prediction
    if native_size is not None and native_size != model.native_size:
        model.unet.register_to_config(sample_size=native_size // model.vae_scale_factor)
    model.prediction_source = how
    log.info("%s: %s, %d px (%s)", model.name, prediction, model.native_size, how or "as configured")
