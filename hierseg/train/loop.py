"""The per-worker training loop: one function (:func:`train_worker`) for Ray, torchrun and local.

Every rank runs the same steps and the same collectives: the loss all-reduces its valid count and
terms every step, evaluation all-reduces its counts once, checkpoints gather loader and RNG states
once, and the stop flag (signals, ``run.stop_at_step``) is agreed at logging boundaries.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from hierseg.data.loader import build_train_loader, build_val_loader
from hierseg.data.sources import DataSources, resolve_sources
from hierseg.labels import NUM_FINE_CLASSES, Hierarchy, LabelSets, LabelSpace
from hierseg.losses import LossTerms, hierarchical_loss
from hierseg.metrics import EvalMetrics, all_reduce_metrics
from hierseg.model import UNet, build_model, num_parameters
from hierseg.serve.evaluate import run_eval, run_eval_sources, summarize, summarize_sources
from hierseg.serve.infer import PredictOptions, coarse_threshold_for
from hierseg.spec import JobSpec
from hierseg.tracking import MlflowTracker, NullTracker
from hierseg.train.checkpoint import rng_state, set_rng_state
from hierseg.train.checkpointer import Checkpointer, build_checkpointer
from hierseg.train.context import DistContext, all_gather_objects, all_reduce_
from hierseg.train.optim import build_optimizer, build_scheduler
from hierseg.train.progress import NullProgress, build_progress


@dataclass
class Job:
    """Everything one rank's loop touches."""

    spec: JobSpec
    ctx: DistContext
    hierarchy: Hierarchy
    luts: list[torch.Tensor]
    model: UNet
    train_model: torch.nn.Module  # DDP-wrapped (or the model itself on one process)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: Any
    tracker: MlflowTracker | NullTracker
    checkpoints: Checkpointer
    progress: NullProgress
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    """The step ``last_eval`` was measured at; ``None`` before the first evaluation (or in an old checkpoint)."""
    stop_requested: bool = False
    label_sets: LabelSets = field(default_factory=LabelSets)
    """Partial-label table of the shards (set ids 12, 13, ...); empty when the labels use none."""
    set_table: torch.Tensor | None = None
    """``label_sets`` as the loss's bool ``[S, 12]`` table on the device; ``None`` without sets."""
    normalization: dict[str, Any] = field(default_factory=lambda: {"mode": "zscore"})
    """The resolved input normalisation (recorded in every checkpoint and the logged model)."""
    label_map: dict[str, Any] | None = None
    """The training manifest's label map (what prediction decodes into)."""
    label_space: LabelSpace | None = None
    """The validation labels' space (``val/label/...``); ``None``: every fine class."""
    sources: DataSources | None = None
    """The run's data sources (one for a plain ``data.train`` string) with the merged set table."""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        use_bf16 = self.spec.run.precision == "bf16" and self.ctx.device.type == "cuda"
        return torch.bfloat16 if use_bf16 else None


def per_rank_batch(spec: JobSpec, ctx: DistContext) -> int:
    """The one validated layout: every rank takes ``data.batch_size / world`` samples per step."""
    batch, world = spec.data.batch_size, ctx.world_size
    if batch % world:
        raise ValueError(
            f"data.batch_size {batch} does not divide over {world} training processes: every rank must take the same "
            f"number of samples; use a multiple of {world} ({world} processes from the launcher; run.num_workers "
            f"says {spec.run.num_workers})"
        )
    return batch // world


def _build_model(spec: JobSpec, ctx: DistContext, hierarchy: Hierarchy) -> tuple[UNet, torch.nn.Module]:
    torch.manual_seed(spec.run.seed)  # same initial weights on every rank
    model = build_model(spec.model, hierarchy, source_names=spec.data.source_names()).to(ctx.device)
    # Not source_batch: a rank whose batch lacks a source would skip that layer's collective (a hang).
    if ctx.distributed and ctx.device.type == "cuda" and spec.model.norm == "batch":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics over the global batch
    if ctx.device.type == "cuda" and spec.model.channels_last:
        model = model.to(memory_format=memory_format(spec))
    train_model: torch.nn.Module = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if spec.model.compile:
        train_model = torch.compile(train_model)
    return model, train_model


def memory_format(spec: JobSpec) -> torch.memory_format:
    """``model.channels_last``'s layout: channels_last for 4D (2D) tensors, channels_last_3d for 5D (3D) ones."""
    return torch.channels_last_3d if spec.model.dims == 3 else torch.channels_last


