"""Launchers: Ray Train (default), torchrun (Slurm) and local; all run :func:`train_worker`.

The owner of the MLflow run is the Ray driver, or rank 0 under torchrun/local. Before any worker
starts, the owner locks the run folder (a second launch of a live run is refused naming the other
process), checks that the storage is writable, the shards exist and the tracking store answers, and
makes the synthetic demo shards when the spec asks for them.

Ray: the embedded cluster is always a new local one on 127.0.0.1 (``ray.init()`` without an address
would join whatever cluster was started last on this machine, or wait on its dead GCS); an existing
cluster is joined only through ``RAY_ADDRESS`` (``ray job submit`` sets it) or ``--ray-address``, and
a dead address fails within seconds naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hierseg.data.loader import check_shard_dims, check_shard_indexes, read_manifest, resolve_shards
from hierseg.data.synth import ensure_synthetic
from hierseg.fsutil import probe_writable

# shared with blockwise prediction, which must not import training (PreflightError is re-exported from here)
from hierseg.raycluster import (
    PreflightError,
    check_ray_address,
    local_cluster_process_setup,
    pin_ray_to_loopback,
    ray_address,
)
from hierseg.spec import JobSpec
from hierseg.tracking import check_tracking_uri, end_run, run_is_open, set_offline_record, start_run
from hierseg.train.checkpoint import atomic_write_text, follow_umask
from hierseg.train.checkpointer import OFFLINE_RECORD, check_resumable, run_dir
from hierseg.train.context import close_context, init_context
from hierseg.train.loop import train_worker


def _absolute(url: str) -> str:
    """Local relative paths become absolute (Ray workers do not run in the driver's folder)."""
    if "://" in url or url.startswith("pipe:"):
        return url
    return str(Path(url).expanduser().absolute())


def _absolute_data(value: Any) -> Any:
    """A shard location, or every source's ``shards`` of a list of sources, made absolute."""
    if isinstance(value, str):
        return _absolute(value)
    return [s.model_copy(update={"shards": _absolute(s.shards)}) for s in value]


def absolutize(spec: JobSpec) -> JobSpec:
    """The spec with local data, storage and SQLite paths made absolute, so every worker agrees."""
    uri = spec.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + _absolute(uri.removeprefix("sqlite:///"))
    return spec.model_copy(
        update={
            "data": spec.data.model_copy(
                update={"train": _absolute_data(spec.data.train), "val": _absolute_data(spec.data.val)}
            ),
            "run": spec.run.model_copy(update={"storage_path": _absolute(spec.run.storage_path)}),
            "tracking": spec.tracking.model_copy(update={"uri": uri}),
        }
    )


def preflight_data_only(spec: JobSpec) -> None:
    """Make the synthetic shards when asked, and check that both shard sets resolve and have ``model.dims``
    (a 3D ``data.patch_size`` must also fit the training blocks)."""
    ensure_synthetic(spec.data)
    for field in ("train", "val"):
        for source in spec.data.sources(field):
            where = f"data.{field}" + (f" source {source.name!r}" if spec.data.multi_source else "")
            try:
                check_shard_indexes(source.shards, resolve_shards(source.shards))
                patch = spec.data.patch_size if field == "train" else None  # validation tiles whole blocks
                check_shard_dims(read_manifest(source.shards), source.shards, spec.model.dims, patch)
            except ValueError as e:
                raise PreflightError(f"{where}: {e}") from None
    if spec.data.multi_source:
        from hierseg.data.sources import resolve_sources

        try:
            resolve_sources(spec.data)  # merged set table, per-source checks: fail before any worker starts
        except ValueError as e:
            raise PreflightError(str(e)) from None


def preflight(spec: JobSpec) -> JobSpec:
    """Everything checkable before any work: the run folder first (it takes the lock), then data and tracking.

    Returns the spec every rank trains with: a 3D model's voxel size resolved (:func:`resolve_voxel_size`).
    """
    check_storage(spec)
    lock_run_dir(spec)
    try:
        preflight_data_only(spec)
        spec = resolve_voxel_size(spec)
        check_resumable(spec)
        check_tracking_uri(spec.tracking.uri)
    except (ValueError, ConnectionError, OSError) as e:
        raise PreflightError(str(e)) from None
    return spec


def resolve_voxel_size(spec: JobSpec) -> JobSpec:
    """A 3D model's ``model.voxel_size``: the spec's, else the training manifests', else isotropic (``null``;
    :func:`hierseg.model.build_model` warns); ``data.patch_size`` is then checked against the plan it gives.

    Resolved once, here, and written into the spec the workers get: every rank builds the same network and
    every checkpoint saves the value, so ``hierseg predict`` and the logged model rebuild that network even
    after the shards are gone.
    """
    if spec.model.dims != 3:
        return spec
    from hierseg.model import check_patch_size, plan_unet

    voxel, origin = spec.model.voxel_size, f"model.voxel_size {spec.model.voxel_size} nm"
    if voxel is None:
        found = {s.name: (read_manifest(s.shards) or {}).get("voxel_size") for s in spec.data.sources("train")}
        sizes = sorted({tuple(v) for v in found.values() if v})
        if len(sizes) > 1:
            raise ValueError(
                f"data.train sources record different voxel sizes ({found}); set model.voxel_size [z, y, x] (nm) "
                "to the one the network should be planned for"
            )
        voxel = [float(v) for v in sizes[0]] if sizes else None
        origin = (
            f"the training manifest's voxel size {voxel} nm"
            if sizes
            else "isotropic voxels: neither model.voxel_size nor the training manifest gives a voxel size"
        )
    try:
        check_patch_size(plan_unet(spec.model.depth, 3, voxel), spec.data.patch_size)
    except ValueError as e:
        raise ValueError(f"{e} (the network is planned for {origin})") from None
    return spec.model_copy(update={"model": spec.model.model_copy(update={"voxel_size": voxel})})


def check_storage(spec: JobSpec) -> None:
    """``run.storage_path`` must take new folders and files (found now, not at the first checkpoint)."""
    folder = run_dir(spec)
    try:
        probe_writable(folder)
    except OSError as e:
        raise PreflightError(
            f"run.storage_path {spec.run.storage_path}: cannot write in {folder} ({e.strerror or e}); make it "
            "writable or set run.storage_path to a writable folder"
        ) from None


# --------------------------------------------------------------------------------------------- lock
LOCK_FILE = ".lock"
_held_locks: dict[Path, int] = {}  # run folder -> open fd; flock lives as long as the fd (process lifetime)


def lock_run_dir(spec: JobSpec) -> None:
    """Take an exclusive ``flock`` on ``<run folder>/.lock`` for the rest of this process's life.

    The kernel drops the lock when the owner dies (even by SIGKILL), so a crashed run never blocks
    the next launch; the file keeps who holds it, for the refusal message.
    """
    folder = run_dir(spec)
    if folder in _held_locks:
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise PreflightError(
            f"run folder {folder} is in use by {holder}; wait for that run to end (or stop it), or give this "
            "launch another run.name"
        ) from None
    os.ftruncate(fd, 0)
    me = f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    os.pwrite(fd, me.encode(), 0)
    follow_umask(path, is_dir=False)
    _held_locks[folder] = fd


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
    try:
        atomic_write_text(json.dumps({"run_id": run_id, "tracking_uri": spec.tracking.uri}), record)
    except OSError as e:  # never leave an orphan RUNNING run behind a failed start
        end_run(spec.tracking.uri, run_id, "FAILED")
        raise PreflightError(f"run.storage_path: cannot write {record} ({e.strerror or e})") from None
    return run_id


def _config(spec: JobSpec, launcher: str, run_id: str | None) -> dict[str, Any]:
    return {"spec": spec.model_dump(mode="json"), "launcher": launcher, "run_id": run_id}


def _finish_run(spec: JobSpec, run_id: str, outcome: dict[str, Any] | None) -> None:
    """Bounded: a tracking server gone at the end costs at most the final timeout, never the outcome."""
    status = "FAILED" if outcome is None else ("FINISHED" if outcome["finished"] else "KILLED")
    set_offline_record(run_dir(spec) / OFFLINE_RECORD)
    end_run(spec.tracking.uri, run_id, status)


def run_in_process(spec: JobSpec, launcher: str) -> dict[str, Any]:
    """torchrun (one call per process) or local (one process): rank 0 owns the MLflow run."""
    ctx = init_context(spec, launcher)
    try:
        run_id, spec = _owner_prepares(spec, ctx.is_main, ctx.distributed, launcher)
        outcome = None
        try:
            outcome = train_worker(_config(spec, launcher, run_id), ctx)
            return outcome
        finally:
            if ctx.is_main:
                _finish_run(spec, run_id, outcome)
    finally:
        close_context(ctx)


def _owner_prepares(spec: JobSpec, is_main: bool, distributed: bool, launcher: str) -> tuple[str, JobSpec]:
    """Rank 0 runs the preflight and opens the run; the others learn the outcome and the resolved spec
    (symmetrically)."""
    message: list[Any] = [None, None, None]
    if is_main:
        try:
            spec = preflight(spec)
            message = [resolve_run(spec, launcher), None, spec.model_dump(mode="json")]
        except PreflightError as e:
            message = [None, str(e), None]
    if distributed:
        dist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        raise PreflightError(message[1])
    return message[0], JobSpec.model_validate(message[2])


def _ray_worker(config: dict[str, Any]) -> dict[str, Any]:
    _quiet_ray_reports()
    return train_worker(config)


def _quiet_ray_reports() -> None:
    """Give Ray Train's per-report logger the level of ``RunConfig.logging_config`` (set in :func:`_run_config`),
    and keep a failed train function's traceback off the worker's console unless ``--debug``.

    Why: Ray 2.60 logs "Reporting training result ..." for every report of every rank through a logger
    named by its file path (``logging.getLogger(__file__)``), outside ``ray.train``, so LoggingConfig's
    level misses it and Ray's worker root logger (INFO) prints it. This sets that logger's level; text is
    not filtered.
    """
    import logging

    from ray.train.v2._internal import util
    from ray.train.v2._internal.execution import context

    from hierseg.cli import debug_requested

    logging.getLogger(context.__file__).setLevel(_ray_train_log_level())
    if not debug_requested():
        # Ray logs a failed train function's traceback on the worker as "Error in training function:" and
        # also hands it to the driver inside the exception; the driver prints hierseg's one line (all of
        # it with --debug), so the worker-side copy would only put a raw traceback before that line.
        logging.getLogger(util.__name__).setLevel(logging.CRITICAL)


def _ray_train_log_level() -> str:
    return os.environ.get(RAY_TRAIN_LOG_LEVEL_ENV, "WARNING").upper()


RAY_TRAIN_LOG_LEVEL_ENV = "HIERSEG_RAY_TRAIN_LOG_LEVEL"


WORKER_NICENESS_ENV = "RAY_worker_niceness"


def init_ray(spec: JobSpec) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a private local cluster bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address()
    if address:
        check_ray_address(address)
        ray.init(address=address, log_to_driver=True)
        return
    check_local_gpu(spec)
    pin_ray_to_loopback()
    # address="local": never join "the latest cluster" recorded in Ray's temp folder (maybe dead, maybe someone
    # else's); _node_ip_address: GCS, raylet and workers listen on loopback, not the machine's address.
    # RAY_worker_niceness 0: Ray starts workers at nice 15 (so its own daemons stay responsive on a shared
    # cluster node), which on the user's own machine makes training yield to every other process (seen as
    # Ray workers at "SN" getting a fraction of the cores while tests ran beside bench/realdata.py). At 0
    # the workers run at the priority of the command that started them (``nice train.py`` still works).
    hook = f"{local_cluster_process_setup.__module__}.{local_cluster_process_setup.__name__}"
    ray.init(address="local", _node_ip_address="127.0.0.1", log_to_driver=True,
             runtime_env={"worker_process_setup_hook": hook, "env_vars": {WORKER_NICENESS_ENV: "0"}})  # fmt: skip


def check_local_gpu(spec: JobSpec) -> None:
    """``run.use_gpu`` on a machine without CUDA: a local cluster would wait forever for the GPU."""
    import torch

    if spec.run.use_gpu and not torch.cuda.is_available():
        raise PreflightError(
            "run.use_gpu is true but this machine has no CUDA GPU; set run.use_gpu=false, or submit to a GPU "
            "cluster (RAY_ADDRESS / deploy/ray/submit.sh)"
        )


def _run_config(spec: JobSpec) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    run = spec.run
    return RunConfig(
        name=run.name,
        storage_path=str(Path(run.storage_path).resolve()),
        failure_config=FailureConfig(max_failures=run.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=run.keep_checkpoints,
            checkpoint_score_attribute=run.best_metric,
            checkpoint_score_order=run.best_mode,
        ),
        # Ray Train's own verbosity knob: at INFO every report of every rank prints "Reporting training result"
        # and "Checkpoint successfully created"; hierseg prints its own progress lines.
        logging_config=LoggingConfig(log_level=_ray_train_log_level()),
    )


def run_ray(spec: JobSpec) -> dict[str, Any]:
    """Driver: preflight, open the MLflow run, run TorchTrainer; joins ``RAY_ADDRESS`` if set."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = preflight(spec)
    address = ray_address()
    if address:  # before the MLflow run exists: a failed start leaves nothing behind
        check_ray_address(address)
    else:
        check_local_gpu(spec)
    run_id = resolve_run(spec, "ray")
    outcome = None
    try:
        init_ray(spec)
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config=_config(spec, "ray", run_id),
            scaling_config=ScalingConfig(num_workers=spec.run.num_workers, use_gpu=spec.run.use_gpu),
            run_config=_run_config(spec),
        )
        outcome = trainer.fit().return_value
        return outcome
    finally:
        _finish_run(spec, run_id, outcome)
