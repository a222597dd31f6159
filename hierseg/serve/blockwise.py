"""Blockwise prediction of a chunked volume on Ray (``hierseg predict --ray``), resumable, into zarr.

Why blocks: a connectomics volume is far beyond one process, so it is cut into a grid of ``--block``
blocks, and Ray actors (``--ray-workers``; each loads the model once) predict blocks and write each
block's interior straight into the output's zarr chunks. The chunks are the block grid, so no two
writers ever touch one chunk.

Why the output equals ``hierseg predict`` of the whole volume: a block runs the windows of the *whole
slice's* sliding-window grid that touch it (:func:`hierseg.serve.infer.predict_region_probs`: same windows,
blending and batch sizes), on pixels normalised with whole-slice statistics (z-score: computed once per
slice by the workers, before the blocks). Labels are then bit-identical and probabilities equal, given
the same torch thread count: CPU kernels round differently with 1 and 2 threads (so does ``predict``
run twice with different counts), and every worker runs :data:`WORKER_THREADS` thread(s).

The context a block reads is the box of those windows: at least ``--overlap`` and less than ``--tile``
pixels past the block (the volume's edges permitting). ``--halo`` is checked to be at least the overlap,
the context seamless blending needs; for a 2D model the z halo is 0 (slices are independent).

A 3D model's block runs the windows of the *whole volume's* 3D grid that touch it, the same way (one region
in z, y and x; each slice normalised with its whole-slice statistics), so its output equals single-process
3D ``predict`` just as well; its z halo must be at least the z overlap (default ``--halo``: the overlaps).

Resume: ``block_done`` (uint8 over the block grid, one chunk per block; zarr writes chunks atomically)
marks a block only after its outputs are written, and a rerun predicts the unmarked blocks only. The
store's ``hierseg_blockwise`` attribute records the model's weights digest, the input and the settings;
another model or settings on it is refused unless ``--overwrite``. A worker that dies (SIGKILL, OOM) is
restarted by Ray and its block retried; rewriting a block writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hierseg.data.io import VoxelSize
from hierseg.serve.infer import (
    PredictError,
    PredictOptions,
    Predictor,
    _as_chw,
    block_input,
    context_of,
    decide,
    default_options,
    in_channels_of,
    load_predictor,
    per_axis,
    predict_region_probs,
    region_tiles,
)
from hierseg.serve.tracked import PredictionRun

RECORD_ATTR = "hierseg_blockwise"
DONE_ARRAY = "block_done"
WORKER_THREADS = 1
"""torch threads per worker (and the CPUs Ray reserves for it); results depend on the thread count."""
WORKER_RESTARTS = 3
"""A worker that dies is restarted, and its block retried, this many times before the run fails."""
INFORMATIONAL = ("model",)
"""Record fields shown but not compared on resume: the same weights under another URI are the same model."""

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class BlockGrid:
    """The ``--block`` grid over a ``[Z, H, W]`` volume; edge blocks are cut at the volume's edge."""

    shape: Triple
    block: Triple

    @property
    def counts(self) -> Triple:
        return tuple(-(-n // b) for n, b in zip(self.shape, self.block))  # type: ignore[return-value]

    def blocks(self) -> list[Triple]:
        return [tuple(int(i) for i in index) for index in np.ndindex(*self.counts)]  # type: ignore[misc]

    def interior(self, index: Triple) -> tuple[int, int, int, int, int, int]:
        """``(z0, z1, y0, y1, x0, x1)`` of block ``index``, half-open."""
        bounds = []
        for i, b, n in zip(index, self.block, self.shape):
            bounds += [i * b, min((i + 1) * b, n)]
        return tuple(bounds)  # type: ignore[return-value]

    def voxels(self, index: Triple) -> int:
        z0, z1, y0, y1, x0, x1 = self.interior(index)
        return (z1 - z0) * (y1 - y0) * (x1 - x0)


@dataclass(frozen=True)
class Job:
    """What every worker needs, with absolute paths (Ray workers do not run in the driver's folder)."""

    model: str
    tracking_uri: str | None
    label_map: str | None
    input: str
    output: str
    options: PredictOptions
    grid: BlockGrid
    voxel: VoxelSize | None = None  # recorded in an OME-Zarr output
    dims: int = 2  # the model's: a 2D model predicts a block slice by slice, a 3D one as one region

    def context(self, interior: tuple[int, ...]) -> tuple[int, ...]:
        """The box ``(z0, z1, y0, y1, x0, x1)`` a block's windows read (2D: per slice, z the block's own range)."""
        if self.dims == 3:
            return region_tiles(*self.grid.shape, interior, self.options)[1]
        return interior[:2] + region_tiles(*self.grid.shape[1:], interior[2:], self.options)[1]

    def slices_read(self, index: Triple) -> range:
        """The z slices block ``index`` reads: those whose whole-slice statistics its normalisation needs."""
        interior = self.grid.interior(index)
        return range(*(self.context(interior) if self.dims == 3 else interior)[:2])


@dataclass(frozen=True)
class BlockwiseResult:
    """What a run did: ``computed`` blocks predicted now, ``skipped`` ones found done."""

    blocks: int
    computed: int
    skipped: int
    voxels: int
    seconds: float
    voxel: VoxelSize | None = None  # the output's voxel size (OME-Zarr)

    def summary(self) -> str:
        rate = f"{self.computed / self.seconds:.2f} blocks/s, {self.voxels / self.seconds:.3g} voxels/s"
        done = f"{self.computed} of {self.blocks} blocks predicted ({self.skipped} were done)"
        return f"{done} in {self.seconds:.1f} s: {rate}"


# -------------------------------------------------------------------------------------- the plan
def parse_shape(text: str, flag: str, halo: bool = False) -> Triple:
    """``"Z,Y,X"`` (a halo also ``"Y,X"``) -> three ints; a one-line error naming ``flag`` otherwise."""
    parts = text.split(",")
    if halo and len(parts) == 2:
        parts = ["0", *parts]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < (0 if halo else 1):
        form = "Y,X or Z,Y,X of integers >= 0" if halo else "Z,Y,X of integers >= 1"
        raise PredictError(f"{flag} {text}: give {form}")
    return values  # type: ignore[return-value]


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def check_plan(shape: Triple, block: Triple, halo: Triple, overlap: int | tuple[int, ...], dims: int = 2) -> None:
    """A block fits the volume; the halo covers the windows' overlap (2D: and has no z)."""
    for axis, b, n in zip("zyx", block, shape):
        if b > n:
            fit = _csv(tuple(min(b_, n_) for b_, n_ in zip(block, shape)))
            raise PredictError(f"--block {_csv(block)} is larger than the volume {_csv(shape)} along {axis}; "
                               f"give at most --block {fit}")  # fmt: skip
    if dims == 3:
        overlap_S = per_axis(overlap, 3)
        short = [axis for axis, h, o in zip("zyx", halo, overlap_S) if h < o]
        if short:
            fix = _csv(tuple(max(h, o) for h, o in zip(halo, overlap_S)))
            raise PredictError(f"--halo {_csv(halo)} is smaller than the window overlap {_csv(overlap_S)} in "
                               f"{','.join(short)}: the 3D windows blend over it; give at least --halo {fix} "
                               "(or a smaller --overlap)")  # fmt: skip
        return
    if halo[0] != 0:
        raise PredictError(f"--halo {_csv(halo)}: the 2D model predicts each z slice on its own, so the z halo "
                           f"must be 0; give --halo {_csv(halo[1:])}")  # fmt: skip
    if min(halo[1:]) < overlap:
        raise PredictError(f"--halo {_csv(halo[1:])} is smaller than the tile overlap {overlap}; give at least "
                           f"--halo {overlap},{overlap} (or a smaller --overlap)")  # fmt: skip


def _absolute_source(spec: str) -> str:
    """``file.h5:dataset`` / ``x.zarr:array`` / a path, with the file part made absolute."""
    from hierseg.data.io import split_source

    path, inner = split_source(spec)
    return f"{path.absolute()}:{inner}" if inner else str(path.absolute())


def _absolute_uri(uri: str | None) -> str | None:
    """A relative ``sqlite:///file.db`` made absolute; other URIs as they are."""
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).absolute())
    return uri