def build_job(spec: JobSpec, ctx: DistContext, run_id: str | None) -> Job:
    batch = per_rank_batch(spec, ctx)
    hierarchy = spec.hierarchy.build()
    model, train_model = _build_model(spec, ctx, hierarchy)
    optimizer = build_optimizer(spec.optim, model)
    sources = resolve_sources(spec.data)  # every source's manifests checked, set tables merged
    if model.priors is not None:  # a resumed run loads its learned priors over these
        model.init_source_priors([s.labelled_classes() for s in sources.sources], hierarchy.luts())
    label_sets = sources.label_sets
    norm = sources.normalization(spec.data.normalization)
    torch.manual_seed(spec.run.seed + 1000 + ctx.rank)  # per-rank stream for dropout and friends
    stream = build_train_loader(
        spec.data, rank=ctx.rank, world_size=ctx.world_size, batch_size=batch, seed=spec.run.seed,
        normalization=norm, num_labels=NUM_FINE_CLASSES + len(label_sets), sources=sources,
    )  # fmt: skip
    return Job(
        spec=spec,
        ctx=ctx,
        hierarchy=hierarchy,
        luts=[lut.to(ctx.device) for lut in hierarchy.luts()],
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=build_scheduler(spec.optim, optimizer, spec.run.max_steps),
        stream=stream,
        tracker=MlflowTracker(spec.tracking.uri, run_id) if ctx.is_main and run_id else NullTracker(),
        checkpoints=build_checkpointer(spec, ctx),
        progress=build_progress(spec, ctx),
        label_sets=label_sets,
        set_table=label_sets.table().to(ctx.device) if len(label_sets) else None,
        normalization=norm,
        label_map=sources.label_map,
        label_space=sources.label_space(),
        sources=sources,
    )


def train_step(job: Job, images: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor | None = None) -> LossTerms:
    """Forward, masked hierarchical loss with the global valid count, backward, clip, step.

    ``sources``: each sample's data source (``[B]``, several training sources), for ``norm: source_batch``.
    """
    device = job.ctx.device
    images_BCS = images.to(device, non_blocking=True)  # S: (H, W), or (D, H, W) for a 3D model
    y_BS = labels.to(device, non_blocking=True).long()  # int16 from the loader; the loss indexes with int64
    if device.type == "cuda" and job.spec.model.channels_last:
        images_BCS = images_BCS.contiguous(memory_format=memory_format(job.spec))
    source_B = sources.to(device) if sources is not None and job.model.source_names else None
    dtype = job.autocast_dtype
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits_fine, logits_coarse = job.train_model(images_BCS, source_B)
    terms = hierarchical_loss(logits_fine, logits_coarse, y_BS, job.luts, job.spec.lambdas(), label_sets=job.set_table)
    # The logged terms are global (identical on every rank), so every rank stops together.
    if not bool(torch.isfinite(terms.loss_fine) and torch.isfinite(terms.loss_coarse).all()):
        raise FloatingPointError(
            f"non-finite loss at step {job.step + 1}: fine={float(terms.loss_fine)}, "
            f"coarse={terms.loss_coarse.tolist()}; lower optim.lr or check the input data"
        )
    job.optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    if job.spec.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(job.model.parameters(), job.spec.optim.grad_clip)
    job.optimizer.step()
    job.scheduler.step()
    return terms


def eval_options(job: Job, label_map: Any = None, source: str | None = None) -> PredictOptions:
    """``hierseg predict``'s defaults for this model: windows of the patch size, 1/8 overlap, its decoding.

    ``label_map``: decode for that source's labels (a multi-source run); default: the model's own. ``source``:
    that source's name, whose statistics a ``source_batch`` model normalises with. A 3D model scores its
    validation blocks in non-overlapping windows of the 3D patch size (``window``).
    """
    patch = job.spec.data.patch_size
    tile, window = (patch, None) if isinstance(patch, int) else (patch[-1], tuple(patch))
    decode = "labels" if len(job.label_sets) and (label_map or job.label_map) else "fine"
    names = job.model.source_names
    return PredictOptions(tile=tile, overlap=tile // 8, decode=decode, amp=job.autocast_dtype is not None,
                          coarse_threshold=coarse_threshold_for(job.spec), window=window,
                          source=names.index(source) if names and source else None)  # fmt: skip


