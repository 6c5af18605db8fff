"""comfyui-finetune: fine-tune Stable Diffusion (LoRA, Textual Inversion, DreamBooth, ControlNet) in ComfyUI.

Importing the pack loads no model and imports no torch: the node classes import the library lazily.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.routes import register as _register_routes

_register_routes()  # the runs panel's read-only /finetune/ routes, when ComfyUI's server is running; else nothing

WEB_DIRECTORY = "./web"
__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
