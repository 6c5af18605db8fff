"""All nodes of the pack. One list; both ComfyUI mappings are built from it.

Only the standard library is imported here: torch, diffusers and the trainers load when a node first runs.
"""
from __future__ import annotations

from . import host
from .audio import (FT_AudioToSpectrogram, FT_DatasetFromAudio, FT_JudgeAudio, FT_LoadAudioDataset,
                    FT_SpectrogramToAudio, FT_ToyAudioDataset)
from .bridges import FT_ApplyLoRAToComfy, FT_ModelFromComfy, FT_ModelToComfy
from .controlnet import (FT_ApplyControlNet, FT_CannyEdges, FT_Grayscale, FT_LoadControlNet, FT_SaveControlNet,
                         FT_Scribble, FT_SoftEdges, FT_TileBlur)
from .datasets import FT_Augment, FT_DatasetFromImages, FT_DatasetPreview, FT_LoadImageDataset, FT_ToyDataset
from .evaluate import (FT_CLIPImageSimilarity, FT_CLIPScore, FT_CompareGrid, FT_EvalReport, FT_KID, FT_LoadCLIPScorer,
                       FT_LossPlot)
from .io import FT_ApplyEmbedding, FT_ApplyLoRA, FT_SaveCheckpoint, FT_SaveEmbedding, FT_SaveLoRA
from .models import FT_LoadBaseModel, FT_LoadZImage
from .sample import FT_Sample
from .train import (FT_DreamBoothSubject, FT_TrainControlNet, FT_TrainDreamBooth, FT_TrainLoRA,
                    FT_TrainTextualInversion)

#: (class, display name). Node ids are the class names; never rename one (shared workflows would break):
#: add an alias entry instead.
NODES = [
    (FT_LoadBaseModel, "Load Base Model (finetune)"),
    (FT_LoadZImage, "Load Z-Image (finetune)"),
    (FT_Sample, "Sample (finetune)"),
    (FT_LoadImageDataset, "Load Image Dataset (finetune)"),
    (FT_DatasetFromImages, "Dataset from Images (finetune)"),
    (FT_ToyDataset, "Toy Dataset (finetune)"),
    (FT_Augment, "Augment Dataset (finetune)"),
    (FT_DatasetPreview, "Dataset Preview (finetune)"),
    (FT_TrainLoRA, "Train LoRA (finetune)"),
    (FT_SaveLoRA, "Save LoRA (finetune)"),
    (FT_ApplyLoRA, "Apply LoRA (finetune)"),
    (FT_TrainTextualInversion, "Train Textual Inversion (finetune)"),
    (FT_TrainDreamBooth, "Train DreamBooth (finetune)"),
    (FT_DreamBoothSubject, "DreamBooth Subject (finetune)"),
    (FT_SaveEmbedding, "Save Embedding (finetune)"),
    (FT_SaveCheckpoint, "Save Checkpoint (finetune)"),
    (FT_ApplyEmbedding, "Apply Embedding (finetune)"),
    (FT_LossPlot, "Loss Plot (finetune)"),
    (FT_CannyEdges, "Canny Edges (finetune)"),
    (FT_SoftEdges, "Soft Edges (finetune)"),
    (FT_Scribble, "Scribble (finetune)"),
    (FT_TileBlur, "Tile Blur (finetune)"),
    (FT_Grayscale, "Grayscale (finetune)"),
    (FT_LoadControlNet, "Load ControlNet (finetune)"),
    (FT_ApplyControlNet, "Apply ControlNet (finetune)"),
    (FT_TrainControlNet, "Train ControlNet (finetune)"),
    (FT_SaveControlNet, "Save ControlNet (finetune)"),
    (FT_LoadCLIPScorer, "Load CLIP Scorer (finetune)"),
    (FT_CLIPScore, "CLIP Score / CLIP-T (finetune)"),
    (FT_CLIPImageSimilarity, "CLIP Image Similarity / CLIP-I (finetune)"),
    (FT_KID, "KID (finetune)"),
    (FT_CompareGrid, "Compare Grid (finetune)"),
    (FT_EvalReport, "Eval Report (finetune)"),
    (FT_AudioToSpectrogram, "Audio to Spectrogram (finetune)"),
    (FT_SpectrogramToAudio, "Spectrogram to Audio (finetune)"),
    (FT_LoadAudioDataset, "Load Audio Dataset (finetune)"),
    (FT_DatasetFromAudio, "Dataset from Audio (finetune)"),
    (FT_ToyAudioDataset, "Toy Audio Dataset (finetune)"),
    (FT_JudgeAudio, "Judge Audio (finetune)"),
]
#: the bridges to ComfyUI's MODEL / CLIP / VAE call its own loaders: registered only inside ComfyUI
BRIDGES = [
    (FT_ApplyLoRAToComfy, "Apply LoRA to ComfyUI Model (finetune)"),
    (FT_ModelFromComfy, "Model from ComfyUI (finetune)"),
    (FT_ModelToComfy, "Model to ComfyUI (finetune)"),
]
if host.in_comfyui():
    NODES += BRIDGES

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: name for cls, name in NODES}
