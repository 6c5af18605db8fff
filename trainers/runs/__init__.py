"""Run folders and the files a run writes: checkpoints, logs, reports, safetensors written atomically."""
