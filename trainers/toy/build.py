"""Train the toy world's models from a seed: judge, VAE, UNet + text encoder, CLIP scorer, ControlNet; then
measure them.

    python -m comfyui_finetune.trainers.toy build [--out DIR] [--stages judge,vae,unet,clip,controlnet,eval]

Every stage writes into ``DIR`` (by default the shipped ``weights/`` folder) and later stages read what earlier
ones wrote, so one stage can be re-run alone. Step counts are fixed (not wall-clock budgets), so a build repeats;
bit-exactness across machines is not promised (CPU kernels differ), the quality bar is.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..runs.export import legacy_text_encoder_keys
from . import judge as judge_mod
from . import WEIGHTS, control, models, world
from .steps import cosine as _cosine, encode_pictures, every as _every, no_build_paths as _no_build_paths
from .steps import fit_vae, train_denoiser
from .tokenizer import write_tokenizer

log = logging.getLogger(__name__)
STAGES = ("judge", "vae", "unet", "clip", "controlnet", "eval", "xl", "xl_eval", "audio_vae", "audio_unet",
          "audio_eval", "zimage_vae", "zimage", "zimage_eval")


@dataclass
class BuildConfig:
    seed: int = 0
    train_images: int = 8192
    batch_size: int = 16
    judge_steps: int = 600
    vae_steps: int = 900
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6  # weight of the KL term (summed over latent elements)
    unet_steps: int = 4000
    unet_lr: float = 2e-3
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    clip_steps: int = 2000
    eval_seeds: int = 8
    eval_cfg: float = 4.0
    eval_steps: int = 20
    controlnet_images: int = 4096
    controlnet_steps: int = 1500
    controlnet_lr: float = 1e-3
    controlnet_caption_dropout: float = 0.3
    audio_clips: int = 4096  # the toy audio model's training clips (one 64 x 64 spectrogram each)
    audio_vae_steps: int = 500
    audio_unet_steps: int = 3000
    zimage_steps: int = 8000  # the toy Z-Image's transformer: at 4000 steps it drew stars in 81-97 % of pictures


# ----------------------------------------------------------------------------------------------------- judge --
def _judge_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    imgs, labels = [], []
    none_id = len(judge_mod.SHAPE_CLASSES) - 1
    for _ in range(n):
        u = rng.random()
        bg = (255, 255, 255) if rng.random() < 0.8 else tuple(int(v) for v in rng.integers(0, 256, 3))
        rgb = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.5 else \
            world.PALETTE[world.COLORS[rng.integers(len(world.COLORS))]]
        if u < 0.125:  # pure noise or near-blank
            if rng.random() < 0.5:
                img = rng.normal(127, rng.uniform(10, 90), (32, 32, 3))
            else:
                img = np.full((32, 32, 3), bg, dtype=np.float64) + rng.normal(0, 6, (32, 32, 3))
            imgs.append(np.clip(img, 0, 255).astype(np.uint8)); labels.append(none_id)
        elif u < 0.3:  # blobs, ellipses, fragments
            imgs.append(world.blob_picture(rng, background=bg, rgb=rgb)); labels.append(none_id)
        else:
            shape = world.SHAPES[rng.integers(len(world.SHAPES))]
            geo = world.NARROW if rng.random() < 0.5 else world.BROAD
            r = float(rng.uniform(*geo.radius))
            lim = max(0.0, min(geo.center_jitter, 0.5 - r * 1.15))
            img, mask = world.draw_shape(shape, rgb, background=bg, radius=r,
                                         center=(0.5 + rng.uniform(-lim, lim), 0.5 + rng.uniform(-lim, lim)),
                                         rotation_deg=float(rng.uniform(-geo.rotation_deg, geo.rotation_deg)))
            if rng.random() < 0.12:  # erase half or more of it: no longer that shape
                yy, xx = np.mgrid[0:32, 0:32]
                a = rng.uniform(0, 2 * np.pi)
                ys, xs = np.nonzero(mask > 0.5)
                if len(ys):
                    proj = (xx - xs.mean()) * np.cos(a) + (yy - ys.mean()) * np.sin(a)
                    img = img.copy()
                    img[proj > rng.uniform(-0.3, 0.1) * r * 32] = bg
                labels.append(none_id)
            else:
                labels.append(world.SHAPES.index(shape))
            imgs.append(img)
    x = world.to_tensor_batch(imgs)
    # augment: shift, flip, blur, colour, contrast, noise
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    shift = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    if torch.rand(1, generator=g) < 0.5:
        x = x.flip(3)
    sigma = float(torch.rand(1, generator=g)) * 1.3
    if sigma > 0.2:
        import kornia
        x = kornia.filters.gaussian_blur2d(x, (5, 5), (sigma, sigma))
    x = x * (1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.3) + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.2
    x = x + torch.randn(x.shape, generator=g) * float(torch.rand(1, generator=g)) * 0.1
    return x.clamp(-1, 1), torch.tensor(labels)


def train_judge(cfg: BuildConfig, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    net = judge_mod.ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = _cosine(opt, cfg.judge_steps, 50)
    t0 = time.time()
    for i in range(cfg.judge_steps):
        x, y = _judge_batch(rng, 64)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        if _every(i, 100, cfg.judge_steps):
            log.info("judge step %d/%d loss %.4f", i + 1, cfg.judge_steps, loss.item())
    judge = judge_mod.ToyJudge(net.eval())
    judge.save(out / "judge")
    # held-out check on clean shapes in the base geometry
    vrng = np.random.default_rng(cfg.seed + 999)
    pics = [world.random_picture(vrng, color=c, shape=s) for _ in range(8) for c, s in world.all_classes()]
    res = judge.judge([p.image for p in pics])
    acc_shape = np.mean([r["shape"] == p.shape for r, p in zip(res, pics)])
    acc_color = np.mean([r["color"] == p.color for r, p in zip(res, pics)])
    noise = world.to_tensor_batch([np.clip(vrng.normal(127, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                                   for _ in range(64)])
    none_rate = np.mean([s == "none" for s in judge.shapes(noise.permute(0, 2, 3, 1) / 2 + 0.5)])
    return {"seconds": round(time.time() - t0, 1), "shape_acc_clean": float(acc_shape),
            "color_acc_clean": float(acc_color), "noise_called_none": float(none_rate)}


# ------------------------------------------------------------------------------------------------------- vae --
def _vae_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    imgs = []
    for _ in range(n):
        bg = "white" if rng.random() < 0.85 else None
        bg_rgb = (255, 255, 255) if bg else tuple(int(v) for v in rng.integers(0, 256, 3))
        rgb = world.PALETTE[world.BASE_COLORS[rng.integers(4)]] if rng.random() < 0.5 else \
            tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.12:
            imgs.append(world.blob_picture(rng, background=bg_rgb, rgb=rgb))
            continue
        geo = world.NARROW if rng.random() < 0.6 else world.BROAD
        shape = world.SHAPES[rng.integers(len(world.SHAPES))]
        r = float(rng.uniform(*geo.radius))
        lim = max(0.0, min(geo.center_jitter, 0.5 - r * 1.15))
        img, _ = world.draw_shape(shape, rgb, background=bg_rgb, radius=r,
                                  center=(0.5 + rng.uniform(-lim, lim), 0.5 + rng.uniform(-lim, lim)),
                                  rotation_deg=float(rng.uniform(-geo.rotation_deg, geo.rotation_deg)))
        imgs.append(img)
    return world.to_tensor_batch(imgs)


def train_vae(cfg: BuildConfig, out: Path, train_x: torch.Tensor, new=models.new_vae, folder: str = "pipeline/vae",
              shift: bool = False) -> dict:
    """Train the VAE ``new()`` makes on toy pictures and save it in ``out / folder``, its scaling factor 1 / the
    latents' spread (``shift``: and its shift factor their mean, as the Flux VAE has one)."""
    torch.manual_seed(cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 2)
    vae = new()
    t0 = time.time()
    fit_vae(vae, lambda: _vae_batch(rng, cfg.batch_size), cfg, "vae")
    with torch.no_grad():
        lat = torch.cat([vae.encode(train_x[i:i + 256]).latent_dist.mean for i in range(0, len(train_x), 256)])
        std = float(lat.std())
        vrng = np.random.default_rng(cfg.seed + 998)
        val = _vae_batch(vrng, 128)
        mse = float(F.mse_loss(vae.decode(vae.encode(val).latent_dist.mean).sample, val))
        purple = world.to_tensor_batch([world.random_picture(vrng, color="purple", shape=s).image
                                        for s in world.SHAPES for _ in range(8)])
        mse_purple = float(F.mse_loss(vae.decode(vae.encode(purple).latent_dist.mean).sample, purple))
    if shift:
        std = float((lat - lat.mean()).std())
        vae.register_to_config(shift_factor=round(float(lat.mean()), 5))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(str(out / folder))
    return {"seconds": round(time.time() - t0, 1), "val_mse": round(mse, 5), "purple_mse": round(mse_purple, 5),
            "latent_std": round(std, 4), "latent_mean": round(float(lat.mean()), 4),
            "scaling_factor": vae.config.scaling_factor}