def sync_buffers(job: Job) -> None:
    """Every rank takes rank 0's buffers (batch-norm statistics), so evaluation and checkpoints agree by rank."""
    if job.ctx.distributed:
        for buffer in job.model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def evaluate(job: Job) -> dict[str, float]:
    """Whole validation split once across ranks; counts all-reduced once; figures on the owner."""
    ctx = job.ctx
    sync_buffers(job)
    batches = build_val_loader(
        job.spec.data, rank=ctx.rank, world_size=ctx.world_size, normalization=job.normalization,
        num_labels=NUM_FINE_CLASSES + len(job.label_sets), sources=job.sources,
    )  # fmt: skip
    if job.sources is not None and job.sources.multi:
        metrics, summary, sample = _evaluate_sources(job, batches)
    else:
        space = job.label_space
        opts = eval_options(job)
        metrics, sample = run_eval(job.model, batches, job.hierarchy, ctx.device, opts, job.label_sets, space)
        metrics.all_reduce()
        summary = summarize(metrics, job.hierarchy, space)
    job.tracker.log_metrics(summary, job.step)
    job.tracker.log_eval_figures(metrics, sample, job.hierarchy, job.step)
    job.tracker.flush()
    job.last_eval, job.last_eval_step = summary, job.step
    _update_best(job, summary)
    return summary


def _evaluate_sources(job: Job, batches: Any) -> tuple[EvalMetrics, dict[str, float], Any]:
    """Per-source counts (each source decoded in its own label space), reduced in one collective."""
    val_sources = job.sources.val_sources
    per_source = [(eval_options(job, (s.val_manifest or {}).get("label_map"), s.name), s.label_space())
                  for s in val_sources]  # fmt: skip
    parts, sample = run_eval_sources(job.model, batches, job.hierarchy, job.ctx.device, per_source, job.label_sets)
    all_reduce_metrics(parts)
    together = EvalMetrics.summed(parts)
    named = {s.name: m for s, m in zip(val_sources, parts, strict=True)}
    spaces = {s.name: space for s, (_, space) in zip(val_sources, per_source, strict=True)}
    summary = summarize_sources(named, job.hierarchy, spaces, together, job.label_space)
    return together, summary, sample


def _update_best(job: Job, summary: dict[str, float]) -> None:
    metric, mode = job.spec.run.best_metric, job.spec.run.best_mode
    value = summary.get(metric, math.nan)
    best = job.best.get("value")
    if math.isnan(value) or (best is not None and (value <= best if mode == "max" else value >= best)):
        return
    job.best = {"value": value, "step": job.step, "metrics": summary}
    job.checkpoints.save_best(job.model.state_dict(), job.spec, job.step, summary)


def checkpoint_state(job: Job) -> dict[str, Any]:
    """Everything needed to resume exactly; gathers every rank's loader position and RNG (collective)."""
    per_rank = all_gather_objects({"loader": job.stream.state_dict(), "rng": rng_state()}, job.ctx)
    return {
        "step": job.step,
        "model": job.model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "per_rank": per_rank,
        "world_size": job.ctx.world_size,
        "best": {k: v for k, v in job.best.items() if k != "metrics"},
        "best_metrics": job.best.get("metrics", {}),
        "last_eval": job.last_eval,
        "last_eval_step": job.last_eval_step,
        "spec": job.spec.model_dump(mode="json"),
        "run_id": job.tracker.run_id,
        "patch_size": job.spec.data.patch_size,
        "normalization": job.normalization,
        "label_map": job.label_map,
    }


def save_checkpoint(job: Job) -> None:
    sync_buffers(job)
    state = checkpoint_state(job)
    metric = job.spec.run.best_metric
    score = job.last_eval.get(metric, -math.inf if job.spec.run.best_mode == "max" else math.inf)
    job.checkpoints.save(state, {"step": job.step, metric: score})
    job.tracker.flush()  # metrics since the last evaluation reach MLflow before a crash can lose them


def resume(job: Job) -> None:
    if not job.spec.run.resume:
        return
    state = job.checkpoints.load_latest()
    if state is None:
        return
    job.model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.step = int(state["step"])
    job.best = dict(state["best"], metrics=state["best_metrics"]) if state["best"] else {}
    job.last_eval, job.last_eval_step = state["last_eval"], state.get("last_eval_step")
    if state["world_size"] == job.ctx.world_size:
        mine = state["per_rank"][job.ctx.rank]
        job.stream.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])
    else:
        job.stream.load_state_dict(state["per_rank"][0]["loader"])  # warns: restarts at the saved epoch
    job.progress.note(f"resumed from step {job.step}")


