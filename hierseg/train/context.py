"""Distributed context: who am I, how many are we, which device; the same for every launcher."""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hierseg.spec import JobSpec


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str
    owns_process_group: bool
    """True when hierseg created the process group (torchrun) and must destroy it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _device(use_gpu: bool, local_rank: int) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.use_gpu is true but CUDA is not available on this worker")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_context(spec: JobSpec, launcher: str) -> DistContext:
    """Join (or create) the process group for this launcher and pick the device."""
    if launcher == "ray":
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device() if spec.run.use_gpu else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), device, launcher, False)
    if launcher == "torchrun":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = _device(spec.run.use_gpu, local_rank)
        if world != spec.run.num_workers:
            warnings.warn(
                f"run.num_workers={spec.run.num_workers} is ignored under torchrun, which started {world} "
                "processes; the global batch size stays data.batch_size",
                stacklevel=2,
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30), device_id=device if backend == "nccl" else None)
        return DistContext(rank, world, local_rank, device, launcher, True)
    assert launcher == "local", launcher
    return DistContext(0, 1, 0, _device(spec.run.use_gpu, 0), launcher, False)


def close_context(ctx: DistContext) -> None:
    if ctx.owns_process_group and dist.is_initialized():
        # A DDP reducer freed after its process group is destroyed aborts the process at exit ("terminate
        # called without an active exception"): a finished gloo job would exit with SIGABRT. Collect the
        # model's reference cycles while the group still exists.
        gc.collect()
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process)."""
    if ctx.distributed:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: object, ctx: DistContext) -> list[object]:
    if not ctx.distributed:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
