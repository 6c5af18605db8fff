"""All nodes of the pack. One list; both ComfyUI mappings are built from it.

Only the standard library is imported here: torch, diffusers and the trainers load when a node first runs.
"""
from __future__ import annotations

from .models import FT_LoadBaseModel
from .sample import FT_Sample

#: (class, display name). Node ids are the class names; never rename one (shared workflows would break):
#: add an alias entry instead.
NODES = [
    (FT_LoadBaseModel, "Load Base Model (finetune)"),
    (FT_Sample, "Sample (finetune)"),
]

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: name for cls, name in NODES}
