"""Stand-ins for the parts of ComfyUI the bridges call, written from ComfyUI's own sources, for the versions no
ComfyUI checkout here can run. Only what the bridges depend on is reproduced: where a LoRA's patches live, what each
call takes and returns, and whether a loader copies or assigns the tensors it is given.

- **0.8.0** (the ComfyUI the real-ComfyUI suites run): ``ModelPatcher`` has no ``state_dict_for_saving``;
  ``load_models_gpu(..., force_patch_weights=True)`` patches the weights in place;
  ``BaseModel.state_dict_for_saving(clip_sd, vae_sd, clip_vision_sd)`` reads the diffusion model itself;
  ``load_state_dict_guess_config`` copies into weights of its own.
- **0.38.x** (Comfy-Org/ComfyUI: comfy/model_patcher.py @08d0e51, comfy/model_base.py @094c74c, comfy/sd.py
  @033046c): ``BaseModel.state_dict_for_saving(unet_sd, clip_sd=None, vae_sd=None, ...)`` takes the UNet first;
  ``ModelPatcher.state_dict_for_saving(clip_sd, vae_sd, clip_vision_sd)`` wraps every weight whose patches are not
  applied in a ``LazyCastingParam`` (a Parameter over the *unpatched* tensor whose ``device`` is a stand-in and whose
  ``.to()`` returns the patched weight); ``CLIP.state_dict_for_saving()`` does the same for the text encoder while
  ``CLIP.get_sd()`` returns its unpatched weights; ``ModelPatcherDynamic`` (Dynamic VRAM) asserts ``not
  force_patch_weights`` and never patches in place; ``load_state_dict_guess_config`` gained ``disable_dynamic`` and,
  under Dynamic VRAM, loads with ``assign=True``.
"""
from __future__ import annotations

import collections
import sys
import types

import torch

FakeDevice = collections.namedtuple("FakeDevice", ["type", "index"])("comfy-lazy-caster", 0)


class LazyCastingParam(torch.nn.Parameter):
    """0.38's: the tensor underneath is the unpatched weight; moving it applies the patches."""

    def __new__(cls, patcher, key, tensor):
        return super().__new__(cls, tensor, requires_grad=False)

    def __init__(self, patcher, key, tensor):
        self.patcher, self.key = patcher, key

    @property
    def device(self):
        return FakeDevice

    def to(self, *args, **kwargs):
        return self.patcher.patch_weight_to_device(self.key, return_weight=True).to("cpu")


class BaseModel:
    """comfy.model_base.BaseModel: the diffusion model and the saving of a whole checkpoint."""

    def __init__(self, diffusion_model: torch.nn.Module, unet_first: bool):
        self.diffusion_model, self.unet_first = diffusion_model, unet_first

    def _whole(self, unet_state_dict, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        out = {"model.diffusion_model." + k: v for k, v in unet_state_dict.items()}
        out.update({"cond_stage_model." + k: v for k, v in (clip_state_dict or {}).items()})
        out.update({"first_stage_model." + k: v for k, v in (vae_state_dict or {}).items()})
        return out

    def state_dict_for_saving(self, *args, **kw):
        if self.unet_first:  # 0.38: (unet_state_dict, clip_state_dict=None, vae_state_dict=None, ...)
            return self._whole(*args, **kw)
        # 0.8: (clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None), the UNet read here
        return self._whole(self.diffusion_model.state_dict(), *args, **kw)


class ModelPatcher:
    """comfy.model_patcher.ModelPatcher over one module, with LoRA-like patches (a delta added to a weight)."""

    def __init__(self, module: torch.nn.Module, patches: dict[str, torch.Tensor], dynamic: bool = False):
        self.module, self.patches, self.dynamic = module, patches, dynamic
        self.patched_in_place = False

    def patch_weight_to_device(self, key, return_weight=False):
        weight = self.module.state_dict()[key]
        patched = weight + self.patches[key] if key in self.patches else weight
        if return_weight:
            return patched
        with torch.no_grad():
            weight.copy_(patched)

    def load(self, force_patch_weights=False):
        if self.dynamic:  # ModelPatcherDynamic.load / partially_load
            assert not force_patch_weights
            return
        if not self.patched_in_place:  # a full load applies every patch to the weights
            for key in self.patches:
                self.patch_weight_to_device(key)
            self.patched_in_place = True

    def weights_for_saving(self) -> dict:
        """0.38's wrapping: weights whose patches are not applied come out lazily."""
        sd = self.module.state_dict()
        if self.patched_in_place:
            return sd
        return {k: LazyCastingParam(self, k, v) if k in self.patches else v for k, v in sd.items()}


class ModelPatcher038(ModelPatcher):
    def __init__(self, module, patches, dynamic=False):
        super().__init__(module, patches, dynamic)
        self.model = BaseModel(module, unet_first=True)

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        return self.model.state_dict_for_saving(self.weights_for_saving(), clip_state_dict=clip_state_dict,
                                                vae_state_dict=vae_state_dict)


class ModelPatcher08(ModelPatcher):
    def __init__(self, module, patches):
        super().__init__(module, patches)
        self.model = BaseModel(module, unet_first=False)


class CLIP:
    def __init__(self, patcher: ModelPatcher, saving_api: bool):
        self.patcher = patcher
        if saving_api:  # 0.38: CLIP.state_dict_for_saving (get_sd stays the unpatched weights)
            self.state_dict_for_saving = patcher.weights_for_saving

    def load_model(self):
        return self.patcher

    def get_sd(self):
        return self.patcher.module.state_dict()


class VAE:
    def __init__(self, module):
        self.module = module

    def get_sd(self):
        return self.module.state_dict()


def load_models_gpu(models, memory_required=0, force_patch_weights=False, **kw):
    for m in models:
        m.load(force_patch_weights=force_patch_weights)


def comfy_modules(assigns: bool) -> dict[str, types.ModuleType]:
    """``comfy`` and ``comfy.model_management`` / ``comfy.sd`` for sys.modules. ``comfy.sd.loaded`` records the
    state dicts the loader was given; with ``assigns`` (0.38 under Dynamic VRAM) it keeps their tensors as its
    weights, otherwise (0.8) it copies them."""
    comfy, mm, sd = (types.ModuleType(n) for n in ("comfy", "comfy.model_management", "comfy.sd"))
    mm.load_models_gpu = load_models_gpu
    sd.loaded = []

    def guess_config_038(state, output_vae=True, output_clip=True, output_clipvision=False, embedding_directory=None,
                         output_model=True, model_options={}, te_model_options={}, metadata=None,
                         disable_dynamic=False):
        sd.loaded.append(dict(state) if assigns and not disable_dynamic else {k: v.clone() for k, v in state.items()})
        return None

    def guess_config_08(state, output_vae=True, output_clip=True, output_clipvision=False, embedding_directory=None,
                        output_model=True, model_options={}, te_model_options={}, metadata=None):
        sd.loaded.append({k: v.clone() for k, v in state.items()})
        return None

    sd.load_state_dict_guess_config = guess_config_038 if assigns else guess_config_08
    comfy.model_management, comfy.sd = mm, sd
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.sd": sd}


def install(monkeypatch, assigns: bool = False) -> types.ModuleType:
    """Put the fake ComfyUI modules in sys.modules for one test; returns ``comfy.sd``."""
    mods = comfy_modules(assigns)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods["comfy.sd"]
