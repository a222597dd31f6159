"""Stand-in for ``jobs/train.py`` in tests/test_deploy.py's ``hierseg sweep --local`` test (selected with
``HIERSEG_TRAIN_SCRIPT``).

Why a stand-in there: that test checks the sweep plumbing only (trials run in order, DONE markers, finished
trials skipped, the resolved spec each trial gets) in milliseconds, independent of the training loop. It
takes the same arguments as the real CLI and records what it saw next to the spec. The Slurm tests
(tests/test_deploy_slurm.py) run the real jobs/train.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--launcher", default="local")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text())
    record = {"launcher": args.launcher, "tags": spec["tracking"]["tags"], "run_name": spec["run"]["name"],
              "lambda_coarse": spec["loss"]["lambda_coarse"]}  # fmt: skip
    (Path(args.spec).parent / "stub_ran.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
