"""Training-step throughput of the default U-Net by precision and memory format, side by side.

    python bench/step.py                      # CPU: fp32 only
    torchrun --standalone --nproc_per_node 1 bench/step.py --gpu   # GPU: NCCL + DDP, fp32 / bf16 / bf16+channels_last

Each configuration runs the real hierseg ``train_step`` (DDP under torchrun, masked hierarchical loss
with the all-reduced valid count, AdamW, clipping) over the same in-memory batches of synthetic
shards; medians of timed rounds, reported as patches/s and as a ratio to fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hierseg.data.synth import ensure_synthetic
from hierseg.spec import validate_spec
from hierseg.train.context import init_context
from hierseg.train.loop import build_job, train_step


def make_spec(out: Path, args: argparse.Namespace, precision: str, channels_last: bool) -> dict:
    return {
        "data": {
            "train": str(out / "train"),
            "val": str(out / "val"),
            "batch_size": args.batch,
            "num_workers": 0,
            "patch_size": args.size,
            "synthetic": {"num_train": 8, "num_val": 1, "image_size": args.size},
        },
        "model": {"base_channels": args.width, "depth": 4, "channels_last": channels_last, "norm": args.norm},
        "run": {"num_workers": 1, "max_steps": 10_000, "use_gpu": args.gpu, "precision": precision},
    }


def time_config(out: Path, args: argparse.Namespace, precision: str, channels_last: bool) -> float:
    spec = validate_spec(make_spec(out, args, precision, channels_last))
    launcher = "torchrun" if "RANK" in os.environ else "local"
    ctx = init_context(spec, launcher) if not hasattr(time_config, "ctx") else time_config.ctx
    time_config.ctx = ctx
    job = build_job(spec, ctx, None)
    stream = iter(job.stream)
    batches = [next(stream) for _ in range(4)]
    if ctx.device.type == "cuda":
        batches = [(x.to(ctx.device), y.to(ctx.device)) for x, y in batches]
    rates = []
    for r in range(args.rounds + 1):
        _sync(ctx.device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            train_step(job, *batches[i % len(batches)])
        _sync(ctx.device)
        if r:  # round 0 is warm-up (cuDNN autotune, allocator)
            rates.append(args.steps * args.batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--norm", default="group", choices=["group", "batch", "instance", "none"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.gpu:
        torch.backends.cudnn.benchmark = True
    out = Path(tempfile.mkdtemp(prefix="hierseg_step_"))
    ensure_synthetic(validate_spec(make_spec(out, args, "fp32", False)).data)
    configs = [("fp32", False)] + ([("fp32", True), ("bf16", False), ("bf16", True)] if args.gpu else [])
    device = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"train_step, U-Net width {args.width} depth 4 {args.norm} norm, "
        f"batch {args.batch}x1x{args.size}x{args.size}, {device}"
    )
    base = None
    for precision, cl in configs:
        rate = time_config(out, args, precision, cl)
        base = base or rate
        print(f"  {precision:<5} channels_last={cl!s:<5} {rate:9.1f} patches/s  {rate / base:5.2f}x fp32", flush=True)
    if args.gpu:
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
