"""The pack's library: pure torch / diffusers / transformers / peft / kornia. Never imports ComfyUI or nodes/."""
