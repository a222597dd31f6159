"""Where checkpoints go: Ray Train's storage under Ray, our own folder under torchrun/local.

Both keep the best ``run.keep_checkpoints`` by ``run.best_metric`` plus the latest, and both also
keep ``<storage_path>/<name>/best/`` (weights + spec of the best evaluation) for the MLflow model.

Every checkpoint carries a fingerprint of the spec fields that shape the weights and the targets;
resuming under a spec whose fingerprint differs is refused listing the changed fields, instead of a
``size mismatch`` traceback (different sizes) or, worse, a silent resume with classes moved between
groups (same sizes).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from hierseg.data.normalize import resolve as resolve_normalization
from hierseg.spec import JobSpec
from hierseg.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    DiskCheckpoints,
    atomic_torch_save,
    load_state,
)
from hierseg.train.context import DistContext

OFFLINE_RECORD = "tracking_offline.jsonl"
# model.* fields that change neither the weights nor the targets: toggling them must not block a resume.
_RUNTIME_ONLY = {"model.compile", "model.channels_last"}
_SHAPING = ("model.", "hierarchy.", "data.label_sets")


def run_dir(spec: JobSpec) -> Path:
    return Path(spec.run.storage_path).resolve() / spec.run.name


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(spec_dump: Mapping[str, Any], manifest: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{field: JSON value}`` of the spec fields that shape the model and the targets.

    ``spec_dump`` is ``JobSpec.model_dump(mode="json")`` (also what older checkpoints stored as
    ``spec``). The training manifest's label sets count too: ``data.label_sets: null`` means "the
    manifest's", so new shards can change the targets without a spec change.
    """
    flat = _flatten(spec_dump)
    fp = {
        k: json.dumps(v, sort_keys=True) for k, v in flat.items() if k.startswith(_SHAPING) and k not in _RUNTIME_ONLY
    }
    if manifest is not None:
        fp["data.train manifest label_sets"] = json.dumps(manifest.get("label_sets"), sort_keys=True)
    return fp


def _short(value: str | None) -> str:
    if value is None:
        return "(absent)"
    return value if len(value) <= 60 else value[:57] + "..."


def check_fingerprint(state: Mapping[str, Any], current: Mapping[str, str], where: str) -> None:
    """Raise :class:`CheckpointError` listing every field whose value differs from the checkpoint's."""
    saved = state.get("fingerprint")
    if saved is None and isinstance(state.get("spec"), Mapping):  # written before fingerprints existed
        saved = fingerprint(state["spec"])
    if saved is None:
        return
    keys = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    keys += sorted(k for k in set(saved) ^ set(current) if not k.endswith("manifest label_sets"))
    if keys:
        changes = "; ".join(f"{k}: {_short(saved.get(k))} -> {_short(current.get(k))}" for k in keys)
        raise CheckpointError(
            f"cannot resume from {where}: it was trained with a different model or targets ({changes}); "
            "set run.resume=false to start over in this run folder, or give a new run.name to keep it"
        )


def check_resumable(spec: JobSpec) -> None:
    """Before any worker starts: refuse a resume from a checkpoint of another model or targets.

    The refusal is deterministic, so finding it here saves starting workers (which Ray would restart
    ``run.max_failures`` times to meet the same error). Every checkpoint of one run folder carries the
    same fingerprint, so the newest readable one stands for whichever the workers will pick.
    """
    if not spec.run.resume:
        return
    found = newest_loadable(run_dir(spec))
    if found is not None:
        check_fingerprint(found[1], _BestOnOwner(spec, is_main=False).fingerprint(), str(found[0]))


def newest_loadable(root: Path, after: float = -math.inf) -> tuple[Path, dict[str, Any]] | None:
    """``(folder, state)`` of the newest ``checkpoint_*`` folder under ``root`` (modified after ``after``)
    that loads; damaged ones are skipped (the workers' loader warns about them)."""
    folders = [p for p in root.glob("checkpoint_*") if (p / STATE_FILE).is_file() and p.stat().st_mtime > after]
    for folder in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return folder, load_state(folder)
        except CheckpointError:
            continue
    return None


