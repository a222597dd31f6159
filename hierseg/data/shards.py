"""Shard builder: images/volumes + labels -> WebDataset tar shards of whole slices (or 3D blocks), one folder per split.

``hierseg make-shards`` (or ``python jobs/make_shards.py``) reads the inputs once, maps label values
through a :class:`~hierseg.data.labelmap.LabelMap`, splits by group (a regex over file names, or z
slab ranges of a stack with a gap) and writes per split::

    <out>/<split>/shard-000000.tar ...   samples <source>_<index>.{image.npy,label.npy,json}
    <out>/<split>/manifest.json          counts, class histogram of valid pixels, label map, sources, command

Design choices and why:
- Slices are stored whole (larger ones as a non-overlapping grid of tiles of at most ``--tile-size``)
  with raw pixel values and their whole-slice statistics: the loader draws a fresh random crop of
  ``data.patch_size`` for every training sample and normalises it with :mod:`hierseg.data.normalize`,
  and validation covers every pixel exactly once. A fixed grid of patches made a model's quality
  depend on where that grid fell.
- ``--stack --dims 3`` stores 3D blocks instead: each split's z slab (cut into blocks of at most
  ``--block-depth`` slices) by the same non-overlapping ``--tile-size`` grid in y and x, image
  ``[1, D, h, w]`` with the whole-slice statistics of each of its D slices, label ``[D, h, w]``, and the
  voxel size (``--voxel-size``) in the manifest (``dims: 3``, ``voxel_size``). The loader draws random
  3D crops from them and validation tiles them whole. 2D builds write exactly the bytes they always did.
- Labels are stored as int16 ``.npy`` (never PNG): -1 survives, and no decoder can turn them into RGB floats.
- Each shard is written to a hidden temporary name and renamed when complete; the manifest is written
  last. An interrupted run therefore never leaves a half shard that looks whole.
- Tar members carry fixed mtime/uid/gid/mode and samples are written in a fixed order, and the manifest
  holds no timestamps: the same command on the same inputs gives byte-identical output.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hierseg.cli import int_at_least
from hierseg.data.io import file_sha256, list_images, open_input, read_array, split_source
from hierseg.data.labelmap import LabelMap, histogram, set_histogram
from hierseg.data.normalize import IntensitySummary, image_stats, storage_array
from hierseg.fsutil import check_folder_path, probe_writable
from hierseg.labels import FINE_CLASSES, NUM_FINE_CLASSES

MANIFEST = "manifest.json"
FORMAT = "hierseg-shards/2"
SPLITS = ("train", "val", "test")
_SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")


# --------------------------------------------------------------------------------------------- writing
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, image: np.ndarray, label: np.ndarray, meta: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Tar members of one sample: raw image ``[C,H,W]`` (3D: ``[C,D,H,W]``; uint8/uint16/int16/float32), int16
    label ``[H,W]`` (3D: ``[D,H,W]``), meta JSON."""
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    return [
        (f"{key}.image.npy", _npy_bytes(image)),
        (f"{key}.json", meta_bytes),
        (f"{key}.label.npy", _npy_bytes(label.astype(np.int16))),
    ]


def write_tar_atomic(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write a reproducible tar (fixed metadata) under a temporary name, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


@dataclass
class ShardSink:
    """Accumulates samples of one split and cuts them into shards of about ``max_bytes``."""

    out_dir: Path
    max_bytes: int = 64 << 20
    max_samples: int | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(NUM_FINE_CLASSES, np.int64))
    num_uncertain: int = 0
    num_samples: int = 0
    num_sets: int = 0
    """Label sets of the label map: their pixels are counted per set, never as a fine class."""
    set_hist: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _members: list[tuple[str, bytes]] = field(default_factory=list)
    _count: int = 0
    _bytes: int = 0

    def __post_init__(self) -> None:
        self.set_hist = np.zeros(self.num_sets, np.int64)

    def add(self, key: str, image: np.ndarray, label: np.ndarray, meta: dict[str, Any]) -> None:
        members = encode_sample(key, image, label, meta)
        self._members += members
        self._count += 1
        self._bytes += sum(len(d) + 512 for _, d in members)
        h, u = histogram(label)
        self.hist += h
        self.num_uncertain += u
        if self.num_sets:
            self.set_hist += set_histogram(label, self.num_sets)
        self.num_samples += 1
        if self._bytes >= self.max_bytes or (self.max_samples and self._count >= self.max_samples):
            self._flush()

    def _flush(self) -> None:
        if not self._count:
            return
        name = f"shard-{len(self.shards):06d}.tar"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_tar_atomic(self.out_dir / name, self._members)
        self.shards.append({"name": name, "num_samples": self._count})
        self._members, self._count, self._bytes = [], 0, 0

    def close(self) -> None:
        self._flush()

    def manifest(self, patch_shape: list[int], channels: int, **extra: Any) -> dict[str, Any]:
        """The split's manifest (DESIGN.md's required fields first, then provenance)."""
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "patch_shape": list(patch_shape),
            "channels": channels,
            "class_names": list(FINE_CLASSES),
            "class_histogram": [int(x) for x in self.hist],
            "num_uncertain_pixels": int(self.num_uncertain),
            "set_histogram": [int(x) for x in self.set_hist],
            "shards": self.shards,
            "hierseg_version": _version(),
            **extra,
        }


