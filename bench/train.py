"""Training throughput side by side: hierseg on Ray (2 workers) vs torchrun (2 procs), and the streaming
pipeline vs the same training step over in-memory tensors (one process).

    python bench/train.py [--steps 60] [--batch 8] [--out /tmp/hierseg_bench_train]

Same spec (quickstart model, synthetic shards, global batch), same machine, one run. Steady-state
patches/s is the median of the logged windows after the first (start-up and warm-up excluded).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WINDOW = re.compile(r"step (\d+)/\d+ .*?\| ([\d.]+) patches/s \| data wait (\d+)%")


def bench_spec(out: Path, steps: int, batch: int) -> dict:
    return {
        "data": {
            "train": str(out / "shards" / "train"),
            "val": str(out / "shards" / "val"),
            "batch_size": batch,
            "num_workers": 1,
            "patch_size": 128,
            "synthetic": {"num_train": 32, "num_val": 4, "image_size": 256, "seed": 0},
        },
        "model": {"base_channels": 16, "depth": 3},
        "run": {
            "name": "bench",
            "num_workers": 2,
            "max_steps": steps,
            "log_every": 10,
            "eval_every": steps,
            "storage_path": str(out / "runs"),
            "resume": False,
        },
        "tracking": {"uri": f"sqlite:///{out}/mlflow.db", "experiment": "bench", "log_model": False},
    }


def steady_rate(log: str) -> tuple[float, float]:
    """Median patches/s and data-wait share over the windows after the first."""
    windows = [(int(s), float(r), int(w)) for s, r, w in WINDOW.findall(log)]
    windows = sorted(dict((s, (r, w)) for s, r, w in windows).items())[1:]
    if not windows:
        raise RuntimeError(f"no progress lines found:\n{log[-3000:]}")
    return statistics.median(r for _, (r, _) in windows), statistics.median(w for _, (_, w) in windows) / 100


def run_cli(spec_path: Path, launcher: str, env: dict) -> str:
    train = str(ROOT / "jobs" / "train.py")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", train]
    else:
        cmd = [sys.executable, train]
    cmd += ["--spec", str(spec_path), "--launcher", launcher]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode:
        raise RuntimeError(f"{launcher} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    print(f"  {launcher}: {time.monotonic() - t0:.0f} s wall including start-up", flush=True)
    return out.stdout + out.stderr


def in_process(spec_dict: dict, steps: int) -> dict[str, float]:
    """One process, the hierseg train_step: streaming loader vs the same batches held in memory."""
    from hierseg.spec import validate_spec
    from hierseg.train.context import init_context
    from hierseg.train.loop import build_job, train_step

    spec = validate_spec({**spec_dict, "run": {**spec_dict["run"], "num_workers": 1}})
    job = build_job(spec, init_context(spec, "local"), None)
    stream = iter(job.stream)
    cached = [next(stream) for _ in range(10)]
    for images, labels in cached[:3]:  # warm-up
        train_step(job, images, labels)
    t_data = t_total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        images, labels = next(stream)
        t1 = time.perf_counter()
        train_step(job, images, labels)
        t_data, t_total = t_data + t1 - t0, t_total + time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(job, *cached[i % len(cached)])
    t_mem = time.perf_counter() - t0
    n = steps * spec.data.batch_size
    return {"stream": n / t_total, "memory": n / t_mem, "data_wait": t_data / t_total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="hierseg_bench_train_"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = bench_spec(out, args.steps, args.batch)
    spec_path = out / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    from hierseg.data.synth import ensure_synthetic
    from hierseg.spec import validate_spec

    ensure_synthetic(validate_spec(spec).data)
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env.pop("RAY_ADDRESS", None)
    print(f"bench/train.py: {args.steps} steps, global batch {args.batch} of 128x128, {os.cpu_count()} cores, "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    ray_rate, ray_wait = steady_rate(run_cli(spec_path, "ray", env))
    tr_rate, tr_wait = steady_rate(run_cli(spec_path, "torchrun", env))
    local = in_process(spec, args.steps)
    print(f"\n{'configuration':<46}{'patches/s':>10}{'data wait':>11}")
    print(f"{'hierseg, Ray Train, 2 workers x 1 thread':<46}{ray_rate:>10.1f}{ray_wait:>10.0%}")
    print(f"{'hierseg, torchrun, 2 procs x 1 thread':<46}{tr_rate:>10.1f}{tr_wait:>10.0%}")
    print(f"{'hierseg step, 1 proc, streaming shards':<46}{local['stream']:>10.1f}{local['data_wait']:>10.0%}")
    print(f"{'hierseg step, 1 proc, in-memory tensors':<46}{local['memory']:>10.1f}{0:>10.0%}")
    print(
        f"\nRay / torchrun: {ray_rate / tr_rate:.2f}x   streaming / in-memory: {local['stream'] / local['memory']:.2f}x"
    )


if __name__ == "__main__":
    main()