class Checkpointer(Protocol):
    def load_latest(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def save_best(self, model_state: dict[str, Any], spec: JobSpec, step: int, metrics: dict[str, float]) -> None: ...

    def best_dir(self) -> Path: ...

    def manifest(self, spec: JobSpec) -> dict[str, Any]: ...


class _BestOnOwner:
    """The best evaluation's weights, written by the owning rank only."""

    def __init__(self, spec: JobSpec, is_main: bool):
        self.root, self.is_main, self.spec = run_dir(spec), is_main, spec
        if is_main:
            from hierseg.tracking import set_offline_record

            set_offline_record(self.root / OFFLINE_RECORD)  # what MLflow could not take goes beside the checkpoints

    def fingerprint(self) -> dict[str, str]:
        return fingerprint(self.spec.model_dump(mode="json"), self.manifest(self.spec))

    def _checked(self, state: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
        if state is not None:
            check_fingerprint(state, self.fingerprint(), where)
        return state

    def save_best(self, model_state: dict[str, Any], spec: JobSpec, step: int, metrics: dict[str, float]) -> None:
        if self.is_main:
            manifest = self.manifest(spec)
            state = {
                "model": model_state,
                "spec": spec.model_dump(mode="json"),
                "step": step,
                "best_metrics": metrics,
                "patch_size": spec.data.patch_size,
                "label_map": manifest.get("label_map"),  # inference reports in the training labels' terms
                "normalization": resolve_normalization(spec.data.normalization, manifest.get("intensity")),
                "fingerprint": self.fingerprint(),
            }
            atomic_torch_save(state, self.best_dir() / STATE_FILE)

    def manifest(self, spec: JobSpec) -> dict[str, Any]:
        """The training manifest (read once; it does not change during a run)."""
        if not hasattr(self, "_manifest"):
            from hierseg.data.sources import resolve_sources

            # several sources: their merged set table and common label map stand for "the" manifest
            self._manifest = resolve_sources(spec.data).training_record()
        return self._manifest

    def best_dir(self) -> Path:
        return self.root / "best"


class LocalCheckpointer(_BestOnOwner):
    """torchrun / local: rank 0 writes ``checkpoint_<step>`` folders; every rank reads the latest."""

    def __init__(self, spec: JobSpec, ctx: DistContext):
        super().__init__(spec, ctx.is_main)
        self.disk = DiskCheckpoints(self.root, spec.run.keep_checkpoints, spec.run.best_metric, spec.run.best_mode)
        if ctx.is_main:  # rank 0 is the owner and holds the run lock: nobody else writes here
            self.disk.clean_stale_temporaries()

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads (damaged ones are skipped with a warning), fingerprint-checked."""
        found = self.disk.load_latest()
        return self._checked(found[1], str(found[0])) if found else None

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.is_main:
            self.disk.save({**state, "fingerprint": self.fingerprint()}, metrics)


class RayCheckpointer(_BestOnOwner):
    """Ray Train: every rank reports the same number of times; rank 0 attaches the checkpoint."""

    def __init__(self, spec: JobSpec, ctx: DistContext):
        super().__init__(spec, ctx.is_main)

    def load_latest(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        state, where, since = None, "", -math.inf
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state, where = load_state(d), checkpoint.path
            since = Path(where).stat().st_mtime if Path(where).is_dir() else math.inf
        # Ray registers a report's checkpoint asynchronously: after a killed worker it may hand back an older
        # one than the newest complete folder this run wrote (seen: step 5 with steps 10 and 15 on disk), or
        # none at all when the kill came within its poll interval of the first report (seen: fast steps,
        # restart "from step 0" with step 3 on disk). Folders newer than Ray's own are this run's later
        # reports; the newest that loads wins.
        newer = newest_loadable(self.root, after=since)
        if newer is not None and (state is None or newer[1].get("step", -1) > state.get("step", -1)):
            state, where = newer[1], str(newer[0])
        if state is None:
            return None
        return self._checked(state, where)

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train

        if not self.is_main:
            ray.train.report(metrics)
            return
        tmp = Path(tempfile.mkdtemp(prefix="hierseg-ckpt-"))
        try:
            atomic_torch_save({**state, "fingerprint": self.fingerprint()}, tmp / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def build_checkpointer(spec: JobSpec, ctx: DistContext) -> Checkpointer:
    return RayCheckpointer(spec, ctx) if ctx.launcher == "ray" else LocalCheckpointer(spec, ctx)
