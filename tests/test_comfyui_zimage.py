"""Z-Image in a real ComfyUI (runs when COMFYUI_PATH points at a checkout; slow): a shallow, full-width Z-Image
transformer (one main layer and two noise and two context refiners at width 3840, each layer the real one: ComfyUI
derives only the depth from the weights, so this is the smallest it loads), written by the pack in ComfyUI's native
layout, loads in UNETLoader's ``load_diffusion_model`` as ComfyUI's ZImage with no missing or unexpected key; a LoRA,
LoHa, LoKr and DoRA over its attention, feed-forward and modulation, written by the pack, load through
``load_lora_for_models`` (LoraLoaderModelOnly's function) with no "lora key not loaded", and the weights ComfyUI patches
(its fused qkv included) equal the pack's merged ones, at strength 1 and 0.6.

The caption width is the toy's (64): the LoRA's arithmetic does not depend on it. The end-to-end graphs (a random
full Qwen3-4B, KSampler, VAEDecode, the bridges) are test_comfyui_zimage_graph.py's."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from comfy_server import comfyui_path, skip_reason

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(comfyui_path() is None, reason=skip_reason())]

#: the weights compared: one of each kind of adapted layer, in each kind of block
COMPARED = ("layers.0.attention.qkv.weight", "layers.0.attention.out.weight", "layers.0.feed_forward.w1.weight",
            "layers.0.feed_forward.w2.weight", "layers.0.adaLN_modulation.0.weight",
            "noise_refiner.1.attention.qkv.weight", "context_refiner.0.feed_forward.w3.weight")

PROBE = """
import json, logging, sys
dit_path, lora_path, ref_path, strengths = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.argv = [sys.argv[0], '--cpu']  # ComfyUI reads its flags when imported
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.lora, comfy.sd, comfy.utils
said = []
class Catch(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
logging.getLogger().addHandler(Catch())
logging.getLogger().setLevel(logging.INFO)
model = comfy.sd.load_diffusion_model(dit_path, model_options={'dtype': torch.float32})
kind = type(model.model.model_config).__name__
lora, ref = comfy.utils.load_torch_file(lora_path), comfy.utils.load_torch_file(ref_path)
worst = 0.0
sd = model.model.diffusion_model.state_dict()
for s in strengths:
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, s, 0)  # LoraLoaderModelOnly's call
    for k in [k[len(f'pack{s}.'):] for k in ref if k.startswith(f'pack{s}.')]:
        # the weight as ComfyUI patches it when it loads the model: its own calculate_weight over the patches
        got = comfy.lora.calculate_weight(patched.patches['diffusion_model.' + k], sd[k].clone().float(), k)
        want = ref[f'pack{s}.' + k]
        worst = max(worst, float((got - want).abs().max() / (want.abs().max() + 1e-12)))
    n_patched = len(patched.patches)
print(json.dumps({'class': kind, 'worst': worst, 'patched': n_patched,
                  'not_loaded': [m for m in said if 'lora key not loaded' in m],
                  'missing': [m for m in said if 'unet missing' in m or 'unet unexpected' in m]}))
