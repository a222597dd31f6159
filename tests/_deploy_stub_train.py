"""Stand-in for ``jobs/train.py`` in the deployment tests (selected with ``HIERSEG_TRAIN_SCRIPT``).

Why a stand-in: these tests check the plumbing around training (sweep expansion, the Slurm array script,
DONE markers, srun + torchrun rendezvous, signal forwarding and requeue) in seconds, independent of the
training loop. It takes the same arguments as the real CLI and records what it saw next to the spec.

Under ``--launcher torchrun`` every rank joins a gloo group and all-reduces its rank + 1, so a run with
W ranks records ``sum = W (W + 1) / 2``. With ``HIERSEG_STUB_WAIT_SIGNAL=1`` the first run waits for
SIGUSR1/SIGTERM, writes ``checkpoint`` (as the real loop's handler is expected to) and exits; a run that
finds ``checkpoint`` records ``resumed`` and succeeds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import yaml


def _all_reduce() -> dict[str, int]:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([dist.get_rank() + 1], dtype=torch.int64)
    dist.all_reduce(value)
    out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": int(value.item())}
    dist.destroy_process_group()
    return out


def _wait_for_signal(out_dir: Path, rank: int) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        if rank == 0:
            (out_dir / "checkpoint").write_text(signal.Signals(signum).name + "\n")
        sys.exit(0)

    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGTERM, handler)
    (out_dir / f"waiting.{rank}").write_text("")
    time.sleep(120)
    sys.exit(3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--launcher", default="local")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text())
    out_dir = Path(os.environ.get("HIERSEG_STUB_OUT") or Path(args.spec).parent)
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("HIERSEG_STUB_WAIT_SIGNAL") and not (out_dir / "checkpoint").exists():
        _wait_for_signal(out_dir, rank)
    record = {"launcher": args.launcher, "tags": spec["tracking"]["tags"], "run_name": spec["run"]["name"],
              "lambda_coarse": spec["loss"]["lambda_coarse"], "resumed": (out_dir / "checkpoint").exists()}  # fmt: skip
    if args.launcher == "torchrun":
        record.update(_all_reduce())
    if rank == 0:
        (out_dir / "stub_ran.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
