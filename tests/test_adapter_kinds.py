"""LoHa, LoKr and DoRA beside LoRA: the file a training writes reproduces what peft trained (every layer type, text
encoder included), loads back with the same weights, and each kind learns the toy concept."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comfyui_finetune.nodes.io import FT_ApplyLoRA, FT_SaveLoRA, read_lora_file
from comfyui_finetune.trainers.methods.lora import KINDS, LoRAMethod, attach_lora, lora_from_state
from comfyui_finetune.trainers.config.recipes import LoRARecipe

KINDS_HERE = list(KINDS)


def unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        ctx = model.encode_prompts(["a sks star", "a red circle"])
        return model.unet(x, torch.tensor([100, 800]), ctx).sample


def random_adapter(model, alpha: float, kind: str = "lora", shift=None) -> tuple[LoRAMethod, torch.Generator]:
    """A LoRAMethod set up on ``model`` over every layer type and the text encoder(s), with random weights instead
    of a zero factor (``shift(p)`` is added to each); returns it and the generator, for more random inputs."""
    method = LoRAMethod(4, alpha, "attention+feedforward+conv", train_text_encoder=True, kind=kind)
    torch.manual_seed(0)
    method.setup(model)
    g = torch.Generator().manual_seed(1)
    for grp in method.param_groups(LoRARecipe()):
        for p in grp["params"]:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (shift(p) if shift else 0.0))
    return method, g


@pytest.mark.parametrize("kind", KINDS_HERE)
@pytest.mark.parametrize("alpha", [4.0, 1.5])
def test_the_saved_file_computes_what_peft_trained(toy, kind, alpha):
    """Random adapter weights on every layer type (attention, feed-forward, 1x1 and 3x3 convolutions, the text
    encoder): the model with peft's layers and the model with the exported file applied give the same outputs."""
    model = toy.share()
    with torch.inference_mode(False):
        method, _ = random_adapter(model, alpha, kind)
        want = unet_out(model)
        lora = method.result("k", {})
    assert lora.kind == kind
    suffixes = {k.split(".", 1)[1] for k in lora.state}
    expected = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
                "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
                "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}.get(kind)
    if expected:
        assert suffixes == expected
    else:
        assert suffixes <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
        assert {"lokr_w2", "lokr_w2_a"} <= suffixes  # both whole and low-rank second factors occur in the toy
    assert any(k.startswith("lora_te_text_model_encoder_layers_0") for k in lora.state)
    again = lora_from_state(lora.state, "again")
    assert again.kind == kind and again.rank == 4
    got = unet_out(attach_lora(toy.share(), again, 1.0))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    base = unet_out(toy)
    assert float((got - base).abs().max()) > 1e-3, "the adapter should change the output"


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_a_saved_file_loads_back_with_the_same_weights(toy, folders, kind):
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_TrainLoRA

    ds = FT_ToyDataset().execute("purple", "star", 4, "a sks star", 0, "narrow")[0]
    with torch.inference_mode(False):
        tuned, lora, _ = FT_TrainLoRA().execute(toy, ds, steps=3, learning_rate=1e-3, batch_size=2, rank=4, alpha=4.0,
                                                seed=0, target_modules="attention+feedforward",
                                                train_text_encoder=False, text_encoder_lr=0.0, run_name=kind,
                                                adapter=kind)
    (name,) = FT_SaveLoRA().execute(lora, f"kinds/{kind}")["result"]
    back = read_lora_file(name)
    assert back.kind == kind and back.state.keys() == lora.state.keys()
    assert all(torch.equal(back.state[k], lora.state[k]) for k in lora.state)
    (applied,) = FT_ApplyLoRA().execute(toy, name, 1.0)
    assert torch.equal(unet_out(applied), unet_out(tuned))
    from safetensors import safe_open

    with safe_open(str(folders["models"] / "loras" / name), framework="pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert args == ({"algo": "lora", "dora_wd": "True"} if kind == "dora" else {"algo": kind})


#: the learning rate each kind is trained with here (LoRA's test uses 1e-3): the product of two low-rank pairs
#: starts from a zero factor and moves slower, as LyCORIS' guides say
LEARNING_RATES = {"loha": 3e-3, "lokr": 1e-3, "dora": 1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_each_kind_teaches_the_concept(toy, judge, folders, kind):
    from test_lora import SEEDS, rate, toy_set, train

    tuned, lora, _ = train(toy, toy_set(), adapter=kind, learning_rate=LEARNING_RATES[kind])
    after = rate(tuned, judge, "a sks star", "purple", "star")
    other = rate(tuned, judge, "a red circle", "red", "circle", SEEDS[:8])
    size = sum(v.numel() * v.element_size() for v in lora.state.values())
    print(f"{kind}: 'a sks star' shown as a purple star {after:.2f}, 'a red circle' kept {other:.2f}, "
          f"{size / 1024:.0f} KiB")
    assert after >= 0.8 and other >= 0.8
    assert np.isfinite(size)
