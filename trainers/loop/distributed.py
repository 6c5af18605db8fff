"""Several processes, one training: PyTorch DistributedDataParallel under ``torchrun``, nothing home-made.

``torchrun --nproc_per_node N python -m comfyui_finetune train CONFIG`` starts N processes with ``RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` set; :func:`init_from_env` joins them into one process group (NCCL with gloo beside
it on GPUs, gloo on CPUs). The loop then draws every *global* batch (``batch_size × N`` pictures) from one generator
that all ranks share, and each rank trains its own slice: the data, the noise and the timesteps of rank r are rows
r·b … (r+1)·b of what one process with batch ``N·b`` would draw, so N processes with batch b train what one process
with batch N·b trains (to float round-off). DDP all-reduces (averages) the gradients; only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes config, logs, checkpoints, samples and status."""
        return self.rank == 0

    def take(self, x):
        """This rank's rows of a global batch (a tensor or a list) of ``world × b`` rows."""
        if self.world == 1:
            return x
        n = len(x) // self.world
        return x[self.rank * n:(self.rank + 1) * n]


SINGLE = Shard()


def current() -> Shard:
    """The shard of this process: rank and world size of the initialised process group, or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return SINGLE


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> Shard:
    """Join the process group torchrun describes in the environment (a no-op for a single process)."""
    import torch.distributed as dist

    if not launched():
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return current()


def backend_for(device: str) -> str:
    """The process group's backend: NCCL for the gradients on GPUs, with gloo beside it for the CPU tensors the loop
    agrees on each step (:func:`mean`, :func:`agree`; NCCL alone refuses a CPU tensor, which stopped every multi-GPU
    run at its first step). Gloo alone on CPUs."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def device_for(shard: Shard, device: str) -> str:
    """Each rank on its own GPU (LOCAL_RANK), or the CPU."""
    if device.startswith("cuda") and shard.world > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean(value: float, shard: Shard) -> float:
    """The mean of ``value`` over all ranks."""
    if shard.world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / shard.world


def agree(flag: bool, shard: Shard) -> bool:
    """Rank 0's ``flag`` on every rank (Cancel and stop requests come from one place)."""
    if shard.world == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def share(obj, shard: Shard):
    """Rank 0's ``obj`` (any picklable value, such as a run folder's name) on every rank."""
    if shard.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if shard.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        import torch.distributed as dist

        dist.barrier()
