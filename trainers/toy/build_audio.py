"""The toy audio model's build stages: the toy's architecture trained on the toy sound world's spectrograms.

    python -m comfyui_finetune.trainers.toy build --stages audio_vae,audio_unet,audio_eval

Clips of tones (trainers/audio/world.py) become 64 x 64 mel-spectrogram pictures with the ``toy_8k_64mel`` preset
(trainers/audio/spectrogram.py); a VAE one level deeper than the toy's (x4 down, so the UNet sees 16 x 16 latents
as the toy's does), a text encoder with the sound world's words and a UNet are trained on them as the picture toy's
are (same schedule, EMA and caption dropout: steps.train_denoiser). The quality bar is measured on the **sound**:
every generated picture goes back to audio by Griffin-Lim and the audio judge names its note, timbre and rhythm.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import names, spectrogram, world as sound
from . import models
from .loader import AUDIO_FOLDER as FOLDER
from .steps import fit_vae, no_build_paths, train_denoiser
from .tokenizer import write_tokenizer

log = logging.getLogger(__name__)
PRESET = "toy_8k_64mel"
STAGES = ("audio_vae", "audio_unet", "audio_eval")
#: share of training captions that leave out one part (the timbre or the rhythm), so "a tone at g" means something
PARTIAL_CAPTIONS = 0.2


def pictures_of(waves: list[np.ndarray]) -> torch.Tensor:
    """Mono clips of one window each -> pictures (B, 3, 64, 64) in [-1, 1], as the VAE takes them."""
    pics = [spectrogram.to_pictures(torch.from_numpy(w)[None], sound.SAMPLE_RATE, PRESET)[0][:1] for w in waves]
    return torch.cat(pics).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()


def training_set(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` clips of the base world (base notes x base timbres x rhythms, held-out pairs left out) as pictures,
    and their captions; a fifth of the captions name only two of the three parts."""
    rng = np.random.default_rng(seed + 11)
    clips = sound.sample_clips(rng, n)
    captions = []
    for c in clips:
        u = rng.random()
        if u < PARTIAL_CAPTIONS / 2:
            captions.append(names.caption_of(c.note, None, c.rhythm))
        elif u < PARTIAL_CAPTIONS:
            captions.append(names.caption_of(c.note, c.timbre, None))
        else:
            captions.append(c.caption)
    return pictures_of([c.wave for c in clips]), captions


