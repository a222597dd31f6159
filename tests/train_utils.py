"""Helpers of the training tests: tiny synthetic shards, specs, and the real train CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "jobs" / "train.py")


def sqlite_store(work: Path) -> str:
    """``sqlite:///<work>/mlflow.db``, a real MLflow store, created from an already migrated empty copy.

    Why: MLflow runs its ~60 schema migrations whenever it opens a new SQLite file (4-8 s per test
    process); the copy is the file those migrations produce, made once per MLflow version.
    """
    import shutil

    import mlflow

    template = Path(tempfile.gettempdir()) / f"hierseg-test-mlflow-{mlflow.__version__}.db"
    if not template.exists():
        tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        mlflow.MlflowClient(f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, template)
    work.mkdir(parents=True, exist_ok=True)
    db = work / "mlflow.db"
    if not db.exists():
        shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def tiny_spec(shards: Path, work: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A spec small enough to train in seconds on CPU; ``sections`` override parts of it."""
    spec: dict[str, Any] = {
        "data": {
            "train": str(shards / "train"),
            "val": str(shards / "val"),
            "batch_size": 4,
            "num_workers": 0,
            "shuffle_buffer": 16,
            "patch_size": 64,
            "synthetic": {"num_train": 8, "num_val": 3, "image_size": 128, "seed": 0},
        },
        "model": {"base_channels": 8, "depth": 2},
        "optim": {"lr": 0.003, "warmup_steps": 2},
        "run": {
            "name": "t",
            "num_workers": 2,
            "max_steps": 8,
            "eval_every": 4,
            "log_every": 2,
            "storage_path": str(work / "runs"),
        },
        "tracking": {"uri": sqlite_store(work), "experiment": "tests"},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def write_spec(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def ray_env(tmp: Path | None = None) -> dict[str, str]:
    """Environment for a subprocess that starts its own local Ray (short temp dir: socket path limits)."""
    env = dict(os.environ)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env.pop("RAY_ADDRESS", None)
    env["RAY_DEDUP_LOGS"] = "0"
    return env


def train_cli(
    spec_path: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 400, cwd: Path | None = None
):
    return subprocess.run(
        [sys.executable, TRAIN, "--spec", str(spec_path), *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        timeout=timeout,
        cwd=cwd,
    )


def mlflow_runs(uri: str, experiment: str = "tests"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []
