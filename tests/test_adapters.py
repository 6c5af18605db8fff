"""Adapters go through peft's own API: no module of the pack calls diffusers' or transformers' PEFT wrappers,
whose version gates broke text-encoder training once (transformers 5.24 refuses peft < 0.22)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACK = Path(__file__).resolve().parent.parent
#: the adapter methods diffusers' ModelMixin / loaders and transformers' PreTrainedModel add on top of peft
WRAPPERS = {"add_adapter", "load_adapter", "set_adapter", "set_adapters", "enable_adapters", "disable_adapters",
            "delete_adapters", "active_adapters", "get_adapter_state_dict", "load_lora_weights", "fuse_lora",
            "unfuse_lora", "unload_lora_weights", "load_lora_adapter", "save_lora_adapter", "set_lora_device",
            "enable_lora", "disable_lora"}
#: integration modules and helpers of diffusers / transformers around peft
#: diffusers' and transformers' peft glue (diffusers.loaders' single-file converters are not: they only map keys)
WRAPPER_MODULES = ("diffusers.utils.peft_utils", "diffusers.loaders.peft", "diffusers.loaders.lora",
                   "diffusers.loaders.unet", "transformers.integrations.peft")
WRAPPER_NAMES = {"recurse_remove_peft_layers", "scale_lora_layers", "unscale_lora_layers", "set_weights_and_activate_adapters",
                 "PeftAdapterMixin"}


def pack_modules() -> list[Path]:
    skip = {"tests", "benchmarks", "docs", "example_workflows", "web", "configs"}
    return sorted(p for p in PACK.rglob("*.py")
                  if not (set(p.relative_to(PACK).parts[:-1]) & skip) and not p.relative_to(PACK).parts[0].startswith("."))


def wrapper_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRAPPERS:
            # peft's own functions are called on the peft module, never as a method of a model
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "peft"):
                found.append(f"{path.name}:{node.lineno} .{node.func.attr}()")
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(WRAPPER_MODULES) or node.module == "diffusers.loaders":
                found.append(f"{path.name}:{node.lineno} from {node.module}")
            names = {a.name for a in node.names} & WRAPPER_NAMES
            if names:
                found.append(f"{path.name}:{node.lineno} imports {', '.join(sorted(names))}")
        if isinstance(node, ast.Attribute) and node.attr in WRAPPER_NAMES:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_module_of_the_pack_calls_a_peft_wrapper_of_diffusers_or_transformers():
    mods = pack_modules()
    assert len(mods) > 20 and any(p.name == "lora.py" for p in mods)
    uses = [u for p in mods for u in wrapper_uses(p)]
    assert not uses, "use peft's own API (trainers/adapters/tuners.py) instead of: " + "; ".join(uses)


def test_the_scan_finds_a_wrapper_call(tmp_path):
    """The scan above could fail: the code the pack had before it used peft directly is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from diffusers.utils import recurse_remove_peft_layers\n"
                   "from diffusers.loaders import PeftAdapterMixin\n"
                   "from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin\n"
                   "def setup(mod, cfg):\n    mod.add_adapter(cfg, adapter_name='x')\n")
    assert len(wrapper_uses(bad)) == 5  # the first import, the second twice (module and name), the third, the call


def test_text_encoder_lora_trains_with_the_wrappers_broken(toy, folders, monkeypatch):
    """With every wrapper raising (as transformers' version gate does), UNet + text-encoder LoRA still trains,
    exports kohya keys for both and takes itself out again, leaving the model as it was."""
    import diffusers
    import transformers

    from comfyui_finetune.trainers.adapters import tuners as adapters
    from comfyui_finetune.trainers.methods.lora import LoRAMethod

    def broken(*a, **k):
        raise AssertionError("a PEFT wrapper of diffusers / transformers was called")

    for cls in (diffusers.ModelMixin, transformers.PreTrainedModel):
        for name in WRAPPERS:
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, broken, raising=False)

    model = toy.clone()
    before = {n: (p.detach().clone(), p.requires_grad) for part in (model.unet, model.text_encoder)
              for n, p in part.named_parameters(prefix=type(part).__name__)}
    method = LoRAMethod(4, 4.0, "attention", train_text_encoder=True, text_encoder_lr=5e-4)
    method.setup(model)
    groups = method.param_groups(type("C", (), {"learning_rate": 1e-3})())
    assert [g["name"] for g in groups] == ["unet", "text_encoder"] and groups[1]["lr"] == 5e-4
    assert all(len(g["params"]) > 0 for g in groups)
    # a step through both parts moves both adapters
    opt = torch.optim.SGD([p for g in groups for p in g["params"]], lr=1.0)
    ids = model.tokenizer(["a red circle"], padding="max_length", max_length=model.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    text = model.text_encoder(ids)[0]
    cfg = model.unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    out = model.unet(x, torch.tensor([10]), encoder_hidden_states=text).sample
    out.pow(2).mean().backward()
    opt.step()
    lora = method.export("t")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up") for k in lora.state)
    assert any(k.startswith("lora_unet_") for k in lora.state)
    assert any(float(v.abs().sum()) > 0 for k, v in lora.state.items() if k.startswith("lora_te_") and "up" in k)
    # state round trip through peft's own functions
    st = method.trainable_state()
    method.load_trainable_state({k: torch.zeros_like(v) for k, v in st.items()})
    assert all(float(v.abs().sum()) == 0 for v in method.trainable_state().values())
    method.load_trainable_state(st)
    assert all(torch.equal(st[k], v) for k, v in method.trainable_state().items())
    with pytest.raises(ValueError, match="does not match this adapter setup"):
        method.load_trainable_state({**st, "unet.nope.lora_A.weight": torch.zeros(1)})

    method.remove()
    assert not adapters.has_adapters(model.unet) and not adapters.has_adapters(model.text_encoder)
    after = {n: (p.detach(), p.requires_grad) for part in (model.unet, model.text_encoder)
             for n, p in part.named_parameters(prefix=type(part).__name__)}
    assert after.keys() == before.keys()
    for n, (w, grad) in before.items():
        assert torch.equal(after[n][0], w) and after[n][1] == grad, n


def test_remove_with_merge_equals_the_adapted_output(toy):
    from peft import LoraConfig

    from comfyui_finetune.trainers.adapters import tuners as adapters

    net = toy.clone().text_encoder
    ids = torch.tensor([[1, 5, 7, 2]])
    adapters.inject(net, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights="gaussian"), "a")
    for p in adapters.parameters(net, "a"):
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        adapted = net(ids)[0]
        adapters.remove(net, merge=True)
        merged = net(ids)[0]
    assert not adapters.has_adapters(net)
    assert torch.allclose(adapted, merged, atol=1e-5)
