"""Writing files other tools read: safetensors written atomically, never over an existing file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch



def base_model_version(family: str) -> str:
    """kohya's ss_base_model_version for a family (the family's name when the registry does not know it)."""
    from ..families.registry import FAMILIES

    return FAMILIES[family].base_model_version if family in FAMILIES else family


def architecture(family: str) -> str:
    """modelspec.architecture of a family's base model (for the toys, their ss_base_model_version)."""
    from ..families.registry import FAMILIES

    fam = FAMILIES.get(family)
    return (fam.architecture or fam.base_model_version) if fam else family


def unique_path(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem_00001.suffix`` etc. when taken: an existing file is never replaced."""
    p = folder / f"{stem}{suffix}"
    n = 1
    while p.exists():
        p = folder / f"{stem}_{n:05d}{suffix}"
        n += 1
    return p


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write to a temporary name in the same folder, then rename into place (no half-written file is ever seen).

    Raises FileExistsError rather than replace an existing file.
    """
    from safetensors.torch import save_file

    from .atomic import disk_full, fsync_dir, fsync_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})
        fsync_file(tmp)  # the bytes are on disk before the name points at them
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full(e, path.name)
        if full is not None:
            raise full from e
        raise
    try:
        os.link(tmp, path)  # atomic, and fails if the target appeared in the meantime
    except FileExistsError:
        tmp.unlink()
        raise FileExistsError(f"{path.name} already exists; nothing was overwritten") from None
    except OSError:  # file systems without hard links
        if path.exists():
            tmp.unlink()
            raise FileExistsError(f"{path.name} already exists; nothing was overwritten") from None
        tmp.replace(path)
        fsync_dir(path.parent)
        return path
    tmp.unlink()
    fsync_dir(path.parent)
    return path


def save_unique(folder: Path, stem: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``folder/stem.safetensors`` (or ``stem_00001`` ...): never over an existing file, even when another
    writer takes the name between the check and the rename. Temporary files a dead writer left there go first."""
    from .atomic import clean_stale

    clean_stale(folder)
    for _ in range(100):
        try:
            return write_safetensors(unique_path(folder, stem, ".safetensors"), tensors, metadata)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free name for {stem} in {folder}")


def network_args(kind: str) -> dict:
    """LyCORIS' ``ss_network_args`` for an adapter kind (DoRA is LyCORIS' lora algorithm with ``dora_wd``)."""
    return {"algo": "lora", "dora_wd": "True"} if kind == "dora" else {"algo": kind}


def lora_metadata(lora, dtype: str = "float32") -> dict[str, str]:
    """kohya's ``ss_*`` keys (what LoRA managers show) plus the pack's full training config as JSON."""
    cfg = lora.metadata.get("finetune_config", {}) or {}
    train = cfg.get("recipe", {})
    data = cfg.get("dataset", {})
    model = cfg.get("model", {})
    meta = {
        "ss_network_module": "networks.lora" if getattr(lora, "kind", "lora") == "lora" else "lycoris.kohya",
        **({"ss_network_args": json.dumps(network_args(lora.kind))} if getattr(lora, "kind", "lora") != "lora"
           else {}),
        "ss_network_dim": lora.rank,
        "ss_network_alpha": lora.alpha,
        "ss_base_model_version": base_model_version(model.get("family", "")),
        "ss_sd_model_name": model.get("name", ""),
        "ss_steps": lora.metadata.get("steps", train.get("steps", "")),
        "ss_max_train_steps": train.get("steps", ""),
        "ss_learning_rate": train.get("learning_rate", ""),
        "ss_unet_lr": train.get("learning_rate", ""),
        "ss_text_encoder_lr": train.get("text_encoder_lr") or train.get("learning_rate", ""),
        "ss_network_train_unet_only": not train.get("train_text_encoder", False),
        "ss_batch_size_per_device": train.get("batch_size", ""),
        "ss_gradient_accumulation_steps": train.get("grad_accum", ""),
        "ss_optimizer": train.get("optimizer", ""),
        "ss_lr_scheduler": train.get("lr_scheduler", ""),
        "ss_seed": train.get("seed", ""),
        "ss_min_snr_gamma": train.get("snr_gamma", ""),
        "ss_noise_offset": train.get("noise_offset", ""),
        "ss_resolution": json.dumps(lora.metadata.get("resolution", "")),
        "ss_num_train_images": data.get("images", ""),
        "ss_caption_dropout_rate": data.get("caption_dropout", ""),
        "ss_tag_frequency": json.dumps({data.get("name", "dataset"): data.get("tag_frequency", {})}),
        "ss_output_name": lora.name,
        "ss_mixed_precision": train.get("mixed_precision", ""),
        "ss_save_dtype": dtype,
        "finetune_config": json.dumps(cfg, default=str),
        # Stability's model spec: the base's architecture id (stable-diffusion-xl-v1-base/lora ...)
        "modelspec.architecture": f"{architecture(model.get('family', '')) or 'unknown'}/"
                                  f"{'lora' if getattr(lora, 'kind', 'lora') == 'lora' else 'lycoris'}",
    }
    return {k: str(v) for k, v in meta.items()}


def embedding_metadata(embedding) -> dict[str, str]:
    """An embedding file's metadata: its word, vector count and what the pack knows of its training."""
    return {"token": embedding.token, "num_vectors": str(embedding.vectors.shape[0]),
            **{k: (v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in embedding.metadata.items()}}


def legacy_text_encoder_keys(folder: Path) -> Path:
    """Rewrite a CLIPTextModel folder's ``model.safetensors`` with keys spelled ``text_model.*``.

    transformers 5 saves CLIPTextModel weights without the ``text_model.`` level; ComfyUI's loaders, A1111,
    transformers 4 and every published SD checkpoint use it, and transformers 5 loads either spelling.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(folder) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {"format": "pt"}
        tensors = {(k if k.startswith("text_model.") else "text_model." + k): f.get_tensor(k) for k in f.keys()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path
