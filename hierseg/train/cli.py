"""``python jobs/train.py --spec S.yaml [--set k=v ...] [--launcher ray|torchrun|local]``."""

from __future__ import annotations

import argparse
import os
import sys

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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as e:
        print(f"hierseg train: {e}", file=sys.stderr)
        return 2
    launcher = detect_launcher() if args.launcher == "auto" else args.launcher
    from hierseg.train.launch import PreflightError, absolutize, run_in_process, run_ray

    spec = absolutize(spec)
    try:
        outcome = run_ray(spec) if launcher == "ray" else run_in_process(spec, launcher)
    except PreflightError as e:
        print(f"hierseg train: cannot start: {e}", file=sys.stderr)
        return 2
    if outcome and not outcome.get("finished", True):
        print(f"hierseg train: stopped at step {outcome['step']}; rerun the same command to resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