def load_job_predictor(model: str, tracking_uri: str | None, label_map: str | None) -> Predictor:
    predictor = load_predictor(model, tracking_uri)
    return predictor.decoding_into(label_map) if label_map else predictor


def plan_job(args: argparse.Namespace) -> tuple[Job, Predictor]:
    """Validate the flags against the input and the model; the job every worker runs, and the driver's model."""
    from hierseg.serve.omezarr import output_voxel_size
    from hierseg.serve.stackio import check_not_input, open_input

    if not args.ray:
        raise PredictError("--block, --halo and --track work with --ray only; add --ray or drop them")
    if not args.block:
        raise PredictError("--ray needs --block Z,Y,X (the block shape and output chunks, e.g. 8,1024,1024)")
    if args.ray_workers < 1:
        raise PredictError(f"--ray-workers {args.ray_workers}: give at least 1")
    if Path(args.output).suffix != ".zarr":
        raise PredictError(f"--output {args.output}: --ray writes a zarr store; give a path ending in .zarr "
                           "(.ome.zarr for OME-Zarr)")  # fmt: skip
    check_not_input(args.output, args.input)
    source = open_input(args.input)
    shape, is_2d = tuple(source.shape), source.is_2d
    voxel = output_voxel_size(args.voxel_size, source.voxel_size, args.output)
    source.close()
    if is_2d or len(shape) != 3:
        raise PredictError(f"--input {args.input} has shape {shape}, not a stack [Z, H, W]; predict it without --ray")
    block = parse_shape(args.block, "--block")
    tracking_uri = _absolute_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    model = args.model if args.model.startswith(("models:/", "runs:/")) else str(Path(args.model).absolute())
    label_map = str(Path(args.label_map).absolute()) if args.label_map else None
    predictor = load_job_predictor(model, tracking_uri, label_map)
    if predictor.dims == 2 and context_of(predictor.model):
        raise PredictError(f"--model {args.model} is a 2.5D model (+-{context_of(predictor.model)} slices as "
                           "channels): it predicts without --ray for now")  # fmt: skip
    # as hierseg.serve.infer.main; workers use a GPU only when --device names one
    opts = default_options(
        predictor, tile=args.tile, overlap=args.overlap, batch=args.batch,
        decode=args.decode or ("labels" if args.label_map else None),
        fine_threshold=args.fine_threshold, coarse_threshold=args.coarse_threshold,
        device=args.device or "cpu", amp=not args.no_amp, tta=args.tta, source=args.source,
    )  # fmt: skip
    if opts.decode == "labels" and not predictor.label_space:
        raise PredictError("--decode labels needs the model's training label map; use --decode fine")  # as decide
    dims = predictor.dims
    default_halo = per_axis(opts.overlap, 3) if dims == 3 else (0, opts.overlap, opts.overlap)
    halo = parse_shape(args.halo, "--halo", halo=True) if args.halo else default_halo
    check_plan(shape, block, halo, opts.overlap, dims)  # type: ignore[arg-type]
    grid = BlockGrid(shape, block)  # type: ignore[arg-type]
    job = Job(model, tracking_uri, label_map, _absolute_source(args.input), str(Path(args.output).absolute()),
              opts, grid, voxel, dims)  # fmt: skip
    return job, predictor


