#!/usr/bin/env bash
# The GPU checks of the pack in one command (a few minutes on one GPU): the cuda-marked tests, then the training-step
# benchmark against its floor (SD1.5 architecture at 512 px, SDXL architecture at 1024 px, batch 1 and 4, bf16),
# with and without gradient checkpointing. Run from the repository root on a machine with a CUDA GPU, in an
# environment where the pack is installed (pip install -e ".[test]"). Everything printed goes to $OUT/gpu_check.txt
# when OUT is set.
set -uo pipefail
log="${OUT:-.}/gpu_check.txt"
exec > >(tee "$log") 2>&1
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(),
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB", "| bf16:", torch.cuda.is_bf16_supported())
PY
echo "== tests marked cuda"
python -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py -k "not 1024_px" 2>&1 | tail -15
echo "== at 1024 px, batch 1: SDXL's FT_TrainLoRA defaults, then FT_Sample; FT_TrainDreamBooth's: each under 10 GB;"
echo "   Z-Image's FT_TrainLoRA defaults at rank 16, then FT_Sample: each under 16 GB"
python -m pytest -m cuda -q -s -p no:cacheprovider tests/test_cuda.py -k 1024_px 2>&1 | grep -E "SDXL|Z-Image|passed|failed|Error"
echo "== training step against the floor"
python benchmarks/train_step.py --device cuda --rounds 2 --steps 12 --warmup 4
echo "== the pack's model kept on the GPU (offload off)"
python benchmarks/train_step.py --device cuda --rounds 1 --steps 12 --warmup 4 --no-offload --case sd15:512:1
echo "== the same with gradient checkpointing"
python benchmarks/train_step.py --device cuda --rounds 1 --steps 12 --warmup 4 --checkpointing \
    --case sd15:512:4 --case sdxl:1024:1
