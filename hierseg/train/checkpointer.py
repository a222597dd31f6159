"""Where checkpoints go: Ray Train's storage under Ray, our own folder under torchrun/local.

Both keep the best ``run.keep_checkpoints`` by ``run.best_metric`` plus the latest, and both also
keep ``<storage_path>/<name>/best/`` (weights + spec of the best evaluation) for the MLflow model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from hierseg.spec import JobSpec
from hierseg.train.checkpoint import STATE_FILE, DiskCheckpoints, atomic_torch_save, load_state
from hierseg.train.context import DistContext


def run_dir(spec: JobSpec) -> Path:
    return Path(spec.run.storage_path).resolve() / spec.run.name


class Checkpointer(Protocol):
    def load_latest(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def save_best(self, model_state: dict[str, Any], spec: JobSpec, step: int, metrics: dict[str, float]) -> None: ...

    def best_dir(self) -> Path: ...

    def manifest(self, spec: JobSpec) -> dict[str, Any]: ...


class _BestOnOwner:
    """The best evaluation's weights, written by the owning rank only."""

    def __init__(self, root: Path, is_main: bool):
        self.root, self.is_main = root, is_main

    def save_best(self, model_state: dict[str, Any], spec: JobSpec, step: int, metrics: dict[str, float]) -> None:
        if self.is_main:
            manifest = self.manifest(spec)
            state = {
                "model": model_state,
                "spec": spec.model_dump(mode="json"),
                "step": step,
                "best_metrics": metrics,
                "patch_size": manifest.get("patch_shape"),
                "label_map": manifest.get("label_map"),  # inference reports in the training labels' terms
            }
            atomic_torch_save(state, self.best_dir() / STATE_FILE)

    def manifest(self, spec: JobSpec) -> dict[str, Any]:
        """The training manifest (read once; it does not change during a run)."""
        if not hasattr(self, "_manifest"):
            from hierseg.data.loader import read_manifest

            self._manifest = read_manifest(spec.data.train) or {}
        return self._manifest

    def best_dir(self) -> Path:
        return self.root / "best"


class LocalCheckpointer(_BestOnOwner):
    """torchrun / local: rank 0 writes ``checkpoint_<step>`` folders; every rank reads the latest."""

    def __init__(self, spec: JobSpec, ctx: DistContext):
        super().__init__(run_dir(spec), ctx.is_main)
        self.disk = DiskCheckpoints(self.root, spec.run.keep_checkpoints, spec.run.best_metric, spec.run.best_mode)

    def load_latest(self) -> dict[str, Any] | None:
        latest = self.disk.latest()
        return load_state(latest) if latest else None

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.is_main:
            self.disk.save(state, metrics)


class RayCheckpointer(_BestOnOwner):
    """Ray Train: every rank reports the same number of times; rank 0 attaches the checkpoint."""

    def __init__(self, spec: JobSpec, ctx: DistContext):
        super().__init__(run_dir(spec), ctx.is_main)

    def load_latest(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d)

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train

        if not self.is_main:
            ray.train.report(metrics)
            return
        tmp = Path(tempfile.mkdtemp(prefix="hierseg-ckpt-"))
        try:
            atomic_torch_save(state, tmp / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def build_checkpointer(spec: JobSpec, ctx: DistContext) -> Checkpointer:
    return RayCheckpointer(spec, ctx) if ctx.launcher == "ray" else LocalCheckpointer(spec, ctx)
