"""End-to-end training on one GPU without Ray or MLflow: the real ``train_worker`` (streaming shards,
bf16 autocast, evaluation, checkpoints) on synthetic data; prints progress, throughput and the
validation result. For a lent GPU machine that lacks Ray/MLflow:

    python bench/gpu_train_check.py [--steps 300] [--batch 32] [--workers 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hierseg.spec import validate_spec
from hierseg.train.launch import preflight_data_only
from hierseg.train.loop import train_worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--norm", default="batch")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script without a GPU")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="hierseg_gpu_"))
    spec = validate_spec(
        {
            "data": {
                "train": str(out / "train"),
                "val": str(out / "val"),
                "batch_size": args.batch,
                "num_workers": args.workers,
                "patch_size": 128,
                "synthetic": {"num_train": 96, "num_val": 16, "image_size": 256},
            },
            "model": {"base_channels": 32, "depth": 4, "norm": args.norm, "channels_last": args.norm == "batch"},
            "optim": {"lr": 0.003, "warmup_steps": 30},
            "run": {
                "num_workers": 1,
                "use_gpu": not args.cpu,
                "precision": "fp32" if args.cpu else args.precision,
                "max_steps": args.steps,
                "eval_every": args.steps // 2,
                "log_every": 50,
                "storage_path": str(out / "runs"),
            },
        }
    )
    preflight_data_only(spec)
    t0 = time.monotonic()
    outcome = train_worker({"spec": spec.model_dump(mode="json"), "launcher": "local", "run_id": None})
    best = outcome["best"]
    print(f"done: {outcome['step']} steps in {time.monotonic() - t0:.0f} s; best {best['value']:.3f} at {best['step']}")
    metrics = best["metrics"]
    print(f"val accuracy {metrics['val/fine/accuracy']:.3f}, coarse mIoU {metrics['val/coarse/miou']:.3f}")


if __name__ == "__main__":
    main()