def _vae_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Any sound the world can make, not only the base model's: every note and timbre (new ones too), free
    pitches between the toy notes, a few noise bursts and silences, so the VAE draws what fine-tuning teaches."""
    waves = []
    for _ in range(n):
        u = rng.random()
        timbre = names.TIMBRES[int(rng.integers(len(names.TIMBRES)))]
        rhythm = names.RHYTHMS[int(rng.integers(len(names.RHYTHMS)))]
        if u < 0.06:
            waves.append((rng.normal(0, rng.uniform(0.0, 0.2), sound.CLIP_LENGTH)).astype(np.float32))
        elif u < 0.5:
            hz = float(np.exp(rng.uniform(np.log(90.0), np.log(1000.0))))
            waves.append(sound.synth(hz, timbre, rhythm, rng))
        else:
            note = names.NOTES[int(rng.integers(len(names.NOTES)))]
            waves.append(sound.make_clip(note, timbre, rhythm, rng).wave)
    return pictures_of(waves)


def train_vae(cfg, out: Path, train_x: torch.Tensor) -> dict:
    torch.manual_seed(cfg.seed + 12)
    rng = np.random.default_rng(cfg.seed + 12)
    vae = models.new_audio_vae()
    t0 = time.time()
    fit_vae(vae, lambda: _vae_batch(rng, cfg.batch_size), cfg, "audio vae")
    with torch.no_grad():
        lat = torch.cat([vae.encode(train_x[i:i + 256]).latent_dist.mean for i in range(0, len(train_x), 256)])
        std = float(lat.std())
        val = _vae_batch(np.random.default_rng(cfg.seed + 996), 128)
        mse = float(F.mse_loss(vae.decode(vae.encode(val).latent_dist.mean).sample, val))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(str(out / FOLDER / "vae"))
    return {"seconds": round(time.time() - t0, 1), "val_mse": round(mse, 5), "latent_std": round(std, 4),
            "scaling_factor": vae.config.scaling_factor, "round_trip": vae_round_trip(vae, cfg.seed)}


def vae_round_trip(vae, seed: int) -> dict:
    """What the VAE alone does to the sound: every clip of every note x timbre x rhythm, encoded, decoded, turned
    back into audio and judged."""
    from ..audio import judge

    rng = np.random.default_rng(seed + 995)
    clips = [sound.make_clip(n, t, r, rng) for n in names.NOTES for t in names.TIMBRES for r in names.RHYTHMS]
    with torch.no_grad():
        x = pictures_of([c.wave for c in clips])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    waves = spectrogram.to_audio(rec.permute(0, 2, 3, 1).add(1).div(2).clamp(0, 1), PRESET, join="batch")
    res = judge.judge_many([w[0].numpy() for w in waves], sound.SAMPLE_RATE, [c.note for c in clips],
                           [c.timbre for c in clips], [c.rhythm for c in clips])
    return {k: res[k] for k in ("n", "note_acc", "timbre_acc", "rhythm_acc", "median_abs_cents")}


def train_unet(cfg, out: Path, x: torch.Tensor, captions: list[str]) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..objectives.ddpm import DDPM
    from ..runs.export import legacy_text_encoder_keys

    torch.manual_seed(cfg.seed + 13)
    g = torch.Generator().manual_seed(cfg.seed + 13)
    dst = out / FOLDER
    write_tokenizer(dst / "tokenizer", names.WORDS)
    tok = CLIPTokenizer.from_pretrained(str(dst / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(dst / "vae")).eval()
    te = CLIPTextModel(models.audio_text_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    unet = models.new_audio_unet()
    t0 = time.time()
    with torch.no_grad():
        dists = [vae.encode(x[i:i + 256]).latent_dist for i in range(0, len(x), 256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids

    def condition(idx, drop):
        cap = ids[idx].clone()
        cap[drop] = empty
        return te(cap)[0]

    ema_loss, ms = train_denoiser(cfg, list(unet.parameters()) + list(te.parameters()), mean, std,
                                  lambda z: z * vae.config.scaling_factor, DDPM(models.SCHEDULER_CONFIG), g, condition,
                                  lambda noisy, t, ctx: unet(noisy, t, encoder_hidden_states=ctx).sample, "audio unet")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=DDIMScheduler(**models.SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    legacy_text_encoder_keys(dst / "text_encoder")
    no_build_paths(dst)
    return {"seconds": round(time.time() - t0, 1), "steps": cfg.unet_steps, "ms_per_step": round(ms, 1),
            "final_loss_ema": round(ema_loss, 4)}


def heard(model, prompt: str, seeds: list[int], steps: int = 20, cfg: float = 4.0, iterations: int = 32) -> list:
    """Generate ``prompt`` at each seed and return the sounds (mono numpy clips at the world's rate)."""
    from ..sampling import sample

    pics = sample(model, prompt, seeds=seeds, steps=steps, cfg=cfg)
    return [w[0].numpy() for w in spectrogram.to_audio(pics, PRESET, iterations=iterations, join="batch")]


def evaluate(cfg, out: Path, grid_path: Path | None = None) -> dict:
    """The quality bar, judged on the sound: every base note x timbre x rhythm prompt at ``eval_seeds`` seeds;
    and the note the base was never taught ("at e") with each base timbre, which it must not play."""
    from ..audio import judge
    from .loader import load_toy_audio_model

    model = load_toy_audio_model(out)
    t0 = time.time()
    rows, waves, want = [], [], []
    for note, timbre in sound.base_classes():
        for rhythm in names.RHYTHMS:
            got = heard(model, names.caption_of(note, timbre, rhythm), list(range(cfg.eval_seeds)))
            waves += got
            want += [(note, timbre, rhythm)] * len(got)
    res = judge.judge_many(waves, sound.SAMPLE_RATE, *zip(*want))
    new = []
    for timbre in names.BASE_TIMBRES:
        new += heard(model, names.caption_of(names.NEW_NOTES[0], timbre, "steady"), list(range(cfg.eval_seeds)))
    new_res = judge.judge_many(new, sound.SAMPLE_RATE, names.NEW_NOTES[0])
    report = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
              if k in ("n", "note_acc", "timbre_acc", "rhythm_acc", "median_abs_cents")}
    report["new_note_acc"] = round(new_res["note_acc"], 4)
    report["new_note_heard"] = new_res["counts"]["note"]
    report["seconds"] = round(time.time() - t0, 1)
    return report


def run(stage: str, cfg, out: Path) -> dict:
    """One audio build stage (called by build.build), with the audio step counts (``audio_*`` in its config)."""
    from dataclasses import replace

    cfg = replace(cfg, vae_steps=cfg.audio_vae_steps, unet_steps=cfg.audio_unet_steps)
    if stage == "audio_vae":
        x, _ = training_set(1024, cfg.seed)
        return train_vae(cfg, out, x)
    if stage == "audio_unet":
        x, captions = training_set(cfg.audio_clips, cfg.seed)
        return train_unet(cfg, out, x, captions)
    return evaluate(cfg, out)

