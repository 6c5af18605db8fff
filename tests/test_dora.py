"""DoRA (input-axis weight decomposition): the trained layers compute the DoRA formula written out here, start as the
base model, train their magnitudes, resume bit-exact, and files from other tools (output-axis ``dora_scale``) apply
with ComfyUI's rule. ``tests/test_comfyui.py`` checks the pack's merged weights against ComfyUI's own code."""
from __future__ import annotations

import pytest
import torch

from comfyui_finetune.nodes import host
from comfyui_finetune.trainers.adapters import tuners as adapters, dora
from comfyui_finetune.trainers.model.deltas import DecomposedDelta, LowRankDelta, attach
from comfyui_finetune.trainers.methods.lora import LoRAMethod, lora_from_state

from test_lora import toy_set, train


def dora_weight(w, down, up, scale, m):
    """The DoRA paper's weight with the magnitude per input column: m * V / ||V||_c, V = W + scale * up @ down."""
    v = w + scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    col = torch.sqrt((v ** 2).sum(dim=[d for d in range(v.ndim) if d != 1], keepdim=True))
    return v * m.reshape(col.shape) / (col + torch.finfo(torch.float32).eps)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.lin(x).permute(0, 3, 1, 2))


def dora_net(alpha=2.0):
    from peft import LoraConfig

    net = Net()
    with torch.no_grad():
        base = {k: v.clone() for k, v in net.state_dict().items()}
    adapters.inject(net, LoraConfig(r=2, lora_alpha=alpha, target_modules=["lin", "conv"]), "a")
    mags = dora.Magnitudes(net, "a")
    return net, mags, base


def test_the_layers_compute_the_dora_formula_and_start_as_the_base():
    net, mags, base = dora_net()
    x = torch.randn(3, 4, 4, 6)
    with torch.no_grad():
        want0 = torch.nn.functional.conv2d(
            torch.nn.functional.linear(x, base["lin.weight"], base["lin.bias"]).permute(0, 3, 1, 2),
            base["conv.weight"], base["conv.bias"], padding=1)
        assert torch.allclose(net(x), want0, atol=1e-6), "with lora_B at zero the model is the base model"
        g = torch.Generator().manual_seed(1)
        for p in adapters.parameters(net, "a") + mags.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        lin, conv = net.lin, net.conv
        wl = dora_weight(base["lin.weight"], lin.lora_A["a"].weight, lin.lora_B["a"].weight, 1.0,
                         lin.ft_dora_scale)
        wc = dora_weight(base["conv.weight"], conv.lora_A["a"].weight, conv.lora_B["a"].weight, 1.0,
                         conv.ft_dora_scale)
        want = torch.nn.functional.conv2d(torch.nn.functional.linear(x, wl, base["lin.bias"]).permute(0, 3, 1, 2),
                                          wc, base["conv.bias"], padding=1)
        assert torch.allclose(net(x), want, atol=1e-5), float((net(x) - want).abs().max())
    assert lin.ft_dora_scale.shape == (1, 6) and conv.ft_dora_scale.shape == (1, 5, 1, 1)


def test_the_magnitudes_get_gradients_and_leave_with_the_adapter():
    net, mags, base = dora_net()
    net(torch.randn(2, 4, 4, 6)).square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in mags.parameters())
    mags.remove()
    adapters.remove(net)
    assert not hasattr(net.lin, dora.ATTR) and not adapters.has_adapters(net)
    assert all(torch.equal(net.state_dict()[k], base[k]) for k in base)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_an_output_axis_file_applies_with_comfyuis_rule(strength):
    """peft-style (out, 1) magnitudes, as other trainers write them: ComfyUI divides by the norm of the weight
    *before* the change, and strength moves from the weight to the decomposed result."""
    torch.manual_seed(2)
    w, down, up, m = torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2), torch.rand(5, 1) + 0.5
    lin = torch.nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    attach(lin, DecomposedDelta(LowRankDelta(down, up, 0.5), m, strength))
    merged = w + 0.5 * up @ down
    full = merged * m / (w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    assert torch.allclose(lin.weight, w + strength * (full - w), atol=1e-6)


def test_a_dora_run_resumes_bit_exact_with_an_average(toy, folders, monkeypatch, press_cancel_at):
    ds = toy_set(n=4)
    kw = dict(steps=6, batch_size=2, train_text_encoder=True, save_every=0, adapter="dora", ema_decay=0.9,
              target_modules="attention+feedforward+conv")
    tuned, straight, _ = train(toy, ds, run_name="dora_straight", **kw)
    press_cancel_at(3)
    with pytest.raises(host.Interrupted):
        train(toy, ds, run_name="dora_stopped", **kw)
    monkeypatch.undo()
    _, resumed, log = train(toy, ds, run_name="ignored", resume_run="dora_stopped", **kw)
    assert log.resumed_from == 3 and straight.kind == "dora"
    scales = [k for k in straight.state if k.endswith(".dora_scale")]
    assert len(scales) == len({k.split(".")[0] for k in straight.state})  # every module has its magnitude
    assert any(k.startswith("lora_te_") for k in scales)
    for k in straight.state:
        assert torch.equal(straight.state[k], resumed.state[k]), k
    again = lora_from_state(straight.state, "again")
    assert again.kind == "dora" and again.rank == 8


def test_every_adapted_layer_gets_a_magnitude_and_remove_restores_the_model(toy):
    method = LoRAMethod(4, 4.0, kind="dora")
    model = toy.share()
    with torch.inference_mode(False):
        method.setup(model)
    assert set(method.magnitudes) == {"unet"}
    assert len(method.magnitudes["unet"].layers) == len([k for k in method.trainable_state() if "lora_A" in k])
    method.remove()
    assert not adapters.has_adapters(model.unet)


def test_dreambooth_and_pivotal_tuning_train_a_dora_that_reloads(toy, folders):
    """DreamBooth's lora mode (here with pivotal tuning) trains the DoRA kind too, and the saved file, applied
    with its embedding, draws what the training drew."""
    from comfyui_finetune.nodes.io import FT_ApplyEmbedding, FT_ApplyLoRA, FT_SaveEmbedding, FT_SaveLoRA
    from comfyui_finetune.trainers import sampling

    from test_dreambooth import db, stars

    tuned, lora, _, emb = db(toy, stars(), instance_prompt="a <dv> star", mode="lora", learning_rate=2e-3,
                             steps=4, pivotal_tuning=True, embedding_lr=2e-2, adapter="dora")
    assert lora.kind == "dora" and any(k.endswith(".dora_scale") for k in lora.state)
    (lname,) = FT_SaveLoRA().execute(lora, "dv/lora")["result"]
    (ename,) = FT_SaveEmbedding().execute(emb, "dv/embedding")["result"]
    (rebuilt,) = FT_ApplyEmbedding().execute(toy, ename, "<dv>")
    (rebuilt,) = FT_ApplyLoRA().execute(rebuilt, lname, 1.0)
    with torch.inference_mode(False):
        a = sampling.sample(tuned, "a <dv> star", seeds=[1], steps=6)
        b = sampling.sample(rebuilt, "a <dv> star", seeds=[1], steps=6)
    assert float((a - b).abs().max()) < 1e-4
