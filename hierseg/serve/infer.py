"""Sliding-window, hierarchy-aware prediction of 2D images and 3D stacks (``hierseg predict``).

Why tiles: EM sections are larger than what fits through a U-Net at once, and training saw patches.
Tiles overlap and are blended with a smooth (cosine) window so seams do not show; when the image
fits in one window the result equals a whole-image forward pass (the window divides out). One
implementation serves 2D tiles ``[y, x]`` and a 3D model's windows ``[z, y, x]`` (``--tile Z,Y,X
--overlap Z,Y,X``): the grid, the blend window (a product of per-axis ramps) and the blending
(:func:`blend_slabs`) take any number of spatial axes.

Why slices are streamed: stacks can be larger than RAM, so slices are read one at a time from TIFF
pages, HDF5/zarr datasets or ``.npy`` memory maps, and written one at a time to the output. A 2D
model predicts each slice on its own; a 3D model reads z slabs as its windows reach them and writes
each slice once no later window touches it (:func:`predict_slabs`), the same result as predicting
the whole volume at once.

Outputs (per slice, then stacked):

- ``fine_labels`` uint8: fine class 0..11, restricted to the classes of the most probable coarse
  group wherever that group is confident (``>= coarse_threshold``), so fine and coarse agree.
- ``fine_confidence`` float16: softmax probability of the chosen fine class.
- ``coarse_prob`` float16 ``[K, ...]``: sigmoid probability of each group of the first hierarchy level.
- ``fallback`` uint8 (the coarse fallback map): ``0..11`` the fine class (fine confidence
  ``>= fine_threshold``); ``100 + k`` coarse group ``k`` (fine not confident but group ``k`` is);
  ``255`` undecided (neither is confident).
- ``label_values`` int32 (``--decode labels`` only): the winning value of the training label map.

Decoding (``--decode``): ``fine`` takes the fine argmax restricted by confident coarse groups;
``labels`` decides in the label space of the training data: each label-map value (a fine class or a
label set) has the summed softmax of its classes, the most probable value wins, and ``fine_labels``
is the best fine class inside it. So a model trained on a binary mitochondria mask labels
mitochondria exactly where mitochondria beats "anything but mitochondria". ``labels`` is the default
for a model trained with label sets, ``fine`` otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hierseg.data.normalize import LEGACY, normalize
from hierseg.labels import Hierarchy, LabelSets, LabelSpace

FALLBACK_GROUP_OFFSET = 100
COARSE_CONFIDENT = 0.9
"""A coarse group restricts the fine label only at this probability. Not 0.5: an untrained or unsure
sigmoid head sits near 0.5, and at 0.5 it restricted srf_tem's axon pixels to organelle classes that
data set never labels (held-out axon IoU 0.000 after 40 steps, bench/realdata.py --quick)."""
NO_COARSE = 2.0
"""A threshold no probability reaches: the coarse head never restricts the fine label nor fills the fallback."""
UNDECIDED = 255


def coarse_threshold_for(spec: Any) -> float:
    """The default coarse threshold of a model: none when its first coarse head was not trained.

    With ``loss.lambda_coarse: 0`` that head keeps its random weights on trained features, and its
    sigmoids saturate at random: restricting by it sent srf_tem's held-out myelin pixels to axon (myelin
    IoU 0.905 -> 0.636, bench/README.md).
    """
    return NO_COARSE if spec is not None and spec.lambdas()[0] == 0 else COARSE_CONFIDENT


OUTPUT_NAMES = ("fine_labels", "fine_confidence", "coarse_prob", "fallback")


class PredictError(ValueError):
    """A user error (bad model URI, input, output, option); the message names it and the fix."""


@dataclass
class PredictOptions:
    """Tiling and decision thresholds; defaults suit the quickstart model on CPU."""

    tile: int | tuple[int, ...] = 256
    """Window side, or ``(z, y, x)`` sides for a 3D model (one int: the same on every axis)."""
    overlap: int | tuple[int, ...] = 32
    """Overlap of neighbouring windows, per axis as ``tile``."""
    batch: int = 8
    fine_threshold: float = 0.5
    coarse_threshold: float = COARSE_CONFIDENT
    device: str | None = None  # None: cuda when available, else cpu
    amp: bool = True  # bf16 autocast on GPU (never on CPU)
    decode: str = "fine"  # "fine" or "labels" (see the module doc)
    tta: bool = False
    """Test-time augmentation: average each window's probabilities over the 8 quarter turns and mirror images
    of its y-x plane (:func:`window_probs`), for 8x the compute. Held-out srf_tem IoU +0.001 to +0.005
    (bench/README.md); off by default because whole-volume prediction is the expensive step."""
    source: int | None = None
    """The data source whose statistics a ``model.norm: source_batch`` model normalises with (its index in
    the training spec's ``data.train``; ``--source NAME``, :func:`source_index`); ``None`` for other models."""
    window: tuple[int, ...] | None = None
    """3D models, validation only: score a ``[D, H, W]`` block in non-overlapping windows of at most this
    ``[z, y, x]`` (:func:`block_windows`) instead of blended sliding windows (``tile``, ``overlap``)."""


# ------------------------------------------------------------------------------------------- tiling
Box = tuple[int, ...]
"""Half-open bounds per axis in voxels of the whole slice or volume: ``(y0, y1, x0, x1)`` in 2D,
``(z0, z1, y0, y1, x0, x1)`` in 3D."""


def per_axis(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """A window side or overlap on each of ``dims`` axes: one int is the same on every axis."""
    if isinstance(value, int):
        return (value,) * dims
    sides = tuple(int(v) for v in value)
    if len(sides) != dims:
        raise ValueError(f"{list(sides)} gives {len(sides)} sides for a {dims}D volume")
    return sides


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: every pixel covered, the last window flush with the edge."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def blend_window(window_S: Sequence[int], overlap_S: Sequence[int]) -> torch.Tensor:
    """The product over axes of a cosine ramp over that axis's overlap at each edge, 1 inside; never 0 so
    every voxel is weighted."""

    def ramp(n: int, overlap: int) -> torch.Tensor:
        r = torch.ones(n)
        m = min(overlap, n // 2)
        if m > 0:
            t = (torch.arange(m, dtype=torch.float32) + 0.5) / m
            edge = 0.5 - 0.5 * torch.cos(math.pi * t)
            r[:m], r[n - m :] = edge, edge.flip(0)
        return r.clamp_min(1e-3)

    dims = len(window_S)
    window = None
    for axis, (n, overlap) in enumerate(zip(window_S, overlap_S, strict=True)):
        r = ramp(n, overlap).view([n if a == axis else 1 for a in range(dims)])  # broadcast along this axis
        window = r if window is None else window * r
    return window


def _device_of(options: PredictOptions) -> torch.device:
    if options.device:
        return torch.device(options.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Grid:
    """The sliding windows of a volume: one window shape and, per axis, the window starts; window ``i`` is the
    ``i``-th of their product (the last axis fastest). Kept per axis because a large 3D volume has millions of
    windows, while a block needs only the few that touch it."""

    window_S: tuple[int, ...]
    starts_per_axis: tuple[list[int], ...]

    def __len__(self) -> int:
        return math.prod(len(starts) for starts in self.starts_per_axis)

    def start(self, i: int) -> tuple[int, ...]:
        """The first voxel of window ``i``."""
        start_S = []
        for starts in reversed(self.starts_per_axis):
            i, k = divmod(i, len(starts))
            start_S.append(starts[k])
        return tuple(reversed(start_S))


def grid_of(size_S: Sequence[int], options: PredictOptions) -> Grid:
    """The windows of a volume of ``size_S``: the tile, cut to the volume where it is larger, every ``tile -
    overlap`` voxels along each axis (:func:`tile_starts`)."""
    dims = len(size_S)
    window_S = tuple(min(t, n) for t, n in zip(per_axis(options.tile, dims), size_S, strict=True))
    overlap_S = per_axis(options.overlap, dims)
    return Grid(window_S, tuple(tile_starts(n, t, o) for n, t, o in zip(size_S, window_S, overlap_S, strict=True)))


def tile_grid(*sides_options: Any) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """``tile_grid(H, W, options)`` or ``tile_grid(D, H, W, options)``: the window shape and the starts of every
    window, in the order run (the last axis fastest)."""
    *size_S, options = sides_options
    grid = grid_of(size_S, options)
    return grid.window_S, list(itertools.product(*grid.starts_per_axis))


def region_tiles(*sides_interior_options: Any) -> tuple[list[int], Box]:
    """``region_tiles(H, W, interior, options)`` or ``region_tiles(D, H, W, interior, options)``: the windows of
    the whole volume's grid that touch ``interior`` (indices in the order run), and the box they cover (what
    must be read).

    That box reaches at least ``overlap`` voxels past the interior on each axis (the volume's edge permitting)
    and less than ``tile``: a window that ends earlier does not touch the interior.
    """
    *size_S, interior, options = sides_interior_options
    grid = grid_of(size_S, options)
    touching = [  # per axis, the starts' positions whose windows overlap the interior's range
        [k for k, s in enumerate(starts) if s < hi and s + t > lo]
        for starts, t, lo, hi in zip(grid.starts_per_axis, grid.window_S, interior[0::2], interior[1::2], strict=True)
    ]
    if not all(touching):
        raise ValueError(f"region {interior} lies outside the {' x '.join(map(str, size_S))} volume")
    counts = [len(starts) for starts in grid.starts_per_axis]
    strides = [math.prod(counts[axis + 1 :]) for axis in range(len(counts))]
    needed = [sum(k * st for k, st in zip(ks, strides)) for ks in itertools.product(*touching)]
    box: list[int] = []
    for starts, t, ks in zip(grid.starts_per_axis, grid.window_S, touching):
        box += [starts[ks[0]], starts[ks[-1]] + t]
    return needed, tuple(box)


def _batches(needed: list[int], num_tiles: int, batch: int) -> Iterator[tuple[list[int], int]]:
    """Runs of ``needed`` windows, each run as large as the batch the whole-volume pass puts those windows in.

    Why: CPU kernels round a batch of 1 differently from a batch of 8 (by ~1e-6), while a window's result does
    not depend on which other windows share its batch; so a region padded to the whole volume's batch sizes
    gets bit-identical probabilities. For the whole volume this gives exactly the consecutive batches.
    """
    run: list[int] = []
    size = 0
    for i in needed:
        n = min(batch, num_tiles - (i // batch) * batch)
        if run and (n != size or len(run) == size):
            yield run, size
            run = []
        run.append(i)
        size = n
    if run:
        yield run, size


class _Rows:
    """A tensor over rows ``[start, end)`` of a box (rows: its first spatial axis) that grows at the end and is
    dropped from the start: the part of the box that windows still to run read (input) or add to (sums)."""

    def __init__(self, start: int, data_CRS: torch.Tensor):
        self.start, self.data = start, data_CRS

    @property
    def end(self) -> int:
        return self.start + self.data.shape[1]

    def grow_to(self, end: int, read: Any = None) -> None:
        """Append rows ``[self.end, end)``, if any: those ``read(a, b)`` gives, else zeros."""
        if end > self.end:
            d = self.data
            rows = read(self.end, end) if read else d.new_zeros(d.shape[0], end - self.end, *d.shape[2:])
            self.data = torch.cat([d, rows], 1)

    def drop_before(self, row: int) -> None:
        if row > self.start:
            self.data = self.data[:, row - self.start :]
            self.start = row

    def at(self, start_S: tuple[int, ...], window_S: tuple[int, ...], lo_S: tuple[int, ...]) -> torch.Tensor:
        """The window of shape ``window_S`` starting at volume voxel ``start_S`` (the box starts at ``lo_S``)."""
        origin_S = (self.start, *lo_S[1:])
        return self.data[(slice(None), *(slice(s - o, s - o + t) for s, t, o in zip(start_S, window_S, origin_S)))]


@torch.no_grad()
def blend_slabs(
    model: torch.nn.Module,
    read: Any,
    size_S: tuple[int, ...],
    interior: Box,
    options: PredictOptions,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Blended probabilities of ``interior`` of a volume of ``size_S``, exactly as the whole volume's, in slabs
    along the first axis: ``(a, b, probs_PRS)`` for rows ``[a, b)``, each yielded once no later window touches it.

    ``read(a, b)`` gives the normalised input ``[C, b - a, ...]`` of rows ``[a, b)`` of :func:`region_tiles`' box
    (its extent on the other axes). It is called for consecutive rows, each read once, so memory stays the rows
    a batch of windows spans however long the first axis: a z stack larger than RAM streams in z slabs.
    Exact because it runs the whole volume's windows that touch the interior, with the same blend window,
    summed per voxel in the same order, in batches of the same sizes (:func:`_batches`).
    """
    device = next(model.parameters()).device
    grid, (needed, box) = grid_of(size_S, options), region_tiles(*size_S, interior, options)
    window_S, starts = grid.window_S, {i: grid.start(i) for i in needed}
    overlap_S = per_axis(options.overlap, len(size_S)) if len(grid) > 1 else (0,) * len(size_S)
    window = blend_window(window_S, overlap_S).to(device)
    lo_S, rest_S, (emit, stop) = box[0::2], tuple(b - a for a, b in zip(box[2::2], box[3::2])), interior[:2]
    crop = tuple(slice(a - lo, b - lo) for a, b, lo in zip(interior[2::2], interior[3::2], lo_S[1:]))
    ctx = autocast_for(options, device)
    runs = list(_batches(needed, len(grid), options.batch))
    x = _Rows(box[0], read(box[0], box[0] + window_S[0]))  # the input rows later windows still read
    acc = weight = None  # sum of probabilities times the window, and of the window, over rows not yet emitted
    for k, (run, size) in enumerate(runs):
        top = starts[run[-1]][0] + window_S[0]  # the grid runs the first axis slowest: the last window reaches furthest
        x.grow_to(top, read)
        tiles = [x.at(starts[i], window_S, lo_S) for i in run]
        tiles += tiles[-1:] * (size - len(run))  # pad to the whole-volume batch size; the extra results are dropped
        probs_BPS = window_probs(model, torch.stack(tiles).to(device), ctx, options.tta, options.source)
        if acc is None:
            acc = _Rows(box[0], probs_BPS.new_zeros(probs_BPS.shape[1], 0, *rest_S))
            weight = _Rows(box[0], window.new_zeros(1, 0, *rest_S))
        acc.grow_to(top)
        weight.grow_to(top)
        for i, p_PS in zip(run, probs_BPS[: len(run)]):
            acc.at(starts[i], window_S, lo_S).add_(p_PS * window)
            weight.at(starts[i], window_S, lo_S).add_(window)
        done = starts[runs[k + 1][0][0]][0] if k + 1 < len(runs) else stop  # later windows start at or past it
        if done > emit:
            a, b = emit - acc.start, done - acc.start
            yield emit, done, (acc.data[:, a:b] / weight.data[:, a:b])[(slice(None), slice(None), *crop)].cpu()
            emit = done
        for rows in (x, acc, weight):
            rows.drop_before(done)


def predict_region_probs(
    model: torch.nn.Module,
    image_CS: torch.Tensor,
    origin: tuple[int, ...],
    size_S: tuple[int, ...],
    interior: Box,
    options: PredictOptions,
) -> torch.Tensor:
    """Blended probabilities of ``interior`` of a slice or volume, exactly as :func:`predict_probs` of the whole.

    ``image_CS`` is the normalised input of a part of the volume holding :func:`region_tiles`' box, its voxel
    ``[0, ...]`` at volume voxel ``origin``; see :func:`blend_slabs` for why the result is exact.
    """
    _, box = region_tiles(*size_S, interior, options)
    rest = tuple(slice(a - o, b - o) for a, b, o in zip(box[2::2], box[3::2], origin[1:], strict=True))

    def read(a: int, b: int) -> torch.Tensor:
        return image_CS[(slice(None), slice(a - origin[0], b - origin[0]), *rest)]

    return torch.cat([probs for _, _, probs in blend_slabs(model, read, size_S, interior, options)], 1)


def autocast_for(options: PredictOptions, device: torch.device) -> Any:
    """bf16 autocast on GPU when ``options.amp``; a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if options.amp and device.type == "cuda" else nullcontext()


PLANE_VIEWS = tuple((turns, mirror) for turns in range(4) for mirror in (False, True))
"""The 8 symmetries of the y-x plane (the dihedral group of the square): ``(quarter turns, mirror x)``. EM
sections have no preferred orientation, and training augments with exactly these (rot90 + flips)."""


def window_probs(
    model: torch.nn.Module, x_BCS: torch.Tensor, autocast: Any, tta: bool = False, source: int | None = None
) -> torch.Tensor:
    """``[B, 12 + sum K, *S]`` probabilities of a batch of windows: softmax fine, then every level's sigmoids.

    ``source``: :attr:`PredictOptions.source` (passed to the model only when set, so any module predicts).

    ``tta``: the mean over :data:`PLANE_VIEWS` of the probabilities of each view, each mapped back to the
    window's orientation (the last two axes are y and x in 2D and 3D alike; a non-square window turns into a
    transposed one, which the U-Net takes as well)."""
    if not tta:
        return _forward_probs(model, x_BCS, autocast, source)
    total = None
    for turns, mirror in PLANE_VIEWS:
        view = torch.rot90(x_BCS, turns, (-2, -1))
        probs = _forward_probs(model, view.flip(-1) if mirror else view, autocast, source)
        probs = torch.rot90(probs.flip(-1) if mirror else probs, -turns, (-2, -1))
        total = probs if total is None else total + probs
    return total / len(PLANE_VIEWS)


def _forward_probs(model: torch.nn.Module, x_BCS: torch.Tensor, autocast: Any, source: int | None) -> torch.Tensor:
    with autocast:
        logits_fine, logits_coarse = model(x_BCS) if source is None else model(x_BCS, source)
    return torch.cat([logits_fine.float().softmax(1), *(lc.float().sigmoid() for lc in logits_coarse)], 1)


def block_windows(shape_S: tuple[int, ...], window: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Non-overlapping near-equal windows of at most ``window`` that cover a block of ``shape_S`` exactly once.

    Why no overlap: validation of a 3D model must score every voxel exactly once, and until 3D sliding
    windows with blending exist, tiling without overlap is the simplest exact scheme (the U-Net pads a
    window whose sides its pooling does not divide, so near-equal sides need no special case).
    """
    from hierseg.data.shards import tile_bounds

    per_axis = [tile_bounds(n, w) for n, w in zip(shape_S, window, strict=True)]
    return [tuple(slice(a, b) for a, b in box) for box in itertools.product(*per_axis)]


def predict_probs(model: torch.nn.Module, image_CS: torch.Tensor, options: PredictOptions) -> torch.Tensor:
    """Blended ``[12 + sum K, *S]`` probabilities (softmax fine, then sigmoid coarse of every level) of one image
    ``[C, H, W]`` or volume ``[C, D, H, W]``.

    ``image_CS`` is the normalised network input (:func:`hierseg.data.normalize.normalize`).
    """
    size_S = tuple(image_CS.shape[1:])
    whole = tuple(v for n in size_S for v in (0, n))
    return predict_region_probs(model, image_CS, (0,) * len(size_S), size_S, whole, options)


def decide(
    probs: torch.Tensor, lut: torch.Tensor, options: PredictOptions, label_space: LabelSpace | None = None
) -> dict[str, np.ndarray]:
    """Fine labels (by ``options.decode``), confidence, level-0 coarse probabilities and the fallback map."""
    n_fine, k = lut.shape
    fine = probs[:n_fine]
    coarse = probs[n_fine : n_fine + k].to(torch.float16).float()  # decide on the values written out (float16)
    group = coarse.argmax(0)  # first of equal values, as numpy's argmax of the output does
    group_p = coarse.gather(0, group[None])[0]
    confident_group = group_p >= options.coarse_threshold
    extra = {}
    if options.decode == "labels":
        allowed, extra["label_values"] = _label_space_decision(fine, label_space)
    else:
        members = lut.bool().t()[group].movedim(-1, 0)  # [12, *S]: class is in the top group
        allowed = torch.where(confident_group[None], members, torch.ones_like(members))
    conf, label = fine.masked_fill(~allowed, -1.0).max(0)
    conf = conf.to(torch.float16).float()  # thresholds apply to the written (float16) confidence
    fallback = torch.full_like(label, UNDECIDED)
    fallback = torch.where(confident_group, group + FALLBACK_GROUP_OFFSET, fallback)
    fallback = torch.where(conf >= options.fine_threshold, label, fallback)
    return {
        "fine_labels": label.to(torch.uint8).numpy(),
        "fine_confidence": conf.to(torch.float16).numpy(),
        "coarse_prob": coarse.to(torch.float16).numpy(),
        "fallback": fallback.to(torch.uint8).numpy(),
        **extra,
    }


def _label_space_decision(fine_CS: torch.Tensor, space: LabelSpace | None) -> tuple[torch.Tensor, np.ndarray]:
    """The most probable label-map value per pixel (a set's probability: its classes' summed softmax).

    Returns the fine classes allowed where each value won ``[12, *S]`` and the winning values' codes.
    """
    if space is None or not len(space):
        raise PredictError("--decode labels needs the model's training label map; use --decode fine")
    table_VC = space.members_table()
    value_probs = torch.einsum("vc,c...->v...", table_VC.float(), fine_CS)
    win = value_probs.argmax(0)
    codes = torch.tensor([v.code for v in space.values], dtype=torch.int32)
    return table_VC[win].movedim(-1, 0), codes[win].numpy()


def _as_chw(x: np.ndarray, channels: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] != channels:
        raise PredictError(f"image of shape {tuple(x.shape)} does not fit a model with {channels} input channel(s)")
    return t


def in_channels_of(model: torch.nn.Module) -> int:
    """The input channels of a hierseg U-Net (1 for other modules)."""
    return model.stem[0].in_channels if hasattr(model, "stem") else 1


def context_of(model: torch.nn.Module) -> int:
    """The neighbouring slices on each side a 2D model takes as extra channels (2.5D, ``make-shards --context``).

    Why from the input channels: EM slices have one channel, so a 2D model of ``2c + 1`` channels was trained on
    slices ``z - c .. z + c``; the checkpoint records no other field for it.
    """
    channels = in_channels_of(model)
    return (channels - 1) // 2 if channels > 1 and channels % 2 else 0


def slice_input(volume: Any, z: int, context: int) -> np.ndarray:
    """Raw slice ``z`` of a stack, or with ``context`` the slices ``z - context .. z + context`` stacked as channels
    ``[2c + 1, H, W]``, clamped at the stack's ends exactly as the shard builder stores 2.5D samples."""
    if not context:
        return np.asarray(volume[z])
    zs = np.clip(np.arange(z - context, z + context + 1), 0, len(volume) - 1)
    slices = [np.asarray(volume[int(i)]) for i in zs]
    if slices[0].ndim != 2:
        raise PredictError(f"a 2.5D model (+-{context} slices as channels) needs single-channel slices; slice {z} "
                           f"has shape {slices[0].shape}")  # fmt: skip
    return np.stack(slices)


def block_input(
    raw: np.ndarray, norm: dict[str, Any], channels: int, stats: Sequence[dict[str, float]] | None = None
) -> torch.Tensor:
    """Raw slices ``[d, h, w]`` (or ``[d, C, h, w]``) -> the 3D network's normalised input ``[C, d, h, w]``.

    Each slice is normalised as in 2D (:func:`hierseg.data.normalize.normalize_block`), z-score with its whole
    slice's ``stats``: given for parts of slices (blockwise), else computed from the slices read (whole ones).
    """
    from hierseg.data.normalize import image_stats, normalize_block

    x = np.asarray(raw)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != channels:
        raise PredictError(f"slices of shape {tuple(raw.shape[1:])} do not fit a model with {channels} input "
                           "channel(s)")  # fmt: skip
    if stats is None and norm.get("mode") == "zscore":
        stats = [image_stats(s) for s in raw]  # the raw slices as read: the numbers blockwise computes per slice
    return torch.from_numpy(normalize_block(x.transpose(1, 0, 2, 3), norm, stats))


def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 8,
    hierarchy: Hierarchy | None = None,
    options: PredictOptions | None = None,
    normalization: dict[str, Any] | None = None,
    label_space: LabelSpace | None = None,
) -> dict[str, np.ndarray]:
    """Predict one raw ``[H, W]`` or ``[C, H, W]`` image (any dtype); returns the outputs (see module doc).

    ``normalization`` is the model's recorded one (default: per-image z-score, the training default).
    """
    opts = options or PredictOptions(tile=tile, overlap=overlap, batch=batch)
    lut = (hierarchy or Hierarchy.default()).lut()
    in_ch = in_channels_of(model)
    x = _as_chw(normalize(np.asarray(image), normalization or {"mode": "zscore"}), in_ch)
    probs = predict_probs(model, x, opts)
    return decide(probs, lut, opts, label_space)


@dataclass
class Predictor:
    """A loaded model with everything its predictions depend on: hierarchy, normalisation, label space."""

    model: torch.nn.Module
    hierarchy: Hierarchy = field(default_factory=Hierarchy.default)
    normalization: dict[str, Any] = field(default_factory=lambda: {"mode": "zscore"})
    label_sets: LabelSets = field(default_factory=LabelSets)
    label_space: LabelSpace | None = None
    """The training label map's values (``None`` for a model that does not record its label map)."""
    patch_size: int | list[int] = 256
    """The training patch size: the default prediction window (``[z, y, x]`` for a 3D model)."""
    spec: Any = None
    """The resolved training spec (``None`` for a bare model)."""

    @property
    def dims(self) -> int:
        """2 or 3: the spatial dimensions the model takes (its U-Net plan's; 2 for a module without one)."""
        plan = getattr(self.model, "plan", None)
        return plan.dims if plan is not None else 2

    @property
    def default_decode(self) -> str:
        return "labels" if len(self.label_sets) and self.label_space is not None else "fine"

    def predict(self, image: np.ndarray, options: PredictOptions) -> dict[str, np.ndarray]:
        return predict_image(
            self.model, image, hierarchy=self.hierarchy, options=options,
            normalization=self.normalization, label_space=self.label_space,
        )  # fmt: skip

    def decoding_into(self, label_map_path: str) -> Predictor:
        """This model decoding into another label map's values (``--label-map``): a model trained on several
        sources, or on fine labels, scored in the label space of one data set (a binary mask's
        "mitochondria vs the rest")."""
        import dataclasses

        from hierseg.data.labelmap import LabelMap

        try:
            lm = LabelMap.from_yaml(label_map_path)
        except ValueError as e:
            raise PredictError(str(e)) from None
        space = LabelSpace.from_label_map(lm.to_manifest(), lm.sets)
        if not len(space):
            raise PredictError(f"--label-map {label_map_path}: every value maps to uncertain; nothing to decode into")
        return dataclasses.replace(self, label_sets=lm.sets, label_space=space)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Predictor:
        from hierseg.serve.pyfunc import model_from_state

        model, spec = model_from_state(state)
        record = state.get("label_map")
        sets = LabelSets.from_config((record or {}).get("sets") or [], where="checkpoint label_map sets")
        space = LabelSpace.from_label_map(record, sets) if record else None
        norm = state_normalization(state, spec)
        return cls(model, spec.hierarchy.build(), norm, sets, space, spec.data.patch_size, spec)


def state_normalization(state: dict[str, Any], spec: Any) -> dict[str, Any]:
    """The normalisation a checkpoint was trained with; checkpoints from before it was recorded used ``dtype_max``."""
    if state.get("normalization"):
        return dict(state["normalization"])
    if "normalization" not in (state.get("spec", {}).get("data") or {}):
        return dict(LEGACY)
    from hierseg.data.normalize import resolve

    try:
        return resolve(spec.data.normalization, None)
    except ValueError as e:
        raise PredictError(f"the checkpoint does not record its normalisation: {e}") from None


def predict_volume(
    predictor: Predictor,
    volume: Any,
    options: PredictOptions | None = None,
    progress: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Predict a ``[Z, H, W]`` stack slice by slice (any object with ``len`` and ``[z]``; for a 3D model also
    ``shape`` and ``[z0:z1]``): a 2D model one slice at a time (a 2.5D one with its context slices as channels,
    :func:`slice_input`), memory one slice; a 3D model through 3D windows in z slabs (:func:`predict_slabs`),
    memory one slab."""
    from tqdm import tqdm

    opts = options or PredictOptions()
    if predictor.dims == 3:
        outputs = predict_slabs(predictor, volume, opts)
    else:  # a 2.5D model reads each slice 2c + 1 times; the reader's chunks, not RAM, bound that
        context = context_of(predictor.model)
        outputs = (predictor.predict(slice_input(volume, z, context), opts) for z in range(len(volume)))
    yield from tqdm(outputs, total=len(volume), desc="predict", unit="slice", disable=not progress)


def predict_slabs(predictor: Predictor, volume: Any, options: PredictOptions) -> Iterator[dict[str, np.ndarray]]:
    """A 3D model's outputs of a ``[Z, H, W]`` stack, slice by slice, through blended ``[z, y, x]`` windows.

    Why slabs: a stack can be larger than RAM. The input is read as ``volume[z0:z1]`` when the windows reach
    it, each slice once, and a slab's slices are decoded (:func:`decide`, voxel-wise) and yielded as soon as no
    later window touches them (:func:`blend_slabs`), so memory stays the slices one batch of windows spans.
    """
    model, norm = predictor.model, predictor.normalization or {"mode": "zscore"}  # as predict_image
    size_S = (len(volume), *volume.shape[-2:])
    channels, lut = in_channels_of(model), predictor.hierarchy.lut()

    def read(z0: int, z1: int) -> torch.Tensor:
        return block_input(np.asarray(volume[z0:z1]), norm, channels)

    whole = tuple(v for n in size_S for v in (0, n))
    for _, _, probs_PDHW in blend_slabs(model, read, size_S, whole, options):
        out = decide(probs_PDHW, lut, options, predictor.label_space)
        for i in range(probs_PDHW.shape[1]):
            yield {name: v[:, i] if name == "coarse_prob" else v[i] for name, v in out.items()}


# ------------------------------------------------------------------------------------- model loading
def _download_model(uri: str, tracking_uri: str | None) -> Path:
    """Download a logged/registered hierseg model and return its checkpoint file."""
    import mlflow
    import yaml

    from hierseg.registry import resolve_model_uri

    resolve_model_uri(uri, tracking_uri)  # clear errors for unknown names, versions, aliases
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dst = Path(tempfile.mkdtemp(prefix="hierseg-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:
        raise PredictError(f"--model {uri}: cannot download the model ({type(e).__name__}: {e})") from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").is_file() else {}
    arts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    rel = arts.get("checkpoint", {}).get("path") if isinstance(arts.get("checkpoint"), dict) else None
    path = local / rel if rel else next(iter(sorted(local.rglob("state.pt"))), None)
    if path is None or not Path(path).is_file():
        raise PredictError(
            f"--model {uri} is not a hierseg model (no 'checkpoint' artifact); log it with hierseg train"
        )
    return Path(path)


def load_predictor(uri: str, tracking_uri: str | None = None) -> Predictor:
    """``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/ID/model`` or a local checkpoint -> Predictor."""
    from hierseg.checkpoint_io import load_state

    if uri.startswith(("models:/", "runs:/")):
        path = _download_model(uri, tracking_uri)
    else:
        path = Path(uri)
        if not path.exists():
            raise PredictError(
                f"--model {uri}: no such checkpoint file or folder; give models:/NAME@alias, models:/NAME/VERSION, "
                "runs:/RUN_ID/model, or a checkpoint folder / state.pt"
            )
    try:
        predictor = Predictor.from_state(load_state(path))
    except (FileNotFoundError, RuntimeError, KeyError) as e:
        raise PredictError(f"--model {uri}: not a loadable hierseg checkpoint ({e})") from None
    except ValueError as e:
        raise PredictError(f"--model {uri}: {e}") from None
    return predictor


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The model and resolved spec of :func:`load_predictor`."""
    p = load_predictor(uri, tracking_uri)
    return p.model, p.spec


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hierseg predict", description="Segment an image or stack with a model.")
    ap.add_argument("--model", required=True, help="models:/NAME@alias | models:/NAME/VERSION | runs:/ID/model | ckpt")
    ap.add_argument("--input", required=True, help="2D image, folder of images, TIFF stack, file.h5:dataset, zarr")
    ap.add_argument("--output", required=True, help="folder (tif/npy per output), out.zarr or out.h5[:group]")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI)")
    add_tiling_args(ap)
    ap.add_argument("--fine-threshold", type=float, default=0.5)
    ap.add_argument("--coarse-threshold", type=float, default=None,
                    help=f"a coarse group at or above this restricts the fine label (default {COARSE_CONFIDENT}; "
                         "none for a model trained with lambda_coarse 0)")  # fmt: skip
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--label-map", default=None,
                    help="decode into this label map's values (with --decode labels, the default then) instead of "
                         "the training one's: e.g. a multi-source model on one source's labels")  # fmt: skip
    ap.add_argument("--overwrite", action="store_true", help="replace hierseg's earlier outputs at --output")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--voxel-size", default=None, metavar="Z,Y,X",
                    help="voxel size in nm recorded in an OME-Zarr output (--output out.ome.zarr); default: the "
                         "input's, when it is an OME-Zarr image")  # fmt: skip
    ray = ap.add_argument_group("blockwise on Ray (hierseg.serve.blockwise): resumable, into out.zarr")
    ray.add_argument("--ray", action="store_true", help="predict blocks on Ray workers ($RAY_ADDRESS, else local)")
    ray.add_argument("--block", default=None, metavar="Z,Y,X", help="block shape (and the output's chunks)")
    ray.add_argument("--halo", default=None, metavar="[Z,]Y,X", help="context past each block: Y,X (or 0,Y,X) for a "
                     "2D model, Z,Y,X for a 3D one; at least --overlap on each axis, the default")  # fmt: skip
    ray.add_argument("--ray-workers", type=int, default=2, metavar="N", help="Ray actors, each loading the model once")
    ray.add_argument("--track", action="store_true",
                     help="record the run in MLflow (--tracking-uri), in the experiment of the model's training run "
                          "and tagged with it: settings, block counts, voxels/s (hierseg.serve.tracked)")  # fmt: skip
    return ap.parse_args(argv)


def add_tiling_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared by predict and evaluate, so both score through the same windows and decoding."""
    ap.add_argument("--tile", default=None, metavar="N|Z,Y,X",
                    help="window side (default: the model's training patch size); a 3D model takes Z,Y,X, "
                         "or N for y and x with z the training patch's; a window longer than the volume is cut "
                         "to it")  # fmt: skip
    ap.add_argument("--overlap", default=None, metavar="N|Z,Y,X",
                    help="window overlap (default: tile / 8); for a 3D model Z,Y,X, or N for y and x with z the "
                         "same fraction of the z side, at least 1 slice "
                         "(see hierseg.serve.infer.z_overlap)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    ap.add_argument("--tta", action="store_true",
                    help="test-time augmentation: average over the 8 turns and mirror images of each window's "
                         "y-x plane (8x the compute)")  # fmt: skip
    ap.add_argument("--source", default=None, metavar="NAME",
                    help="a model trained with model.norm source_batch: the data source (data.train name) whose "
                         "normalisation statistics the input takes")  # fmt: skip
    ap.add_argument("--decode", choices=["fine", "labels"], default=None,
                    help="fine: 12-way argmax; labels: in the training label map's values "
                         "(default: labels for a model trained with label sets)")  # fmt: skip


def csv(values: int | Sequence[int]) -> str:
    """``4,48,48`` (or ``48``): sides as the flags take them."""
    return str(values) if isinstance(values, int) else ",".join(str(v) for v in values)


def _flag_ints(value: Any, flag: str) -> int | tuple[int, ...] | None:
    """``--tile`` / ``--overlap`` as given (``None``, an int, ``"48"``, ``"4,48,48"`` or a sequence) -> int or
    ``(z, y, x)``; a one-line error naming the flag otherwise."""
    if value is None or isinstance(value, int):
        return value
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        ints = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        ints = ()
    if len(ints) not in (1, 3):
        raise PredictError(f"{flag} {value}: give one integer, or Z,Y,X (three integers) for a 3D model")
    return ints[0] if len(ints) == 1 else ints


def z_overlap(yx_overlap: int, tile_S: tuple[int, ...]) -> int:
    """The z overlap of ``--overlap N`` (y and x) for a ``[z, y, x]`` window: the same fraction of the z side as
    of the y side, rounded down, but at least one slice when the z side has more than one (3D windows are
    short in z, and windows that share no slice leave a seam between sections); none for ``N = 0``."""
    if yx_overlap <= 0 or tile_S[0] <= 1:
        return 0
    return max(1, yx_overlap * tile_S[0] // tile_S[1])


def window_options(predictor: Predictor, tile: Any, overlap: Any) -> tuple[Any, Any]:
    """``(tile, overlap)`` from the flags: a 2D model takes one int each (default: the training patch side and
    1/8 of it); a 3D model ``(z, y, x)`` each (defaults: the training patch, 1/8 of y and x, :func:`z_overlap`)."""
    tile, overlap = _flag_ints(tile, "--tile"), _flag_ints(overlap, "--overlap")
    if predictor.dims == 2:
        for flag, value in (("--tile", tile), ("--overlap", overlap)):
            if isinstance(value, tuple):
                raise PredictError(f"{flag} {csv(value)} is a 3D window but the model is 2D; give one integer "
                                   f"(e.g. {flag} {value[-1]})")  # fmt: skip
        tile = tile or predictor.patch_size
        return tile, tile // 8 if overlap is None else overlap
    patch_S = per_axis(predictor.patch_size, 3)
    tile_S = tile if isinstance(tile, tuple) else (patch_S[0], tile, tile) if tile else patch_S
    if isinstance(overlap, tuple):
        return tile_S, overlap
    yx = (tile_S[1] // 8, tile_S[2] // 8) if overlap is None else (overlap, overlap)
    return tile_S, (z_overlap(yx[0], tile_S), *yx)


def _check_windows(opts: PredictOptions, dims: int) -> None:
    if dims == 2:
        if opts.tile < 16 or not 0 <= opts.overlap < opts.tile or opts.batch < 1:
            raise PredictError("--tile must be >= 16, --overlap in [0, tile), --batch >= 1")
        return
    tile_S, overlap_S = opts.tile, opts.overlap
    overlaps_fit = all(0 <= o < t for o, t in zip(overlap_S, tile_S))
    if min(tile_S[1:]) < 16 or tile_S[0] < 1 or not overlaps_fit or opts.batch < 1:
        raise PredictError(f"--tile {csv(tile_S)} --overlap {csv(overlap_S)} --batch {opts.batch}: a 3D window "
                           "needs y and x sides >= 16, a z side >= 1, each overlap in [0, its side) and "
                           "--batch >= 1")  # fmt: skip


def source_index(model: torch.nn.Module, name: str | None) -> int | None:
    """``--source NAME`` -> the index a ``model.norm: source_batch`` model takes; ``None`` for other models."""
    names = tuple(getattr(model, "source_names", ()))
    if not names:
        if name:
            raise PredictError(f"--source {name}: this model normalises every input alike (its model.norm is not "
                               "source_batch); drop --source")  # fmt: skip
        return None
    if not name:
        raise PredictError("this model keeps normalisation statistics per data source (model.norm: source_batch): "
                           f"say which source the input is like, --source one of {', '.join(names)}")  # fmt: skip
    if name not in names:
        raise PredictError(f"--source {name}: not a data source of this model; one of {', '.join(names)}")
    return names.index(name)


def default_options(predictor: Predictor, **overrides: Any) -> PredictOptions:
    """Windows of the training patch size with 1/8 overlap and the model's default decoding (as validation);
    ``tile`` and ``overlap`` as the flags take them (:func:`window_options`), ``source`` as ``--source``
    (a name: :func:`source_index`)."""
    overrides["source"] = source_index(predictor.model, overrides.pop("source", None))
    tile, overlap = window_options(predictor, overrides.pop("tile", None), overrides.pop("overlap", None))
    decode = overrides.pop("decode", None) or predictor.default_decode
    if overrides.get("coarse_threshold") is None:
        overrides["coarse_threshold"] = coarse_threshold_for(predictor.spec)
    if predictor.dims == 3:
        overrides.setdefault("window", tile)  # hierseg evaluate scores 3D shards' blocks as validation does
    opts = PredictOptions(tile=tile, overlap=overlap, decode=decode, **overrides)
    _check_windows(opts, predictor.dims)
    if not 0.0 <= opts.fine_threshold <= 1.0:
        raise PredictError("--fine-threshold must be in [0, 1]")
    if not (0.0 <= opts.coarse_threshold <= 1.0 or opts.coarse_threshold == NO_COARSE):
        raise PredictError("--coarse-threshold must be in [0, 1]")
    return opts


def main(argv: list[str] | None = None) -> int:
    from hierseg.registry import RegistryError
    from hierseg.serve.omezarr import output_voxel_size, voxel_note
    from hierseg.serve.stackio import StackError, check_not_input, open_input, open_output

    args = parse_args(argv)
    if args.ray or args.block or args.halo or args.track:
        from hierseg.serve.blockwise import main_blockwise

        return main_blockwise(args)
    try:
        check_not_input(args.output, args.input)
        source = open_input(args.input)
        voxel = output_voxel_size(args.voxel_size, source.voxel_size, args.output)
        predictor = load_predictor(args.model, args.tracking_uri)
        if args.label_map:
            predictor = predictor.decoding_into(args.label_map)
        opts = default_options(
            predictor, tile=args.tile, overlap=args.overlap, batch=args.batch,
            decode=args.decode or ("labels" if args.label_map else None),
            fine_threshold=args.fine_threshold, coarse_threshold=args.coarse_threshold, device=args.device,
            amp=not args.no_amp, tta=args.tta, source=args.source,
        )  # fmt: skip
        predictor.model = predictor.model.to(_device_of(opts))
        k, group_names = predictor.hierarchy.num_groups[0], tuple(predictor.hierarchy.levels[0].group_names)
        labels = opts.decode == "labels"
        with open_output(args.output, source.shape, k, overwrite=args.overwrite, is_2d=source.is_2d,
                         label_values=labels, voxel=voxel, group_names=group_names) as sink:  # fmt: skip
            for z, out in enumerate(predict_volume(predictor, source, opts, progress=not args.quiet)):
                sink.write(z, out)
    except (PredictError, RegistryError, StackError, ConnectionError) as e:
        print(f"hierseg predict: {e}", file=sys.stderr)
        return 2
    names = [*OUTPUT_NAMES, "label_values"] if labels else OUTPUT_NAMES
    groups = ", ".join(f"{FALLBACK_GROUP_OFFSET + i}={g}" for i, g in enumerate(group_names))
    tta = ", tta 8 views" if opts.tta else ""
    print(f"hierseg predict: wrote {', '.join(names)} to {args.output} (decode {opts.decode}{tta}; fallback: "
          f"0..11 fine, {groups}, {UNDECIDED}=undecided){voxel_note(args.output, voxel)}")  # fmt: skip
    return 0