# ------------------------------------------------------------------------------------- the store
def weights_digest(model: Any) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes): the model's identity."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def job_record(job: Job, predictor: Predictor) -> dict[str, Any]:
    """The store's ``hierseg_blockwise`` attribute: everything the output's values depend on."""
    opts, space = job.options, predictor.label_space
    return {
        "model": job.model,
        "weights_sha256": weights_digest(predictor.model),
        "input": job.input,
        "shape": list(job.grid.shape),
        "block": list(job.grid.block),
        "tile": _recorded(opts.tile),  # a 3D model's [z, y, x]
        "overlap": _recorded(opts.overlap),
        "batch": opts.batch,  # CPU kernels round batches of different sizes differently
        "decode": opts.decode,
        "fine_threshold": opts.fine_threshold,
        "coarse_threshold": opts.coarse_threshold,
        "device": "cuda" if opts.device.startswith("cuda") else opts.device,
        "amp": opts.amp and opts.device.startswith("cuda"),
        "normalization": dict(predictor.normalization),
        "coarse_groups": list(predictor.hierarchy.levels[0].group_names),
        "label_values": [[v.code, list(v.members)] for v in space.values] if opts.decode == "labels" else None,
        "voxel_size": job.voxel.record() if job.voxel else None,  # OME-Zarr metadata: another one is refused
        # only when on, so a store written before --tta existed still resumes
        **({"tta": True} if opts.tta else {}),
        **({"source": opts.source} if opts.source is not None else {}),
    }