def _version() -> str:
    try:
        from hierseg import __version__
    except ImportError:  # a broken editable install can leave hierseg a namespace package
        from importlib.metadata import version

        return version("hierseg")
    return __version__


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones unless ``--overwrite``, a file where the folder goes, and a
    folder we cannot write."""
    try:
        check_folder_path(out)
    except OSError as e:
        raise ValueError(f"--out {out}: {e.strerror}; give --out a folder path (a new or an existing folder)") from None
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
    for s in SPLITS:
        foreign = [p.name for p in _split_files(out / s) if not _is_ours(p)]
        if foreign:
            raise ValueError(f"{out / s} holds files hierseg did not write ({', '.join(foreign[:3])}); move them away")
    parent = out.parent  # the build goes beside --out, then is swapped in
    try:
        probe_writable(parent)
    except OSError as e:
        raise ValueError(f"cannot write to {parent} ({e.strerror or e}); choose another --out") from None


def _split_files(d: Path) -> list[Path]:
    return sorted(d.iterdir()) if d.is_dir() else []


def _is_ours(p: Path) -> bool:
    return bool(_SHARD_RE.match(p.name)) or p.name == MANIFEST or p.name.endswith(".tmp")


def swap_into_place(built: Path, out: Path) -> None:
    """Move the freshly built splits into ``out``; earlier splits of ours are removed only now.

    Why build aside: a rebuild that fails half-way (an unmapped value in the tenth file) must leave
    the previous shards usable, so nothing in ``out`` is touched until the new build is complete.
    """
    out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        old = out / s
        if old.is_dir():
            for p in _split_files(old):
                if _is_ours(p):
                    p.unlink()
            if not any(old.iterdir()):
                old.rmdir()
        if (built / s).is_dir():
            os.replace(built / s, old)
    built.rmdir()


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    """One image/label pair (2D image or 3D stack) and the group that decides its split."""

    name: str
    image: str
    label: str
    group: str


def discover_pairs(images: Path, labels: Path, group_regex: str | None) -> list[Source]:
    """Pair a folder of images with a folder of labels by file stem."""
    img_files = list_images(images)
    if not img_files:
        raise ValueError(f"no images found in {images} (expected {', '.join(('.png', '.tif', '.npy'))} files)")
    label_by_stem = {p.stem: p for p in list_images(labels)}
    pattern = re.compile(group_regex) if group_regex else None
    sources = []
    for p in img_files:
        if p.stem not in label_by_stem:
            raise ValueError(f"image {p} has no label file named {p.stem}.* in {labels}")
        group = p.stem
        if pattern is not None:
            m = pattern.search(p.name)
            if not m:
                raise ValueError(f"--group-regex {group_regex!r} does not match file name {p.name}")
            group = m.group(0)
        sources.append(Source(_safe_name(p.stem), str(p), str(label_by_stem[p.stem]), group))
    return sources


def _safe_name(stem: str) -> str:
    """Keys split at the first '.', so dots (and odd characters) in source names become '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def load_pair(src: Source, label_map: LabelMap, axis: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Read image + label, check shapes, map labels; returns ``[Z,H,W]`` image, int64 label, unmapped counts."""
    image, label = read_array(src.image), read_array(src.label)
    if image.shape != label.shape:
        raise ValueError(
            f"image {src.image} has shape {image.shape} but label {src.label} has shape {label.shape}; "
            "they must match pixel for pixel"
        )
    if image.ndim not in (2, 3):
        raise ValueError(f"image {src.image} has {image.ndim} dimensions; expected a 2D image or a 3D stack")
    mapped, unmapped = label_map.apply(label, where=f"label {src.label}")
    if image.ndim == 2:
        return image[None], mapped[None], unmapped
    return np.moveaxis(image, axis, 0), np.moveaxis(mapped, axis, 0), unmapped


