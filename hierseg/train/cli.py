"""``python jobs/train.py --spec S.yaml [--set k=v ...] [--launcher ray|torchrun|local] [--debug]``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hierseg.cli import report_error
from hierseg.spec import SpecError, load_spec


def detect_launcher() -> str:
    """torchrun sets TORCHELASTIC_RUN_ID (and RANK/WORLD_SIZE); otherwise Ray is the default."""
    if "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= os.environ.keys():
        return "torchrun"
    return "ray"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hierseg train", description="Train a hierarchical EM segmentation model.")
    ap.add_argument("--spec", required=True, help="job spec YAML (see examples/specs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a spec field, e.g. --set loss.lambda_coarse=0.1 (repeatable)")  # fmt: skip
    ap.add_argument("--launcher", choices=["auto", "ray", "torchrun", "local"], default="auto",
                    help="auto: torchrun when started by torchrun, else ray")  # fmt: skip
    ap.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                    help="join this Ray cluster (default: $RAY_ADDRESS, else a new one on 127.0.0.1)")  # fmt: skip
    ap.add_argument("--print-absolute-overrides", action="store_true",
                    help="print --set values making the spec's paths absolute (deploy/ray/submit.sh)")  # fmt: skip
    return ap.parse_args(argv)


def print_absolute_overrides(spec) -> None:
    """``key=value`` lines pinning data, storage and SQLite paths to this directory, then where results go.

    Why: under ``ray job submit`` the job runs in a copy of the repository in Ray's temporary folder,
    where relative paths would put shards, checkpoints and the MLflow store (and lose them).
    """
    from hierseg.train.checkpointer import run_dir
    from hierseg.train.launch import absolutize

    spec = absolutize(spec)
    data = spec.data.model_dump(mode="json")  # a list of sources prints as a YAML flow value (JSON)
    train, val = (v if isinstance(v, str) else json.dumps(v) for v in (data["train"], data["val"]))
    for key, value in [("data.train", train), ("data.val", val),
                       ("run.storage_path", spec.run.storage_path), ("tracking.uri", spec.tracking.uri)]:  # fmt: skip
        print(f"{key}={value}")
    print(f"# results: checkpoints in {run_dir(spec)}, MLflow store {spec.tracking.uri}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as e:
        report_error("train", str(e))
        return 2
    if args.print_absolute_overrides:
        print_absolute_overrides(spec)
        return 0
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    launcher = detect_launcher() if args.launcher == "auto" else args.launcher
    from hierseg.train.launch import PreflightError, absolutize, run_in_process, run_ray

    spec = absolutize(spec)
    try:
        outcome = run_ray(spec) if launcher == "ray" else run_in_process(spec, launcher)
    except PreflightError as e:
        report_error("train", f"cannot start: {e}")
        return 2
    if outcome and not outcome.get("finished", True):
        print(f"hierseg train: stopped at step {outcome['step']}; rerun the same command to resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from hierseg.cli import run_verb

    sys.exit(run_verb("train", main, sys.argv[1:]))
