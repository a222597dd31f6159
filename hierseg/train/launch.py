"""Launchers: Ray Train (default), torchrun (Slurm) and local; all run :func:`train_worker`.

The owner of the MLflow run is the Ray driver, or rank 0 under torchrun/local. Before any worker
starts, the owner checks that the shards exist and the tracking store answers, and makes the
synthetic demo shards when the spec asks for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hierseg.data.loader import resolve_shards
from hierseg.data.synth import ensure_synthetic
from hierseg.spec import JobSpec
from hierseg.tracking import check_tracking_uri, end_run, run_is_open, start_run
from hierseg.train.checkpoint import atomic_write_text
from hierseg.train.checkpointer import run_dir
from hierseg.train.context import close_context, init_context
from hierseg.train.loop import train_worker


class PreflightError(ValueError):
    """The job cannot start: missing shards, unreachable tracking store, ..."""


def _absolute(url: str) -> str:
    """Local relative paths become absolute (Ray workers do not run in the driver's folder)."""
    if "://" in url or url.startswith("pipe:"):
        return url
    return str(Path(url).expanduser().absolute())


def absolutize(spec: JobSpec) -> JobSpec:
    """The spec with local data, storage and SQLite paths made absolute, so every worker agrees."""
    uri = spec.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + _absolute(uri.removeprefix("sqlite:///"))
    return spec.model_copy(
        update={
            "data": spec.data.model_copy(update={"train": _absolute(spec.data.train), "val": _absolute(spec.data.val)}),
            "run": spec.run.model_copy(update={"storage_path": _absolute(spec.run.storage_path)}),
            "tracking": spec.tracking.model_copy(update={"uri": uri}),
        }
    )


def preflight_data_only(spec: JobSpec) -> None:
    """Make the synthetic shards when asked, and check that both shard sets resolve."""
    ensure_synthetic(spec.data)
    for field in ("train", "val"):
        try:
            resolve_shards(getattr(spec.data, field))
        except ValueError as e:
            raise PreflightError(f"data.{field}: {e}") from None


def preflight(spec: JobSpec) -> None:
    try:
        preflight_data_only(spec)
        check_tracking_uri(spec.tracking.uri)
    except (ValueError, ConnectionError, OSError) as e:
        raise PreflightError(str(e)) from None


def resolve_run(spec: JobSpec, launcher: str) -> str:
    """The job's one MLflow run: reused when resuming the same run folder, else created."""
    record = run_dir(spec) / "run.json"
    if spec.run.resume and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri") == spec.tracking.uri and run_is_open(spec.tracking.uri, saved["run_id"]):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=spec.tracking.uri).update_run(saved["run_id"], status="RUNNING")
            return saved["run_id"]
    run_id = start_run(spec, launcher)
    atomic_write_text(json.dumps({"run_id": run_id, "tracking_uri": spec.tracking.uri}), record)
    return run_id


def _config(spec: JobSpec, launcher: str, run_id: str | None) -> dict[str, Any]:
    return {"spec": spec.model_dump(mode="json"), "launcher": launcher, "run_id": run_id}


def _finish_run(spec: JobSpec, run_id: str, outcome: dict[str, Any] | None) -> None:
    status = "FAILED" if outcome is None else ("FINISHED" if outcome["finished"] else "KILLED")
    end_run(spec.tracking.uri, run_id, status)


def run_in_process(spec: JobSpec, launcher: str) -> dict[str, Any]:
    """torchrun (one call per process) or local (one process): rank 0 owns the MLflow run."""
    ctx = init_context(spec, launcher)
    try:
        run_id = _owner_prepares(spec, ctx.is_main, ctx.distributed, launcher)
        outcome = None
        try:
            outcome = train_worker(_config(spec, launcher, run_id), ctx)
            return outcome
        finally:
            if ctx.is_main:
                _finish_run(spec, run_id, outcome)
    finally:
        close_context(ctx)


def _owner_prepares(spec: JobSpec, is_main: bool, distributed: bool, launcher: str) -> str:
    """Rank 0 runs the preflight and opens the run; the others learn the outcome (symmetrically)."""
    message: list[Any] = [None, None]
    if is_main:
        try:
            preflight(spec)
            message = [resolve_run(spec, launcher), None]
        except PreflightError as e:
            message = [None, str(e)]
    if distributed:
        dist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        raise PreflightError(message[1])
    return message[0]


def _ray_worker(config: dict[str, Any]) -> dict[str, Any]:
    return train_worker(config)


def run_ray(spec: JobSpec) -> dict[str, Any]:
    """Driver: preflight, open the MLflow run, run TorchTrainer; joins ``RAY_ADDRESS`` if set."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    preflight(spec)
    run_id = resolve_run(spec, "ray")
    outcome = None
    try:
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
        run = spec.run
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config=_config(spec, "ray", run_id),
            scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu),
            run_config=RunConfig(
                name=run.name,
                storage_path=str(Path(run.storage_path).resolve()),
                failure_config=FailureConfig(max_failures=run.max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=run.keep_checkpoints,
                    checkpoint_score_attribute=run.best_metric,
                    checkpoint_score_order=run.best_mode,
                ),
            ),
        )
        result = trainer.fit()
        outcome = result.return_value
        return outcome
    finally:
        _finish_run(spec, run_id, outcome)