def _recorded(value: int | tuple[int, ...]) -> int | list[int]:
    """As the store's JSON attribute reads back (a list, never a tuple), so a resumed run compares equal."""
    return value if isinstance(value, int) else list(value)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(INFORMATIONAL))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _reopen(job: Job, record: dict[str, Any]) -> list[Triple]:
    """An existing store of the same job: the blocks not yet done; any other store is refused."""
    import zarr

    where = f"--output {job.output}"
    try:
        root = zarr.open_group(job.output, mode="r")
        old = root.attrs.get(RECORD_ATTR)
        done = np.asarray(root[DONE_ARRAY][...]) if old else None
    except Exception as e:
        raise PredictError(f"{where} exists but is not a readable zarr store ({type(e).__name__}: {e}); "
                           "pass --overwrite or choose another path") from None  # fmt: skip
    if old is None:
        raise PredictError(f"{where} already exists and was not written by predict --ray; pass --overwrite "
                           "or choose another path")  # fmt: skip
    diff = _differences(dict(old), record)
    if diff:
        shown = "; ".join(d if len(d) < 120 else d[:117] + "..." for d in diff[:4])
        raise PredictError(f"{where} was written by another model or settings ({shown}); pass --overwrite to "
                           "replace it, or choose another path")  # fmt: skip
    return [index for index in job.grid.blocks() if not done[index]]


def _create(job: Job, record: dict[str, Any], k: int) -> None:
    """The arrays :func:`hierseg.serve.stackio.open_output` writes (either layout), chunked on the block grid, plus
    ``block_done``."""
    from hierseg.serve.stackio import _layouts, create_zarr_outputs

    def on_the_grid(shape: tuple[int, ...]) -> tuple[int, ...]:
        return job.grid.block if len(shape) == 3 else (1, *job.grid.block)

    layouts = _layouts(job.grid.shape, k, False, record["label_values"] is not None)
    root, _ = create_zarr_outputs(Path(job.output), layouts, on_the_grid, job.voxel, tuple(record["coarse_groups"]))
    root.create_array(DONE_ARRAY, shape=job.grid.counts, dtype="uint8", chunks=(1, 1, 1), fill_value=0)
    root.attrs[RECORD_ATTR] = record  # last: a store without it is an unfinished creation, never resumed


def open_store(job: Job, record: dict[str, Any], k: int, overwrite: bool) -> list[Triple]:
    """Create the output store (``k`` coarse groups), or reopen the same job's one; the blocks still to predict."""
    from hierseg.serve.stackio import StackError, _prepare_zarr

    path = Path(job.output)
    if path.exists() and not overwrite:
        return _reopen(job, record)
    try:
        _prepare_zarr(path, overwrite)  # replaces hierseg's own arrays only
        _create(job, record, k)
    except StackError as e:
        raise PredictError(str(e)) from None
    except OSError as e:
        raise PredictError(f"cannot write --output {job.output}: {e}") from None
    return job.grid.blocks()