def _agree_to_stop(job: Job) -> bool:
    """Symmetric: every rank learns whether any rank was asked to stop (signal or stop_at_step)."""
    at_stop_step = job.spec.run.stop_at_step is not None and job.step >= job.spec.run.stop_at_step
    flag = torch.tensor([int(job.stop_requested or at_stop_step)], device=job.ctx.device)
    return bool(all_reduce_(flag, job.ctx).item())


@contextlib.contextmanager
def _stop_handlers(job: Job) -> Iterator[None]:
    """SIGUSR1/SIGTERM/SIGINT (preemption, shutdown, Ctrl-C): checkpoint at the next boundary, exit.

    A second Ctrl-C exits at once, for a user who does not want to wait for the boundary. The previous
    handlers come back on exit: a handler left behind would keep the job, and its DDP model, alive past
    the process group (see ``close_context``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray runs the loop in a worker thread; Ray handles its own shutdown
        return

    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and job.stop_requested:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            job.progress.note("Ctrl-C: checkpointing at the next boundary (press again to exit at once)")
        job.stop_requested = True

    signals = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_loop(job: Job) -> bool:
    """Train until ``run.max_steps`` (returns True) or an agreed stop (checkpoint, returns False)."""
    run = job.spec.run
    eval_every = run.eval_every or run.max_steps
    ckpt_every = run.checkpoint_every or eval_every
    batches = iter(job.stream)
    job.progress.start(job.step, num_parameters(job.model))
    if job.step >= run.max_steps and job.last_eval_step != job.step:
        # Resumed from the checkpoint taken just before the final evaluation (a worker died or the evaluation
        # failed): evaluate now, or the run ends FINISHED without its final val/* figures and best checkpoint.
        job.progress.note_eval(evaluate(job))
        save_checkpoint(job)
    while job.step < run.max_steps:
        t0 = time.perf_counter()
        images, labels, *sources = next(batches)  # several training sources: each sample's source too
        t_data = time.perf_counter()
        terms = train_step(job, images, labels, *sources)
        job.step += 1
        job.progress.update(terms, images.shape[0] * job.ctx.world_size, t_data - t0, time.perf_counter() - t0)
        last = job.step == run.max_steps
        if job.step % run.log_every == 0 or last:
            job.tracker.log_metrics(job.progress.pop_window(job.step, job.scheduler.get_last_lr()[0]), job.step)
        if last:
            save_checkpoint(job)  # a failing final evaluation must never cost the training run
        if job.step % eval_every == 0 or last:
            job.progress.note_eval(evaluate(job))
        if job.step % ckpt_every == 0 or last:
            save_checkpoint(job)
        boundary = job.step % run.log_every == 0 or job.step % ckpt_every == 0 or job.step == run.stop_at_step
        if boundary and not last and _agree_to_stop(job):
            if job.step % ckpt_every:
                save_checkpoint(job)
            job.progress.note(f"stopping at step {job.step} (checkpoint saved; rerun the same spec to resume)")
            return False
    return True


def log_best_model(job: Job) -> str | None:
    """The best checkpoint as the run's MLflow model (registered when ``tracking.registered_model`` is set).

    2D and 3D alike: the logged pyfunc predicts as ``hierseg predict`` does with the model's defaults
    (:mod:`hierseg.serve.mlflow_model`), images for a 2D model, one ``[D, H, W]`` volume for a 3D one.
    """
    return job.tracker.log_model(job.checkpoints.best_dir(), job.spec)


def train_worker(config: dict[str, Any], ctx: DistContext | None = None) -> dict[str, Any]:
    """Run on every rank: build, resume, train, evaluate, checkpoint; log the best model at the end.

    ``config``: ``{"spec": resolved spec dict, "launcher": ray|torchrun|local, "run_id": MLflow run}``.
    """
    from hierseg.train.context import close_context, init_context

    spec = JobSpec.model_validate(config["spec"])
    own_ctx = ctx is None
    ctx = ctx or init_context(spec, config["launcher"])
    try:
        job = build_job(spec, ctx, config.get("run_id"))
        with _stop_handlers(job):
            resume(job)
            finished = run_loop(job)
            job.tracker.wait()
            log_model = finished and spec.tracking.log_model and job.best
            model_uri = log_best_model(job) if log_model else None
            job.progress.finish(job.best, model_uri)
            return {"finished": finished, "step": job.step, "best": job.best, "model_uri": model_uri}
    finally:
        if own_ctx:
            close_context(ctx)