# ---------------------------------------------------------------------------------------------- splits
def split_groups(groups: list[str], val_frac: float, test_frac: float, seed: int) -> dict[str, str]:
    """Assign whole groups (e.g. mice) to splits, shuffled by ``seed``: no group on two sides."""
    uniq = sorted(set(groups))
    order = [uniq[i] for i in np.random.default_rng(seed).permutation(len(uniq))]
    n_val = max(1, round(val_frac * len(uniq))) if val_frac > 0 else 0
    n_test = max(1, round(test_frac * len(uniq))) if test_frac > 0 else 0
    if n_val + n_test >= len(uniq):
        raise ValueError(
            f"only {len(uniq)} group(s) ({', '.join(uniq)}): not enough for train + val + test; "
            "lower --val-frac/--test-frac or use a finer --group-regex"
        )
    assign = {g: "val" for g in order[:n_val]}
    assign |= {g: "test" for g in order[n_val : n_val + n_test]}
    return assign | {g: "train" for g in order[n_val + n_test :]}


def parse_slabs(text: str) -> dict[str, tuple[int, int]]:
    """``train=0:12,val=14:20`` -> {'train': (0, 12), 'val': (14, 20)} (half-open slice ranges)."""
    slabs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(train|val|test)=(\d+):(\d+)", part)
        if not m or int(m.group(2)) >= int(m.group(3)):
            raise ValueError(f"--slabs entry {part!r}: expected split=start:stop with start < stop, e.g. val=14:20")
        slabs[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return slabs


def fraction_slabs(depth: int, val_frac: float, test_frac: float, gap: int) -> dict[str, tuple[int, int]]:
    """Contiguous z ranges train | gap | val | gap | test, so context slices never cross a split."""
    n_val = max(1, round(val_frac * depth)) if val_frac > 0 else 0
    n_test = max(1, round(test_frac * depth)) if test_frac > 0 else 0
    n_train = depth - n_val - n_test - gap * ((n_val > 0) + (n_test > 0))
    if n_train < 1:
        raise ValueError(f"a stack of {depth} slices is too thin for these fractions and --gap {gap}")
    slabs = {"train": (0, n_train)}
    start = n_train + gap
    if n_val:
        slabs["val"] = (start, start + n_val)
        start += n_val + gap
    if n_test:
        slabs["test"] = (start, start + n_test)
    return slabs


def check_slab_gaps(slabs: dict[str, tuple[int, int]], gap: int) -> None:
    ranges = sorted((a, b, s) for s, (a, b) in slabs.items())
    for (_, b0, s0), (a1, _, s1) in itertools.pairwise(ranges):
        if a1 - b0 < gap:
            raise ValueError(f"--slabs: {s0} ends at {b0} and {s1} starts at {a1}: need a gap of >= {gap} slices")


# ----------------------------------------------------------------------------------------------- tiles
def tile_bounds(n: int, tile: int) -> list[tuple[int, int]]:
    """Non-overlapping near-equal ``[start, stop)`` ranges of at most ``tile`` covering ``0..n`` exactly once.

    Why not a fixed grid of training patches: training draws a fresh random crop from every stored
    slice, so the shards only need slices small enough to decode quickly, and validation scores
    each pixel exactly once.
    """
    parts = max(1, math.ceil(n / tile))
    edges = [n * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def yx_boxes(h: int, w: int, tile: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the non-overlapping grid of tiles of an ``h x w`` slice, row by row."""
    return [(y0, y1, x0, x1) for y0, y1 in tile_bounds(h, tile) for x0, x1 in tile_bounds(w, tile)]


def iter_tiles(
    image: np.ndarray, label: np.ndarray, z: int, tile: int, context: int
) -> Iterable[tuple[np.ndarray, np.ndarray, int, int]]:
    """``[C,h,w]`` tiles of slice ``z`` (2.5D: slices z-context..z+context, edge-clamped) and their labels."""
    depth, h, w = image.shape
    zs = np.clip(np.arange(z - context, z + context + 1), 0, depth - 1)
    stack = image[zs]
    for y0, y1, x0, x1 in yx_boxes(h, w, tile):
        yield stack[:, y0:y1, x0:x1], label[z, y0:y1, x0:x1], y0, x0


def add_slice(sink: ShardSink, name: str, index: int, stack: np.ndarray, label: np.ndarray, z: int,
              cfg: BuildConfig) -> tuple[int, int]:  # fmt: skip
    """Write the tiles of slice ``z`` with its whole-slice statistics; returns (next index, tiles dropped)."""
    zs = np.clip(np.arange(z - cfg.context, z + cfg.context + 1), 0, stack.shape[0] - 1)
    stats = image_stats(stack[zs])  # over the whole slice (and context), as prediction computes them
    h, w = stack.shape[1:]
    dropped = 0
    for tile, lab, y, x in iter_tiles(stack, label, z, cfg.tile_size, cfg.context):
        if (lab >= 0).mean() < cfg.min_valid or not (lab >= 0).any():
            dropped += 1
            continue
        meta = {"source": name, "slice": z, "y": y, "x": x, "slice_shape": [h, w], "stats": stats}
        sink.add(f"{name}_{index:06d}", tile, lab, meta)
        index += 1
    return index, dropped


def add_block(sink: ShardSink, name: str, index: int, stack: np.ndarray, label: np.ndarray, zs: tuple[int, int],
              cfg: BuildConfig) -> tuple[int, int]:  # fmt: skip
    """Write the 3D blocks of slices ``zs = [z0, z1)`` (one per tile of the y/x grid), each with the whole-slice
    statistics of its slices; returns (next index, blocks dropped)."""
    z0, z1 = zs
    stats = [image_stats(stack[z]) for z in range(z0, z1)]  # per slice, over the whole slice, as in 2D
    h, w = stack.shape[1:]
    dropped = 0
    for y0, y1, x0, x1 in yx_boxes(h, w, cfg.tile_size):
        lab = label[z0:z1, y0:y1, x0:x1]
        if (lab >= 0).mean() < cfg.min_valid or not (lab >= 0).any():
            dropped += 1
            continue
        meta = {"source": name, "z": z0, "y": y0, "x": x0, "slice_shape": [h, w], "stats": stats}
        sink.add(f"{name}_{index:06d}", stack[None, z0:z1, y0:y1, x0:x1], lab, meta)
        index += 1
    return index, dropped


# --------------------------------------------------------------------------------------------- builder
@dataclass
class BuildConfig:
    """Everything that decides the output bytes (recorded in the manifests)."""

    tile_size: int = 1024
    axis: int = 0
    context: int = 0
    min_valid: float = 0.01
    shard_mb: float = 64.0
    samples_per_shard: int | None = None
    dims: int = 2
    """2: slices or tiles; 3: blocks of a stack's z slabs (``--dims 3``)."""
    voxel_size: list[float] | None = None
    """3D: ``[z, y, x]`` in nm along the stored axes (recorded in the manifest; it plans the 3D network)."""
    block_depth: int | None = None
    """3D: slabs deeper than this are cut into near-equal blocks of at most this many slices (None: whole slab)."""

    def record(self) -> dict[str, Any]:
        """The manifest's ``build`` record; a 2D build leaves out the 3D fields, so its bytes never change."""
        skip = () if self.dims == 3 else ("dims", "voxel_size", "block_depth")
        return {k: v for k, v in self.__dict__.items() if k not in skip}


@dataclass
class _Split:
    """One split being written: its shard sink, intensity record and bookkeeping."""

    sink: ShardSink
    intensity: IntensitySummary = field(default_factory=IntensitySummary)
    dropped: int = 0
    used: list[dict[str, Any]] = field(default_factory=list)
    max_shape: list[int] = field(default_factory=lambda: [0, 0])
    min_shape: list[int] | None = None
    """3D: the smallest stored block, per axis (the loader pads crops of smaller blocks)."""

    def saw_shape(self, shape: list[int]) -> None:
        self.max_shape = [max(a, b) for a, b in zip(self.max_shape, shape)]
        self.min_shape = shape if self.min_shape is None else [min(a, b) for a, b in zip(self.min_shape, shape)]


def build_shards(
    sources: list[Source],
    assign: Any,
    out: Path,
    label_map: LabelMap,
    cfg: BuildConfig,
    provenance: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Store every (source, slice) whole (or as tiles of at most ``tile_size``) in its split's shards; with
    ``cfg.dims == 3``, every block of each split's z slab (:func:`add_block`).

    ``assign(source, z) -> split name | None`` decides the split of each slice (None: in a gap).
    Returns the manifests by split.
    """
    from tqdm import tqdm

    splits: dict[str, _Split] = {}
    unmapped_total: dict[int, int] = {}
    for src in tqdm(sources, desc="make-shards", unit="volume", file=sys.stderr):
        image, label, unmapped = load_pair(src, label_map, cfg.axis)
        for v, n in unmapped.items():
            unmapped_total[v] = unmapped_total.get(v, 0) + n
        image = storage_array(image)
        index = 0
        for split, (z0, z1) in _z_runs(src, image.shape[0], assign, cfg):
            if split not in splits:
                sink = ShardSink(
                    out / split, int(cfg.shard_mb * (1 << 20)), cfg.samples_per_shard, num_sets=len(label_map.sets)
                )
                splits[split] = _Split(sink, max_shape=[0] * cfg.dims)
            rec = splits[split]
            if not rec.used or rec.used[-1]["name"] != src.name:
                rec.used.append(_source_record(src, image.shape))
            for z in range(z0, z1):
                rec.intensity.add(image[z])
            if cfg.dims == 3:
                index, dropped = add_block(rec.sink, src.name, index, image, label, (z0, z1), cfg)
            else:
                index, dropped = add_slice(rec.sink, src.name, index, image, label, z0, cfg)
            rec.dropped += dropped
            for y0, y1, x0, x1 in yx_boxes(*image.shape[1:], cfg.tile_size):
                rec.saw_shape([z1 - z0, y1 - y0, x1 - x0][-cfg.dims :])
    if unmapped_total:
        print(f"warning: unmapped label values turned uncertain (pixels): {unmapped_total}", file=sys.stderr)
    return _finish(splits, label_map, cfg, provenance, unmapped_total)


def _z_runs(src: Source, depth: int, assign: Any, cfg: BuildConfig) -> Iterable[tuple[str, tuple[int, int]]]:
    """``(split, (z0, z1))`` in z order: each slice on its own (2D), or (3D) the blocks of every run of
    consecutive slices of one split, runs deeper than ``cfg.block_depth`` cut into near-equal blocks."""
    z = 0
    for split, run in itertools.groupby(range(depth), key=lambda k: assign(src, k)):
        n = len(list(run))
        if split is not None:
            parts = tile_bounds(n, cfg.block_depth or n) if cfg.dims == 3 else [(i, i + 1) for i in range(n)]
            yield from ((split, (z + a, z + b)) for a, b in parts)
        z += n


def _source_record(src: Source, shape: tuple[int, ...]) -> dict[str, Any]:
    return {
        "name": src.name,
        "group": src.group,
        "image": src.image,
        "image_sha256": file_sha256(split_source(src.image)[0]),
        "label": src.label,
        "label_sha256": file_sha256(split_source(src.label)[0]),
        "shape": list(shape),
    }


def _finish(splits: dict[str, _Split], label_map, cfg, provenance, unmapped) -> dict[str, dict[str, Any]]:
    if not splits or not any(s.sink.num_samples for s in splits.values()):
        raise ValueError("no tiles were written: the inputs are empty or every tile was dropped by --min-valid")
    manifests = {}
    for split, rec in splits.items():
        rec.sink.close()
        if not rec.sink.num_samples:
            raise ValueError(f"split {split!r} got no tiles (all dropped by --min-valid {cfg.min_valid}?)")
        manifests[split] = rec.sink.manifest(
            rec.max_shape,
            2 * cfg.context + 1,
            **_dims_record(rec, cfg),
            split=split,
            num_dropped_tiles=rec.dropped,
            label_map=label_map.to_manifest(),
            label_sets=label_map.sets.to_config(),
            unmapped_pixels={str(k): v for k, v in sorted(unmapped.items())},
            intensity=rec.intensity.record(),
            build=cfg.record(),
            sources=rec.used,
            **provenance,
        )
        write_json_atomic(rec.sink.out_dir / MANIFEST, manifests[split])
    return manifests


def _dims_record(rec: _Split, cfg: BuildConfig) -> dict[str, Any]:
    """3D manifests say so (``dims``, ``voxel_size`` in nm, smallest block); 2D manifests stay as they were."""
    if cfg.dims != 3:
        return {}
    return {"dims": 3, "voxel_size": list(cfg.voxel_size or []), "min_block_shape": rec.min_shape}


# ------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hierseg make-shards",
        description="Convert EM images/volumes + label images/volumes into WebDataset shards per split.",
    )
    p.add_argument("--images", required=True, help="folder of 2D images, or (with --stack) one volume")
    p.add_argument("--labels", required=True, help="folder of label images (same stems), or one label volume")
    p.add_argument("--out", required=True, type=Path, help="output folder; gets train/ val/ [test/]")
    p.add_argument("--stack", action="store_true", help="inputs are one 3D stack each (TIFF, slice folder, h5, zarr)")
    p.add_argument("--label-map", help="YAML label map (default: identity 0..11, 255 -> uncertain)")
    p.add_argument("--unmapped", choices=["error", "uncertain"], help="policy for label values the map lacks")
    p.add_argument("--tile-size", type=int_at_least(1), default=1024,
                   help="slices over this size are stored as a grid of non-overlapping tiles")  # fmt: skip
    p.add_argument("--patch-size", type=int, help=argparse.SUPPRESS)  # removed: named in a clear error
    p.add_argument("--stride", type=int, help=argparse.SUPPRESS)
    p.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="stack axis to slice along")
    p.add_argument("--context", type=int, default=0, help="2.5D: +-N neighbouring slices as extra channels")
    p.add_argument("--min-valid", type=float, default=0.01, help="drop tiles with a lower valid-pixel fraction")
    p.add_argument("--group-regex", help="regex over file names giving the split group, e.g. 'sub-[^_]+'")
    p.add_argument("--slabs", help="stack split as z ranges, e.g. train=0:12,val=14:20")
    p.add_argument("--val-frac", type=float, default=0.2)
    p.add_argument("--test-frac", type=float, default=0.0)
    p.add_argument("--gap", type=int, help="slices left out between stack slabs (default: max(1, context))")
    p.add_argument("--seed", type=int, default=0, help="seed of the group split")
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MiB")
    p.add_argument("--samples-per-shard", type=int_at_least(1), help="cap on samples per shard")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    three = p.add_argument_group("3D (with --stack): blocks of each split's z slab for model.dims 3")
    three.add_argument("--dims", type=int, default=2, choices=[2, 3],
                       help="2: slices or tiles (default); 3: 3D blocks (z slab x tile x tile)")  # fmt: skip
    three.add_argument("--voxel-size", type=_voxel_size, metavar="Z,Y,X",
                       help="voxel size in nm along the stored axes (needed with --dims 3)")  # fmt: skip
    three.add_argument("--block-depth", type=int_at_least(1), metavar="N",
                       help="cut deeper slabs into blocks of at most N slices (default: whole slab)")  # fmt: skip
    return p


def _voxel_size(text: str) -> list[float]:
    try:
        sizes = [float(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive sizes Z,Y,X in nm, e.g. 50,4.6,4.6")
    return sizes


def _check_args(args: argparse.Namespace) -> None:
    if args.patch_size is not None or args.stride is not None:
        raise ValueError(
            "--patch-size/--stride are gone: shards now store whole slices and training draws a random crop "
            "of data.patch_size from them; drop these flags (use --tile-size only for slices over 1024 px)"
        )
    if args.tile_size < 16:
        raise ValueError(f"--tile-size {args.tile_size} is too small; use at least the training patch size")
    if not 0.0 <= args.min_valid <= 1.0:
        raise ValueError(f"--min-valid {args.min_valid} must be a fraction in [0, 1]")
    if args.context < 0 or (args.gap is not None and args.gap < 0):
        raise ValueError("--context and --gap must be >= 0")
    if args.dims == 2 and (args.voxel_size is not None or args.block_depth is not None):
        raise ValueError("--voxel-size and --block-depth describe 3D blocks; add --dims 3 (with --stack) or drop them")
    if args.dims == 3:
        _check_3d_args(args)


def _check_3d_args(args: argparse.Namespace) -> None:
    if not args.stack:
        raise ValueError("--dims 3 stores blocks of a stack: add --stack (and give one volume to --images/--labels)")
    if args.context:
        raise ValueError(f"--context {args.context} is 2.5D; a 3D block holds its z neighbours already: drop --context")
    if args.voxel_size is None:
        raise ValueError(
            "--dims 3 needs --voxel-size Z,Y,X (nm, along the stored axes; e.g. 50,4.6,4.6 for serial-section TEM): "
            "it plans the 3D network's pooling, and hierseg does not read it from the input's metadata"
        )


def _plan(args: argparse.Namespace) -> tuple[list[Source], Any, dict[str, Any]]:
    """Sources, the split function, and the split record for the manifest."""
    if not args.stack:
        sources = discover_pairs(Path(args.images), Path(args.labels), args.group_regex)
        groups = split_groups([s.group for s in sources], args.val_frac, args.test_frac, args.seed)
        record = {"method": "group", "group_regex": args.group_regex, "seed": args.seed}
        record |= {"val_frac": args.val_frac, "test_frac": args.test_frac}
        record["groups"] = {s: sorted(g for g, v in groups.items() if v == s) for s in SPLITS}
        return sources, lambda src, z: groups[src.group], record
    for spec in (args.images, args.labels):
        if not split_source(spec)[0].exists():
            raise ValueError(f"input {spec} does not exist; check the path")
    src = Source(_safe_name(split_source(args.images)[0].stem), args.images, args.labels, "stack")
    gap = max(1, args.context) if args.gap is None else args.gap
    if gap < args.context:
        raise ValueError(f"--gap {gap} is smaller than --context {args.context}: context slices would leak")
    depth = _stack_depth(src, args.axis)
    slabs = parse_slabs(args.slabs) if args.slabs else fraction_slabs(depth, args.val_frac, args.test_frac, gap)
    check_slab_gaps(slabs, gap)
    for s, (a, b) in slabs.items():
        if b > depth:
            raise ValueError(f"--slabs {s}={a}:{b} exceeds the stack depth {depth} along axis {args.axis}")
    record = {"method": "slabs", "axis": args.axis, "gap": gap, "slabs": {k: list(v) for k, v in slabs.items()}}

    def assign(_: Source, z: int) -> str | None:
        return next((s for s, (a, b) in slabs.items() if a <= z < b), None)

    return [src], assign, record


def _stack_depth(src: Source, axis: int) -> int:
    """The depth along ``axis``, from the lazy reader's shape: nothing of the stack is read."""
    stack = open_input(src.image)
    stack.close()
    if stack.is_2d:
        raise ValueError(f"--stack: {src.image} has shape {stack.shape[1:]}, not a 3D stack")
    return stack.shape[axis]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        _check_args(args)
        label_map = LabelMap.from_yaml(args.label_map) if args.label_map else LabelMap.default()
        if args.unmapped:
            label_map.unmapped = args.unmapped
        sources, assign, split_record = _plan(args)
        check_out_dir(args.out, args.overwrite)
        cfg = BuildConfig(
            args.tile_size, args.axis, args.context, args.min_valid, args.shard_mb, args.samples_per_shard,
            args.dims, args.voxel_size, args.block_depth,
        )  # fmt: skip
        # --overwrite does not change the output, so a forced rerun stays byte-identical
        command = "hierseg make-shards " + shlex.join(a for a in argv if a != "--overwrite")
        provenance = {"split_config": split_record, "command": command}
        built = args.out.parent / f".{args.out.name}.build-{os.getpid()}"
        try:
            manifests = build_shards(sources, assign, built, label_map, cfg, provenance)
            swap_into_place(built, args.out)
        finally:
            shutil.rmtree(built, ignore_errors=True)  # our own temporary folder only
    except ValueError as e:
        print(f"hierseg make-shards: error: {e}", file=sys.stderr)
        return 2
    what = "3D blocks" if args.dims == 3 else "slices/tiles"
    for split, m in manifests.items():
        print(
            f"{split}: {m['num_samples']} {what} in {len(m['shards'])} shard(s), "
            f"{m['num_dropped_tiles']} dropped (valid fraction < {args.min_valid}) -> {args.out / split}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