# ------------------------------------------------------------------------------------ the workers
class BlockWorker:
    """One Ray actor: loads the model once, then predicts blocks of one volume into one store."""

    def __init__(self, job: Job) -> None:
        import torch
        import zarr

        from hierseg.serve.stackio import open_input, zarr_output_arrays

        torch.set_num_threads(WORKER_THREADS)
        self.job, self.opts = job, job.options
        self.predictor = load_job_predictor(job.model, job.tracking_uri, job.label_map)
        self.predictor.model = self.predictor.model.to(torch.device(self.opts.device))
        self.norm = self.predictor.normalization or {"mode": "zscore"}  # as predict_image
        self.lut = self.predictor.hierarchy.lut()
        self.in_channels = in_channels_of(self.predictor.model)
        self.source = open_input(job.input)
        root = zarr.open_group(job.output, mode="r+")
        self.arrays = zarr_output_arrays(root)
        self.done = root[DONE_ARRAY]

    def digest(self) -> str:
        return weights_digest(self.predictor.model)

    def slice_stats(self, z: int) -> dict[str, float]:
        """Whole-slice z-score statistics, from the same array ``predict`` normalises."""
        from hierseg.data.normalize import image_stats

        return image_stats(self.source[z])

    def predict_block(self, index: Triple, stats: dict[int, dict[str, float]] | None) -> int:
        """Predict block ``index``, write its interior, then mark it done; returns its voxel count."""
        z0, z1, y0, y1, x0, x1 = interior = self.job.grid.interior(index)
        if self.job.dims == 3:
            out = self._predict_region(interior, stats)
        else:
            outs = [self._predict_part(z, (y0, y1, x0, x1), stats[z] if stats else None) for z in range(z0, z1)]
            out = {name: np.stack([o[name] for o in outs], axis=1 if name == "coarse_prob" else 0) for name in outs[0]}
        for name, arr in self.arrays.items():
            if name == "coarse_prob":
                arr[:, z0:z1, y0:y1, x0:x1] = out[name]
            else:
                arr[z0:z1, y0:y1, x0:x1] = out[name]
        self.done[index] = 1  # only now: a block stopped before this line is predicted again
        return self.job.grid.voxels(index)

    def _predict_region(self, interior: tuple[int, ...], stats: Any) -> dict[str, np.ndarray]:
        """A 3D model's outputs ``[d, h, w]`` of a block, from the box of the whole volume's windows that touch it."""
        fz0, fz1, fy0, fy1, fx0, fx1 = box = self.job.context(interior)
        raw = self.source.read(slice(fz0, fz1), slice(fy0, fy1), slice(fx0, fx1))
        x = block_input(raw, self.norm, self.in_channels, [stats[z] for z in range(fz0, fz1)] if stats else None)
        probs = predict_region_probs(self.predictor.model, x, box[0::2], self.job.grid.shape, interior, self.opts)
        return decide(probs, self.lut, self.opts, self.predictor.label_space)

    def _predict_part(self, z: int, interior: tuple[int, int, int, int], stats: Any) -> dict[str, np.ndarray]:
        from hierseg.data.normalize import normalize

        _, h, w = self.job.grid.shape
        _, (fy0, fy1, fx0, fx1) = region_tiles(h, w, interior, self.opts)
        raw = self.source.read(z, slice(fy0, fy1), slice(fx0, fx1))
        x = _as_chw(normalize(raw, self.norm, stats), self.in_channels)
        probs = predict_region_probs(self.predictor.model, x, (fy0, fx0), (h, w), interior, self.opts)
        return decide(probs, self.lut, self.opts, self.predictor.label_space)


# ------------------------------------------------------------------------------------- the driver
def init_ray(workers: int, gpus: int) -> bool:
    """Join ``RAY_ADDRESS``, else start a private local cluster on 127.0.0.1 (as training does).

    Returns whether this call connected (and so must shut down); a Ray this process already runs is used as is.
    """
    import ray

    from hierseg.raycluster import PreflightError, check_ray_address, pin_ray_to_loopback, ray_address

    if ray.is_initialized():
        return False
    address = ray_address()
    if address:
        try:
            check_ray_address(address)
        except PreflightError as e:
            raise PredictError(str(e)) from None
        ray.init(address=address, log_to_driver=True)
        return True
    if gpus and not _cuda_available():
        raise PredictError("--device cuda asks a GPU per worker, but this machine has none and RAY_ADDRESS is "
                           "not set; use --device cpu, or join a GPU cluster through RAY_ADDRESS")  # fmt: skip
    pin_ray_to_loopback()
    # address="local": never join "the latest cluster" in Ray's temp folder; as many CPUs as workers at least,
    # so that no worker waits forever for a CPU a small machine lacks.
    cpus = max(os.cpu_count() or 1, workers * WORKER_THREADS)
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cpus, include_dashboard=False,
             log_to_driver=True)  # fmt: skip
    return True


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _worker_error(e: BaseException) -> PredictError:
    """A worker's exception (wrapped by Ray) as predict's one-line error."""
    from hierseg.cli import one_line, root_cause

    return PredictError(f"a Ray worker failed: {one_line(root_cause(e))}")


def _gpus_per_worker(job: Job) -> int:
    return 1 if job.options.device.startswith("cuda") else 0