# ----------------------------------------------------------------------------------------------- unet + te --
def train_unet(cfg: BuildConfig, out: Path, pics: list[world.Picture]) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..objectives.ddpm import DDPM

    torch.manual_seed(cfg.seed + 3)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    tok = CLIPTokenizer.from_pretrained(str(out / "pipeline" / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(out / "pipeline" / "vae")).eval()
    te = CLIPTextModel(models.text_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    unet = models.new_unet()
    t0 = time.time()
    mean, std = encode_pictures(vae, pics)
    ids = tok([p.caption for p in pics], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    log.info("encoded %d latents in %.1fs", len(pics), time.time() - t0)

    def condition(idx, drop):
        cap = ids[idx].clone()
        cap[drop] = empty
        return te(cap)[0]

    ema_loss, ms = train_denoiser(cfg, list(unet.parameters()) + list(te.parameters()), mean, std,
                                  lambda z: z * vae.config.scaling_factor, DDPM(models.SCHEDULER_CONFIG), g, condition,
                                  lambda noisy, t, ctx: unet(noisy, t, encoder_hidden_states=ctx).sample, "unet")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=DDIMScheduler(**models.SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out / "pipeline"), safe_serialization=True)
    legacy_text_encoder_keys(out / "pipeline" / "text_encoder")  # the key layout every other tool reads
    _no_build_paths(out / "pipeline")
    return {"seconds": round(time.time() - t0, 1), "steps": cfg.unet_steps, "ms_per_step": round(ms, 1),
            "final_loss_ema": round(ema_loss, 4)}


# ------------------------------------------------------------------------------------------------------ clip --
CLIP_TEMPLATES = ("a {c} {s}", "a {c} {s} on a white background", "a photo of a {c} {s}")


def _clip_batch(rng, classes, processor_mean, processor_std):
    imgs, caps = [], []
    for c, s in classes:
        geo = world.NARROW if rng.random() < 0.6 else world.BROAD
        imgs.append(world.random_picture(rng, color=c, shape=s, geometry=geo).image)
        caps.append(CLIP_TEMPLATES[rng.integers(len(CLIP_TEMPLATES))].format(c=c, s=s))
    x = torch.from_numpy(np.stack(imgs).astype(np.float32) / 255).permute(0, 3, 1, 2)
    return (x - processor_mean) / processor_std, caps


def train_clip(cfg: BuildConfig, out: Path) -> dict:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(cfg.seed + 4)
    rng = np.random.default_rng(cfg.seed + 4)
    tok = CLIPTokenizer.from_pretrained(str(out / "pipeline" / "tokenizer"))
    model = CLIPModel(models.clip_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    proc = CLIPImageProcessor(size={"shortest_edge": models.IMAGE_SIZE},
                              crop_size={"height": models.IMAGE_SIZE, "width": models.IMAGE_SIZE})
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1); std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    classes = world.all_classes()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = _cosine(opt, cfg.clip_steps, 100)
    t0 = time.time()
    for i in range(cfg.clip_steps):
        x, caps = _clip_batch(rng, classes, mean, std)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        logits = model(input_ids=ids, pixel_values=x).logits_per_image
        lab = torch.arange(len(caps))
        loss = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        if _every(i, 250, cfg.clip_steps):
            log.info("clip step %d/%d loss %.4f", i + 1, cfg.clip_steps, loss.item())
    model.eval()
    folder = out / "clip"
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    proc.save_pretrained(str(folder))
    # held-out: rank all "a {c} {s}" captions
    vrng = np.random.default_rng(cfg.seed + 997)
    with torch.no_grad():
        texts = [f"a {c} {s}" for c, s in classes]
        temb = model.get_text_features(**tok(texts, padding="max_length", max_length=tok.model_max_length,
                                             return_tensors="pt"))
        temb = getattr(temb, "pooler_output", temb)
        correct, total = 0, 0
        for _ in range(8):
            x, _ = _clip_batch(vrng, classes, mean, std)
            iemb = model.get_image_features(pixel_values=x)
            iemb = getattr(iemb, "pooler_output", iemb)
            sims = F.normalize(iemb, dim=-1) @ F.normalize(temb, dim=-1).T
            correct += int((sims.argmax(1) == torch.arange(len(classes))).sum()); total += len(classes)
    return {"seconds": round(time.time() - t0, 1), "top1_heldout": round(correct / total, 4), "n": total}


# ------------------------------------------------------------------------------------------------------ eval --
def evaluate(cfg: BuildConfig, out: Path, grid_path: Path | None = None, xl: bool = False, load=None,
             sampler: str = "ddim") -> dict:
    """The quality bar: colour and shape accuracy over the base classes, several seeds each (``xl``: of the toy
    SDXL; ``load(out)``: of another toy, drawn with ``sampler``)."""
    from ..sampling import sample
    from .loader import load_toy_model, load_toy_xl_model

    model = load(out) if load else load_toy_xl_model(out) if xl else load_toy_model(out)
    judge = judge_mod.ToyJudge.load(out / "judge")
    classes = world.base_classes()
    t0 = time.time()
    rows, per_class = [], {}
    for c, s in classes:
        imgs = sample(model, f"a {c} {s}", seeds=list(range(cfg.eval_seeds)), steps=cfg.eval_steps,
                      cfg=cfg.eval_cfg, sampler=sampler)
        res = judge.judge(imgs)
        per_class[f"{c} {s}"] = {"color": float(np.mean([r["color"] == c for r in res])),
                                 "shape": float(np.mean([r["shape"] == s for r in res]))}
        rows.append(imgs)
    seconds = time.time() - t0
    report = {
        "color_acc": round(float(np.mean([v["color"] for v in per_class.values()])), 4),
        "shape_acc": round(float(np.mean([v["shape"] for v in per_class.values()])), 4),
        "images": len(classes) * cfg.eval_seeds,
        "sampling_seconds_per_image": round(seconds / (len(classes) * cfg.eval_seeds), 4),
        "per_class": per_class,
    }
    if grid_path is not None:
        from PIL import Image

        grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)
        Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).resize(
            (grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(grid_path)
    return report


def zimage_stage(stage: str, cfg: BuildConfig, out: Path, pics: list[world.Picture]) -> dict:
    """The toy Z-Image's stages: its 16-channel VAE, its transformer and Qwen3 (build_zimage.py), its quality bar."""
    from .build_zimage import train_zimage
    from .loader import ZIMAGE_FOLDER, load_toy_zimage_model

    if stage == "zimage_vae":
        return train_vae(cfg, out, world.to_tensor_batch([p.image for p in pics[:2048]]), models.new_zimage_vae,
                         f"{ZIMAGE_FOLDER}/vae", shift=True)
    if stage == "zimage":
        return train_zimage(cfg, out, pics)
    return evaluate(cfg, out, (out.parent if out == WEIGHTS else out) / "toy_zimage_samples.png",
                    load=load_toy_zimage_model, sampler="euler")


# ----------------------------------------------------------------------------------------------------- build --
def build(out: Path = WEIGHTS, cfg: BuildConfig | None = None, stages=STAGES) -> dict:
    cfg = cfg or BuildConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report_path = out / "build_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["config"] = asdict(cfg)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown build stage(s) {bad}; stages are {', '.join(STAGES)}")
    write_tokenizer(out / "pipeline" / "tokenizer")
    pics = world.base_training_set(cfg.train_images, cfg.seed)
    t0 = time.time()
    for stage in STAGES:
        if stage not in stages:
            continue
        log.info("stage %s ...", stage)
        if stage == "judge":
            report["judge"] = train_judge(cfg, out)
        elif stage == "vae":
            report["vae"] = train_vae(cfg, out, world.to_tensor_batch([p.image for p in pics[:2048]]))
        elif stage == "unet":
            report["unet"] = train_unet(cfg, out, pics)
        elif stage == "clip":
            report["clip"] = train_clip(cfg, out)
        elif stage == "controlnet":
            report["controlnet"] = control.train_controlnet(cfg, out)
        elif stage == "eval":
            report["eval"] = evaluate(cfg, out, out.parent / "toy_samples.png" if out == WEIGHTS else out / "samples.png")
        elif stage == "xl":
            from .build_xl import train_unet_xl

            report["xl"] = train_unet_xl(cfg, out, pics)
        elif stage == "xl_eval":
            report["xl_eval"] = evaluate(cfg, out, (out.parent if out == WEIGHTS else out) / "toy_xl_samples.png",
                                         xl=True)
        elif stage.startswith("zimage"):
            report[stage] = zimage_stage(stage, cfg, out, pics)
        elif stage.startswith("audio"):
            from . import build_audio

            report[stage] = build_audio.run(stage, cfg, out)
        log.info("stage %s: %s", stage, {k: v for k, v in report[stage].items() if k != "per_class"})
        report_path.write_text(json.dumps(report, indent=1))
    report.pop("total_seconds", None)  # the stages may come from several invocations: each stage has its seconds
    report["last_invocation"] = {"stages": [s for s in STAGES if s in stages], "seconds": round(time.time() - t0, 1)}
    report["files_mb"] = round(sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2 ** 20, 2)
    report_path.write_text(json.dumps(report, indent=1))
    return report
