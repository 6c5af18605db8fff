"""FT_LoadBaseModel and FT_Sample: determinism, samplers, errors, and the diffusers layout of the toy."""
from __future__ import annotations

import shutil

import pytest
import torch

from comfyui_finetune.nodes import host
from comfyui_finetune.nodes.models import FT_LoadBaseModel
from comfyui_finetune.nodes.sample import SAMPLER_NAMES, FT_Sample
from comfyui_finetune.trainers.toy.loader import WEIGHTS


def run_sample(model, **kw):
    args = dict(prompt="a red circle", negative_prompt="", seed=0, steps=8, cfg=4.0, sampler="ddim", width=0,
                height=0, batch_size=1)
    args.update(kw)
    return FT_Sample().execute(model, **args)[0]


def test_load_toy_node():
    (model,) = FT_LoadBaseModel().execute("toy (built-in)", "cpu", "auto")
    assert model.family.name == "toy" and model.native_size == 32
    assert not any(p.is_inference() for p in model.unet.parameters())


def test_same_seed_same_image_and_batch_matches_single(toy):
    a = run_sample(toy, seed=7, batch_size=3)
    b = run_sample(toy, seed=7, batch_size=3)
    assert a.shape == (3, 32, 32, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    single = run_sample(toy, seed=8)
    assert torch.allclose(a[1], single[0], atol=1e-4)
    assert (a[0] - a[1]).abs().max() > 0.05


def test_runs_under_comfyui_inference_mode(toy):
    with torch.inference_mode():
        img = run_sample(toy, seed=1)
    assert img.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_draws_the_prompt(toy, judge, sampler):
    img = run_sample(toy, sampler=sampler, steps=20, seed=3, batch_size=4, prompt="a blue square")
    assert img.min() >= 0 and img.max() <= 1 and torch.isfinite(img).all()
    res = judge.judge(img)
    assert sum(r["color"] == "blue" for r in res) >= 3, (sampler, res)


def test_other_sizes(toy):
    img = run_sample(toy, width=48, height=32)
    assert img.shape == (1, 32, 48, 3)
    with pytest.raises(ValueError, match="width 30 is not a multiple of 4"):
        run_sample(toy, width=30)


def test_empty_prompt_is_an_error(toy):
    with pytest.raises(ValueError, match="prompt is empty"):
        run_sample(toy, prompt="  ")


def test_running_out_of_memory_says_what_to_lower(toy, monkeypatch):
    """FT_Sample (and DreamBooth's class pictures, and validation) out of GPU memory: the error names the call's
    count and size and what to lower, not torch's allocator figures alone."""
    from comfyui_finetune.trainers import sampling

    def full(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB")

    monkeypatch.setattr(sampling, "denoise", full)
    with pytest.raises(torch.OutOfMemoryError) as e:
        sampling.sample(toy, "a red circle", seeds=[0, 1, 2], width=32, height=48, steps=2)
    msg = str(e.value)
    assert msg.startswith("out of GPU memory sampling 3 pictures at 32 x 48 px: ")
    assert "smaller batch than 3" in msg and "smaller size than 32 x 48" in msg and "offload auto" in msg
    assert "Tried to allocate 2.50 GiB" in str(e.value.__cause__)


def test_out_of_memory_halves_the_chunk_and_makes_the_same_pictures(toy, monkeypatch):
    """DreamBooth's class pictures, 8 at a time: where 8 do not fit they come 4, then 2 at a time, the same pictures
    (each has its own seed); where one does not fit, sampling's advice."""
    from comfyui_finetune.trainers import sampling

    real, calls = sampling.sample, []

    def sample(model, prompt, *, seeds, **kw):
        calls.append(len(seeds))
        if len(seeds) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, prompt, seeds=seeds, **kw)

    monkeypatch.setattr(sampling, "sample", sample)
    kw = dict(steps=3, width=32, height=32)
    chunks = list(sampling.sample_in_chunks(toy, "a red circle", [5, 6, 7, 8, 9], 8, **kw))
    assert calls == [5, 4, 2, 2, 1] and [len(c) for c in chunks] == [2, 2, 1]
    alone = torch.cat([real(toy, "a red circle", seeds=[s], **kw) for s in (5, 6, 7, 8, 9)])
    assert torch.allclose(torch.cat(chunks), alone, atol=1e-4)
    def full(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sampling, "denoise", full)
    monkeypatch.setattr(sampling, "sample", real)
    with pytest.raises(torch.OutOfMemoryError, match="out of GPU memory sampling 1 picture at 32 x 32 px"):
        list(sampling.sample_in_chunks(toy, "a red circle", [5, 6], 2, **kw))


def test_cancel_stops_sampling(toy):
    host.request_interrupt()
    with pytest.raises(host.Interrupted):
        run_sample(toy, steps=20)
    assert not host.interrupted()  # the flag is consumed, the next run goes through
    assert run_sample(toy, steps=2).shape == (1, 32, 32, 3)


def test_stock_diffusers_pipeline_loads_the_toy_folder(judge):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS / "pipeline"), local_files_only=True)
    out = pipe(["a green circle"] * 4, num_inference_steps=20, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (4, 32, 32, 3)
    assert sum(r["color"] == "green" for r in judge.judge(torch.from_numpy(out.images))) >= 3


def test_diffusers_folder_from_models_dir(folders, toy):
    shutil.copytree(WEIGHTS / "pipeline", folders["models"] / "diffusers" / "my-toy")
    choices = FT_LoadBaseModel.INPUT_TYPES()["required"]["model_name"][0]
    assert "diffusers/my-toy" in choices
    (model,) = FT_LoadBaseModel().execute("diffusers/my-toy", "cpu", "fp32")
    assert model.family.name == "toy"
    assert torch.equal(run_sample(model, seed=5), run_sample(toy, seed=5))


def test_load_errors_name_the_file(folders):
    node = FT_LoadBaseModel()
    with pytest.raises(FileNotFoundError, match="diffusers model 'nope' was not found"):
        node.execute("diffusers/nope", "cpu", "auto")
    with pytest.raises(ValueError, match="without '..'"):
        node.execute("checkpoints/../../etc/passwd", "cpu", "auto")
    ckpt = folders["models"] / "checkpoints"
    ckpt.mkdir()
    (ckpt / "old.ckpt").write_bytes(b"not really")
    with pytest.raises(ValueError, match="only .safetensors checkpoints are loaded"):
        node.execute("checkpoints/old.ckpt", "cpu", "auto")
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(ckpt / "random.safetensors"))
    with pytest.raises(ValueError, match="random.safetensors: not a Stable Diffusion 1.x, 2.x or XL checkpoint"):
        node.execute("checkpoints/random.safetensors", "cpu", "auto")
    assert "checkpoints/random.safetensors" in FT_LoadBaseModel.INPUT_TYPES()["required"]["model_name"][0]
    (folders["models"] / "diffusers" / "broken").mkdir(parents=True)
    (folders["models"] / "diffusers" / "broken" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no .safetensors weights"):
        node.execute("diffusers/broken", "cpu", "auto")


def test_shipped_text_encoder_uses_the_common_key_layout(toy):
    """Every SD tool (and transformers 4) reads text-encoder weights as text_model.*; transformers 5 too."""
    from safetensors import safe_open

    with safe_open(str(WEIGHTS / "pipeline" / "text_encoder" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("text_model.") for k in keys)
        w = f.get_tensor("text_model.encoder.layers.0.self_attn.q_proj.weight")
    # in memory, transformers 4 keeps the text_model. level and transformers 5 drops it
    sd = toy.text_encoder.state_dict()
    (key,) = [k for k in sd if k in ("encoder.layers.0.self_attn.q_proj.weight",
                                     "text_model.encoder.layers.0.self_attn.q_proj.weight")]
    assert torch.equal(w, sd[key])



def small_vae():
    """A VAE of two narrow levels without attention: quick at 1024 px (the toy's attends over every latent pixel)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         mid_block_add_attention=False).eval()


def spied(toy, method: str, seen: list):
    """A share of the toy with the small VAE, whose ``method`` (encode / decode) records each call's batch."""
    model = toy.share()
    model.vae = small_vae()
    real = getattr(model.vae, method)
    setattr(model.vae, method, lambda x: seen.append(len(x)) or real(x))
    return model, real


@pytest.mark.parametrize("size,n,calls", [(32, 20, [20]), (512, 5, [4, 1]), (1024, 2, [1, 1])])
def test_pictures_are_decoded_a_few_at_a_time_by_their_size(toy, size, n, calls):
    """The VAE's activations grow with every pixel of one call: 16 pictures at 1024 px in one decode would need
    more memory than training (trainers/model/model.py VAE_PIXELS). Chunked, the pictures are the ones one call gives."""
    from comfyui_finetune.trainers.sampling import decode

    seen = []
    model, real = spied(toy, "decode", seen)
    f = model.vae_scale_factor
    lat = torch.randn(n, 4, size // f, size // f, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = decode(model, lat)
        whole = real(lat / model.vae.config.scaling_factor).sample  # in one call
    assert seen == calls
    whole = (whole.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert img.shape == (n, size, size, 3)
    assert float((img - whole).abs().max()) < 1e-4


def test_the_vae_decodes_in_its_own_dtype_under_a_trainings_autocast(toy):
    """Validation pictures are sampled inside the training's autocast; fp16 autocast would run an fp32 SDXL VAE's
    convolutions in fp16, where SDXL's VAE overflows (NaN, black pictures). The CPU's bf16 autocast shows the same:
    the pictures must be those decoded outside it."""
    from comfyui_finetune.trainers.sampling import decode

    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = decode(toy, lat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = decode(toy, lat)
    assert torch.equal(plain, under)


@pytest.mark.parametrize("size,n,calls", [(32, 20, [16, 4]), (512, 6, [4, 2]), (1024, 2, [1, 1])])
def test_pictures_are_encoded_a_few_at_a_time_by_their_size(toy, size, n, calls):
    from comfyui_finetune.trainers.loop.batches import encode_latent_dists

    seen = []
    model, real = spied(toy, "encode", seen)
    px = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, std = encode_latent_dists(model, {"b": px})["b"]
        whole = real(px).latent_dist  # in one call
    assert seen == calls
    assert float((mean - whole.mean).abs().max()) < 1e-4 and float((std - whole.std).abs().max()) < 1e-4
