"""Shared fixture data of the registry and inference tests: two tiny trained runs in a SQLite store.

Why one cached builder instead of a conftest fixture: both test modules need the same two runs, and
training them once per pytest process keeps the two files well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.train_utils import sqlite_store

EXPERIMENT = "registry-tests"
MODEL = "tiny-seg"


@dataclass(frozen=True)
class Trained:
    work: Path
    uri: str
    run_ids: tuple[str, ...]
    lambdas: tuple[float, ...]
    checkpoints: tuple[Path, ...]
    shards_val: Path


def _spec(work: Path, lambda_coarse: float) -> dict:
    return {
        "data": {
            "train": str(work / "shards" / "train"),
            "val": str(work / "shards" / "val"),
            "batch_size": 4,
            "num_workers": 0,
            "shuffle_buffer": 16,
            "patch_size": 64,
            "synthetic": {"num_train": 8, "num_val": 3, "image_size": 128, "seed": 0},
        },
        "model": {"base_channels": 8, "depth": 2},
        "loss": {"lambda_coarse": lambda_coarse},
        "optim": {"lr": 0.01, "warmup_steps": 1},
        "run": {
            "name": f"lc{lambda_coarse}",
            "num_workers": 1,
            "max_steps": 8,
            "eval_every": 4,
            "log_every": 4,
            "storage_path": str(work / "runs"),
        },
        "tracking": {"uri": sqlite_store(work), "experiment": EXPERIMENT},
    }


@functools.lru_cache(maxsize=1)
def trained() -> Trained:
    """Train two tiny runs (lambda_coarse 0.0 and 1.0) with the local launcher, in process."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from hierseg.spec import validate_spec
    from hierseg.train.launch import absolutize, run_in_process

    work = Path(tempfile.mkdtemp(prefix="hierseg-registry-"))
    atexit.register(shutil.rmtree, work, True)
    run_ids, ckpts, lambdas = [], [], (0.0, 1.0)
    cwd = os.getcwd()
    os.chdir(work)  # MLflow's default artifact root (./mlruns) lands in the temp folder
    try:
        for lc in lambdas:
            spec = absolutize(validate_spec(_spec(work, lc), "test"))
            outcome = run_in_process(spec, "local")
            assert outcome["finished"], outcome
            import json

            run_ids.append(json.loads((work / "runs" / f"lc{lc}" / "run.json").read_text())["run_id"])
            ckpts.append(work / "runs" / f"lc{lc}" / "best")
    finally:
        os.chdir(cwd)
    return Trained(work, f"sqlite:///{work}/mlflow.db", tuple(run_ids), lambdas, tuple(ckpts), work / "shards" / "val")


def promote_champion() -> str:
    """Promote the best run once (idempotent); returns ``models:/NAME@champion``."""
    from hierseg.registry import main

    t = trained()
    assert main(["--tracking-uri", t.uri, "--experiment", EXPERIMENT, "--name", MODEL]) == 0
    return f"models:/{MODEL}@champion"