def start_workers(job: Job, count: int, digest: str) -> list[Any]:
    """``count`` actors, restarted (and their block retried) when they die; each must load the driver's weights."""
    import ray

    actor = ray.remote(num_cpus=WORKER_THREADS, num_gpus=_gpus_per_worker(job), max_restarts=WORKER_RESTARTS,
                       max_task_retries=WORKER_RESTARTS)(BlockWorker)  # fmt: skip
    workers = [actor.remote(job) for _ in range(count)]
    try:
        digests = ray.get([w.digest.remote() for w in workers])
    except ray.exceptions.RayError as e:
        raise _worker_error(e) from None
    if any(d != digest for d in digests):
        raise PredictError(f"--model {job.model}: the workers loaded other weights than the driver (an alias moved "
                           "meanwhile?); run again")  # fmt: skip
    return workers


def _slice_stats(pool: Any, job: Job, todo: list[Triple], quiet: bool) -> dict[int, dict[str, float]]:
    """Whole-slice statistics of every slice a block to do reads: one worker task per slice, not per block."""
    from tqdm import tqdm

    zs = sorted({z for index in todo for z in job.slices_read(index)})
    stats = pool.map(lambda w, z: w.slice_stats.remote(z), zs)
    return dict(zip(zs, tqdm(stats, total=len(zs), desc="slice statistics", unit="slice", disable=quiet)))


def run_blocks(workers: list[Any], job: Job, todo: list[Triple], zscore: bool, quiet: bool) -> int:
    """Predict ``todo`` on the workers, a progress bar over blocks; returns the voxels predicted."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    pool = ActorPool(workers)
    voxels = 0
    try:
        stats = _slice_stats(pool, job, todo, quiet) if zscore else None
        work = [(index, {z: stats[z] for z in job.slices_read(index)} if stats else None) for index in todo]
        with tqdm(total=len(todo), desc="predict", unit="block", disable=quiet) as bar:
            for n in pool.map_unordered(lambda w, item: w.predict_block.remote(*item), work):
                voxels += n
                bar.update()
    except ray.exceptions.RayError as e:
        raise _worker_error(e) from None
    return voxels


def predict_blockwise(args: argparse.Namespace) -> BlockwiseResult:
    """``hierseg predict --ray``: plan, create or reopen the store, predict the blocks not done on Ray workers
    (with ``--track``, recorded as an MLflow run: :mod:`hierseg.serve.tracked`)."""
    job, predictor = plan_job(args)
    record = job_record(job, predictor)
    tracked = (
        PredictionRun.start(job.model, job.tracking_uri, job.output, record, args.ray_workers) if args.track else None
    )
    result = None
    try:
        result = _predict_blocks(args, job, predictor, record)
    finally:
        if tracked is not None:
            tracked.finish(result)
    return result


def _predict_blocks(args: argparse.Namespace, job: Job, predictor: Predictor, record: dict) -> BlockwiseResult:
    import ray

    todo = open_store(job, record, predictor.hierarchy.num_groups[0], args.overwrite)
    total = len(job.grid.blocks())
    if not todo:
        return BlockwiseResult(total, 0, total, 0, 0.0, job.voxel)
    zscore = (predictor.normalization or {"mode": "zscore"}).get("mode") == "zscore"  # as predict_image
    del predictor  # the workers load their own
    owned = init_ray(args.ray_workers, _gpus_per_worker(job))
    workers: list[Any] = []
    try:
        workers = start_workers(job, args.ray_workers, record["weights_sha256"])
        start = time.perf_counter()
        voxels = run_blocks(workers, job, todo, zscore, args.quiet)
        seconds = time.perf_counter() - start
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)
        if owned:
            ray.shutdown()
    return BlockwiseResult(total, len(todo), total - len(todo), voxels, seconds, job.voxel)


def main_blockwise(args: argparse.Namespace) -> int:
    """The ``--ray`` path of ``hierseg predict``: one-line errors exit 2, as predict's."""
    from hierseg.registry import RegistryError
    from hierseg.serve.omezarr import voxel_note
    from hierseg.serve.stackio import StackError

    try:
        result = predict_blockwise(args)
    except (PredictError, RegistryError, StackError, ConnectionError) as e:
        print(f"hierseg predict: {e}", file=sys.stderr)
        return 2
    if not result.computed:
        print(f"hierseg predict: all {result.blocks} blocks of {args.output} are done; nothing to predict")
    else:
        print(f"hierseg predict: {result.summary()}; wrote {args.output}{voxel_note(args.output, result.voxel)}")
    return 0
