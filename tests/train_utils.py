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
        # a test that names its own store gets no seeded one (nor a folder made for it)
        "tracking": {"uri": sections.get("tracking", {}).get("uri") or sqlite_store(work), "experiment": "tests"},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def untrained_checkpoint(folder: Path, seed: int, data: dict[str, Any] | None = None, **model: Any) -> Path:
    """A checkpoint folder ``load_predictor`` accepts: :func:`tiny_spec`'s model (``model`` overrides its
    section, ``data`` its data section: a 3D model's ``patch_size``), seeded and untrained, heads sharpened so
    that every fine class, coarse group and label value occurs. Untrained, it has many near-ties, where argmax
    and float16 rounding show any numeric difference."""
    import torch

    from hierseg.model import build_model
    from hierseg.spec import validate_spec

    sections = {"model": model, "data": data or {}, "tracking": {"uri": "sqlite:///never-opened.db"}}
    spec = validate_spec(tiny_spec(folder, folder, **sections))
    torch.manual_seed(seed)
    net = build_model(spec.model, spec.hierarchy.build())
    with torch.no_grad():
        for head in (net.fine_head, *net.coarse_heads):
            head.weight.mul_(10.0)
    folder.mkdir(parents=True)
    state = {"model": net.state_dict(), "spec": spec.model_dump(mode="json"), "normalization": {"mode": "zscore"}}
    torch.save(state, folder / "state.pt")
    return folder


def descendant_pids(prefix: str, root: int | None = None) -> list[int]:
    """Pids of the descendants of ``root`` (default: this process) whose command line starts with ``prefix``
    (Ray sets its actors' to ``ray::Class.method``)."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found = []
    for pid in parents:
        p = pid
        while p in parents and p != root:
            p = parents[p]
        try:
            if p == root and (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(prefix.encode()):
                found.append(pid)
        except OSError:
            continue
    return found


def write_spec(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def ray_env(tmp: Path | None = None) -> dict[str, str]:
    """Environment for a subprocess that starts its own local Ray (short temp dir: socket path limits)."""
    env = dict(os.environ)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env.pop("RAY_ADDRESS", None)
    env["RAY_DEDUP_LOGS"] = "0"
    # test time: Ray Train polls its workers every 2 s by default (how soon a dead worker or the end is seen),
    # and starts a preemption watcher actor (one more process) that a local test cluster never needs
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
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