"""


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    """The pack's shallow full-width Z-Image (the toy's VAE, Qwen3 and tokenizer around it), and its transformer
    written in ComfyUI's layout (fp32)."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    from comfyui_finetune.trainers.families.zimage_native import to_native
    from comfyui_finetune.trainers.model.model import FTModel
    from comfyui_finetune.trainers.toy.loader import load_toy_zimage_model

    toy = load_toy_zimage_model()
    torch.manual_seed(0)
    with torch.inference_mode(False):
        dit = ZImageTransformer2DModel(dim=3840, n_layers=1, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                                       cap_feat_dim=64).eval()
    model = FTModel("zimage", "shallow", dit, toy.vae, toy.text_encoder, toy.tokenizer, dict(toy.scheduler_config))
    path = tmp_path_factory.mktemp("zimage") / "shallow-zimage.safetensors"
    save_file({k: v.contiguous() for k, v in to_native(dit.state_dict()).items()}, str(path))
    return model, path


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_comfyui_loads_the_packs_z_image_and_patches_each_kind_as_the_pack_merges_it(shallow, tmp_path, kind):
    from safetensors.torch import save_file

    from comfyui_finetune.trainers.config.recipes import LoRARecipe
    from comfyui_finetune.trainers.families.zimage_native import to_native
    from comfyui_finetune.trainers.methods.lora import LoRAMethod, attach_lora
    from comfyui_finetune.trainers.model.deltas import plain_state_dict

    model, dit_path = shallow
    with torch.inference_mode(False):
        method = LoRAMethod(4, 3.0, "attention+feedforward+adaln", kind=kind)
        work = model.share()
        method.setup(work)
        g = torch.Generator().manual_seed(1)
        for grp in method.param_groups(LoRARecipe()):
            for p in grp["params"]:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p.abs().mean() if p.shape[0] == 1 else 0.0))
        lora = method.result("probe", {})
    assert all(k.startswith("diffusion_model.") for k in lora.state)
    ref = {}
    base = to_native(plain_state_dict(model.unet))
    for s in (1.0, 0.6):
        merged = to_native(plain_state_dict(attach_lora(model.share(), lora, s).unet))
        ref.update({f"pack{s}.{k}": merged[k].float().contiguous() for k in COMPARED})
        del merged
        gc.collect()
    moved = min(float((ref[f"pack1.0.{k}"] - base[k]).abs().max()) for k in COMPARED)
    assert moved > 1e-4, "the adapter must change every compared weight"
    save_file(lora.state, str(tmp_path / "lora.safetensors"))
    save_file(ref, str(tmp_path / "ref.safetensors"))
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", PROBE, str(dit_path),
                          str(tmp_path / "lora.safetensors"), str(tmp_path / "ref.safetensors"), "[1.0, 0.6]"],
                         cwd=comfyui_path(), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{kind}: ComfyUI loaded the pack's transformer as {res['class']} and patched {res['patched']} weights; "
          f"worst relative difference to the pack's merge {res['worst']:.2e}")
    assert res["class"] == "ZImage" and not res["missing"], res["missing"][:3]
    assert not res["not_loaded"], res["not_loaded"][:3]
    assert res["worst"] < 1e-5
    weights = to_native({m.removeprefix("diffusion_model.") + ".weight": torch.zeros(1) for m in lora.modules()})
    assert res["patched"] == len(weights) == 28, "one patch per adapted weight (q, k and v share the fused qkv)"


TOKENS = """
import json, sys
sys.argv = [sys.argv[0], '--cpu']
import comfy.options
comfy.options.enable_args_parsing()
import comfy.text_encoders.z_image as z
tok = z.ZImageTokenizer()
out = {}
for p in json.loads(sys.stdin.read()):
    out[p] = [int(t[0]) for batch in tok.tokenize_with_weights(p)['qwen3_4b'] for t in batch]
print(json.dumps(out))
"""


def test_prompts_are_the_token_ids_comfyuis_z_image_tokenizer_gives():
    """The pack's Z-Image prompts (ComfyUI's own Qwen vocabulary, the chat template) are the token ids ComfyUI's
    ZImageTokenizer feeds the text encoder."""
    from comfyui_finetune.trainers.families.zimage import TEMPLATE
    from comfyui_finetune.trainers.model.zimage_files import _tokenizer

    prompts = ["a photo of a sks dog", "", "Ein Hund im Schnee, 4k, <lora:x>", "a red circle on a white background"]
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", TOKENS], input=json.dumps(prompts),
                         cwd=comfyui_path(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    tok = _tokenizer(comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer")
    for p in prompts:
        assert tok(TEMPLATE.format(p)).input_ids == theirs[p], p
