"""Streaming loaders: WebDataset tar shards -> ``(image [B,C,*S] float32, label [B,*S] int16)`` batches.

Labels travel as int16, the shards' own type (fine classes, label-set ids and -1 all fit): a quarter
of int64's bytes to copy into shared memory, between processes and onto the GPU. The consumers (the
training step, scoring) widen them to int64 on the device, where the loss and the metrics index with them.

``S`` is ``(H, W)`` for 2D shards (whole slices or tiles) and ``(D, H, W)`` for 3D shards (blocks of a
stack, ``make-shards --stack --dims 3``): one stream, one crop function and one seed scheme serve both,
so every guarantee below holds per voxel in 3D exactly as per pixel in 2D.

Training (:func:`build_train_loader`) never ends: each rank's stream is cut into ``L = max(1, num_workers)``
*logical workers*; logical worker ``l`` of rank ``r`` is consumer ``c = r * L + l`` of ``C = world * L``.
In epoch ``e`` the shard list is permuted by ``(seed, e)`` and consumer ``c`` reads shards
``perm[(c + k*C) % S]`` for ``k < ceil(S / C)``, so every consumer gets the same number of shards (a
few repeat when ``S`` does not divide) and no rank can run dry: every rank takes as many steps as
the loop asks (DESIGN.md invariant 3). A consumer's samples (whole stored slices) pass a shuffle
buffer seeded by ``(seed, e, c)``; sample ``i`` of that shuffled order gets a generator seeded by
``(seed, e, c, i)`` that draws its crop position (:func:`random_crop`) and its augmentation, so a
repeated slice gives a new crop every time and resume replays the same crops. The position of a
consumer is ``(epoch, i)``; the DataLoader hands out batches of the workers round-robin, so the
global batch ``b`` comes from logical worker ``b % L``. That makes the whole stream a pure function
of (seed, rank, world, position): :meth:`TrainStream.state_dict` records the positions, and a
restored stream replays only shard reads (no decoding) to get there.

Validation (:func:`build_val_loader`) assigns every stored slice an explicit global index (manifest
shard order, then tar order); rank ``r`` takes a contiguous index range and splits it again over its
loader workers, so each slice, whole and uncropped, is seen exactly once over all ranks.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
import os
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from hierseg.data.normalize import image_stats, normalize, normalize_block
from hierseg.spec import DataSpec

MANIFEST = "manifest.json"
SHARD_FORMAT = "hierseg-shards/2"
Batch = tuple[torch.Tensor, torch.Tensor]
LABEL_DTYPE = np.int16
"""Labels in batches (the stored type); every label value is below 2^15 (12 classes plus the label sets)."""
CropWindow = tuple[tuple[slice, ...], list[int]]
"""A crop's box inside its sample and the padding after it, per axis (:func:`crop_window`)."""


class StoredSample(NamedTuple):
    """A stored sample as read (raw dtypes, read-only views of the tar bytes), before any conversion."""

    image: np.ndarray  # [C, *S] raw values
    label: np.ndarray  # [*S] fine classes and set ids of its source, -1 uncertain
    stats: Any  # the whole slice's image_stats (a 3D block: a list, one per slice), or None


# ------------------------------------------------------------------------------------------- shard URLs
def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or len(urlparse(url).scheme) > 1


def _expand_braces(url: str) -> list[str]:
    import braceexpand

    return [u for part in url.split("::") for u in braceexpand.braceexpand(part)]


def resolve_shards(url: str) -> list[str]:
    """Shard URLs of a folder (its manifest's shards, else ``*.tar``), glob, brace pattern, or remote URLs.

    Fails here, before any worker starts, when nothing matches.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("shard location is empty; set data.train / data.val to a shard folder or pattern")
    if _is_remote(url):
        shards = _expand_braces(url)
    elif os.path.isdir(url) or url.endswith(MANIFEST):
        folder = Path(url).parent if url.endswith(MANIFEST) else Path(url)
        manifest = read_manifest(str(folder))
        check_format(manifest, folder)
        names = [s["name"] for s in manifest["shards"]] if manifest else sorted(p.name for p in folder.glob("*.tar"))
        shards = [str(folder / n) for n in names]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise ValueError(f"{folder}/{MANIFEST} lists shard {missing[0]} which does not exist; rebuild the shards")
    else:
        shards = []
        for part in _expand_braces(url):
            if glob.has_magic(part):
                shards += sorted(glob.glob(part))
            elif os.path.isfile(part):
                shards.append(part)
            else:
                raise ValueError(f"shard {part} (from {url!r}) does not exist; check data.train / data.val")
    if not shards:
        raise ValueError(f"no shards found for {url!r}; build them with `hierseg make-shards` or fix the pattern")
    return shards


def check_format(manifest: dict | None, folder: Path | str) -> None:
    """Shards of an older layout (a fixed grid of patches, values pre-scaled) fail here with the rebuild command."""
    if manifest is None or manifest.get("format", SHARD_FORMAT) == SHARD_FORMAT:
        return
    command = str(manifest.get("command", ""))
    if command.startswith("hierseg synthetic"):
        fix = f"delete {folder} (synthetic demo shards) and rerun: they are generated again"
    else:
        keep = _without_flags(shlex.split(command), ("--patch-size", "--stride"))
        fix = f"rebuild them with: {shlex.join(keep)} --overwrite" if keep else "rebuild them with hierseg make-shards"
    raise ValueError(
        f"{folder}/{MANIFEST} is {manifest.get('format', 'an unversioned format')}, a fixed grid of patches from an "
        f"older hierseg; this version stores whole slices ({SHARD_FORMAT}) and crops data.patch_size while "
        f"training: {fix}"
    )


def _without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """A make-shards command without these value flags (``--flag V`` and ``--flag=V`` alike)."""

    def is_flag(i: int) -> bool:
        return argv[i] in flags or argv[i].startswith(tuple(f"{o}=" for o in flags)) or (i > 0 and argv[i - 1] in flags)

    return [a for i, a in enumerate(argv) if not is_flag(i)]


_3D_FLAGS = ("--dims", "--voxel-size", "--block-depth")


def check_shard_dims(manifest: dict | None, folder: str, dims: int, patch_size: int | list[int] | None = None) -> None:
    """``model.dims`` must be the shards' (2D slices/tiles or 3D blocks), and a 3D ``patch_size`` must fit the
    largest stored block; the error gives the make-shards command that fixes it. No manifest: nothing to check.
    """
    if manifest is None:
        return
    stored = int(manifest.get("dims", 2))  # 2D manifests predate the field and never write it
    if stored != dims:
        kind = "3D blocks" if stored == 3 else "2D slices/tiles"
        raise ValueError(f"{folder} holds {kind} but model.dims is {dims}; {_dims_fix(manifest, dims)}")
    if dims == 3 and isinstance(patch_size, list):
        block = [int(v) for v in manifest.get("patch_shape", [])]
        if len(block) == 3 and any(p > b for p, b in zip(patch_size, block)):
            raise ValueError(
                f"data.patch_size {patch_size} is larger than the largest 3D block of {folder}, {block} [z, y, x] "
                "(the split's z slab of the stack, or --block-depth, then --tile-size): use a patch of at most "
                f"{block} with sides the network's pooling divides, or rebuild the shards with a deeper slab "
                "(--slabs), a larger --block-depth or --tile-size"
            )


def _dims_fix(manifest: dict, dims: int) -> str:
    """How to get shards (or a spec) of the other dimension, from the command that built these."""
    argv = shlex.split(str(manifest.get("command", "")))
    if argv[:2] != ["hierseg", "make-shards"]:
        argv = []  # synthetic demo shards (2D only) or hand-made ones: no command to edit
    if dims == 2:
        keep = _without_flags(argv, _3D_FLAGS)
        rebuild = f"rebuild 2D shards with: {shlex.join(keep)} --overwrite" if keep else "rebuild them without --dims 3"
        return f"set model.dims: 3 with a 3D data.patch_size [z, y, x] to train on them, or {rebuild}"
    if "--stack" not in argv:
        return (
            "3D training needs 3D blocks of a stack: build them with hierseg make-shards --images STACK --labels "
            "LABELS --stack --dims 3 --voxel-size Z,Y,X --out DIR (or train with model.dims: 2)"
        )
    keep = _without_flags(argv, (*_3D_FLAGS, "--context"))
    return f"rebuild them as 3D blocks with: {shlex.join(keep)} --dims 3 --voxel-size Z,Y,X --overwrite"


def read_manifest(url: str) -> dict | None:
    """The ``manifest.json`` of a shard folder (or next to a local glob's shards); None when there is none."""
    if not isinstance(url, str) or _is_remote(url):
        return None
    if url.endswith(MANIFEST):
        path = Path(url)
    elif os.path.isdir(url):
        path = Path(url) / MANIFEST
    else:
        first = next(iter(sorted(glob.glob(_expand_braces(url)[0]))), None)
        if first is None:
            return None
        path = Path(first).parent / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the shards") from None


# --------------------------------------------------------------------------------------------- reading
def _open(url: str):
    from webdataset.gopen import gopen, gopen_schemes

    if url.startswith("pipe:") or not _is_remote(url) or urlparse(url).scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def iter_raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Undecoded samples (``{"__key__", "__url__", "image.npy", "label.npy", "json"}``) of one tar shard."""
    from webdataset import tariterators

    stream = _open(url)
    try:
        files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
        yield from tariterators.group_by_keys(files)
    finally:
        stream.close()


def _npy(data: bytes) -> np.ndarray:
    """A stored ``.npy`` member as a read-only view of the tar's bytes (no copy; every use copies what it keeps)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("a .npy member does not start with the .npy magic; the shard is damaged")
    # header length: 2 bytes in format 1.0, 4 bytes in 2.0 and later (the .npy format's own layout)
    start = 10 if data[6] == 1 else 12
    size = int.from_bytes(data[8:start], "little")
    shape, fortran, dtype = _npy_header(data[: start + size])
    have, need = len(data) - start - size, math.prod(shape) * dtype.itemsize
    if have < need:
        raise ValueError(f"a .npy member holds {have} of its {need} data bytes; the shard is damaged")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start + size)
    return flat.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=256)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a ``.npy`` header, parsed by numpy once per distinct header (the
    samples of a shard share a handful; parsing evaluates a Python literal, a sizeable part of a sample's cost)."""
    buf = io.BytesIO(prefix)
    version = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("an .npy member holds Python objects; shards hold numbers only")
    return shape, fortran, dtype


def read_sample(raw: dict[str, Any], norm: dict[str, Any]) -> StoredSample:
    """The raw ``image [C,*S]`` and ``label [*S]`` of a stored slice, tile or 3D block, with the statistics
    the normalisation needs (the whole slice's, stored beside it; a 3D block: one per slice).

    Nothing is converted yet: the training loader crops first (:func:`finish_crop`, which checks the
    label values it converts).
    """
    for part in ("image.npy", "label.npy"):
        if part not in raw:
            raise ValueError(f"missing member {part} (has {sorted(k for k in raw if not k.startswith('__'))})")
    image, label = _npy(raw["image.npy"]), _npy(raw["label.npy"])
    if image.ndim == 2:
        image = image[None]
    if label.ndim not in (2, 3) or image.ndim != label.ndim + 1 or image.shape[1:] != label.shape:
        raise ValueError(f"image shape {image.shape} does not fit label shape {label.shape}")
    if label.dtype.kind not in "iu":
        raise ValueError(f"label must be integers, got dtype {label.dtype}")
    stats = (json.loads(raw["json"]) if "json" in raw else {}).get("stats")
    if stats is None and norm.get("mode") == "zscore":
        # shards without stored statistics: the whole slice's, as prediction computes them, never the crop's
        stats = image_stats(image) if label.ndim == 2 else [image_stats(image[:, z]) for z in range(label.shape[0])]
    return StoredSample(image, label, stats)


def finish_crop(
    sample: StoredSample, window: CropWindow, norm: dict[str, Any], num_labels: int, remap: np.ndarray | None = None
) -> Batch:
    """``float32 [C,*s]`` normalised image and ``int16 [*s]`` label of ``window`` of a stored sample.

    Only the window is converted (a 256^2 crop of a 1024^2 slice costs 1/16 of the whole), with the
    whole slice's statistics, so a crop equals the same pixels of the whole decoded slice. Padding
    comes after normalisation: image 0 (the z-scored mean), label uncertain. Labels must lie in
    ``-1 .. num_labels - 1`` (fine classes, then label-set ids), which is checked here so that a bad
    value names its sample instead of failing deep inside the loss (a device-side assert on GPU); a
    training crop checks what it uses, a whole decoded slice all of it. ``remap`` (a source of a
    multi-source run, :mod:`hierseg.data.sources`) turns the source's set ids into the merged table's:
    ``label = remap[label + 1]``.
    """
    box, pad_S = window
    image = sample.image[(slice(None), *box)]
    if sample.label.ndim == 2:
        x = normalize(image, norm, sample.stats)
    else:
        x = normalize_block(image, norm, None if sample.stats is None else sample.stats[box[0]])
    label = sample.label[box]
    if num_labels > np.iinfo(LABEL_DTYPE).max:
        raise ValueError(f"{num_labels} label values do not fit the loader's int16 labels (at most 32767)")
    if label.size and (label.min() < -1 or label.max() >= num_labels):
        bad = int(label.max()) if label.max() >= num_labels else int(label.min())
        raise ValueError(
            f"label value {bad} is outside -1..{num_labels - 1} (fine classes 0..11, then the manifest's label sets)"
        )
    label = (label if remap is None else remap[label + 1]).astype(LABEL_DTYPE)  # a copy: the view is read-only
    return _pad_after(torch.from_numpy(x), torch.from_numpy(label), pad_S)


def _pad_after(image_CS: torch.Tensor, label_S: torch.Tensor, pad_S: list[int]) -> Batch:
    """Pad each axis after its end by ``pad_S``: image with 0 (the z-scored mean), label with uncertain."""
    if not any(pad_S):
        return image_CS, label_S
    pad = [v for p in reversed(pad_S) for v in (0, p)]  # F.pad: (before, after) from the last axis
    return F.pad(image_CS, pad), F.pad(label_S, pad, value=-1)


def decode_sample(
    raw: dict[str, Any], norm: dict[str, Any], num_labels: int, remap: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``float32 [C,h,w]`` image and ``int16 [h,w]`` label of a whole stored slice or tile (a 3D
    block: ``[C,d,h,w]`` and ``[d,h,w]``): :func:`read_sample`, then :func:`finish_crop` of all of it.

    ``norm`` is the run's resolved normalisation (:func:`hierseg.data.normalize.normalize`), applied
    with the whole slice's statistics stored beside the tile.
    """
    sample = read_sample(raw, norm)
    whole = (tuple(slice(0, n) for n in sample.label.shape), [0] * sample.label.ndim)
    return finish_crop(sample, whole, norm, num_labels, remap)


class BadSamplePolicy:
    """``stop``: raise naming shard and key; ``skip``: warn with a running count."""

    def __init__(self, mode: str):
        self.mode, self.skipped = mode, 0

    def __call__(self, url: str, key: str | None, err: Exception) -> None:
        what = f"sample {key!r} in shard {url}" if key else f"shard {url}"
        if self.mode == "stop":
            raise ValueError(
                f"bad {what}: {err}; rebuild the shard, or set data.on_bad_sample=skip to skip bad samples"
            ) from None
        self.skipped += 1
        warnings.warn(f"skipping bad {what}: {err} ({self.skipped} skipped so far)", stacklevel=3)


def _guarded_samples(url: str, policy: BadSamplePolicy) -> Iterator[dict[str, Any]]:
    """Raw samples of a shard; a truncated/unreadable tar goes through the bad-sample policy."""
    try:
        yield from iter_raw_samples(url)
    except Exception as e:
        policy(url, None, e)


def _decode_or_none(raw: dict[str, Any], cfg: dict[str, Any], policy: BadSamplePolicy) -> Batch | None:
    try:
        return decode_sample(raw, cfg["normalization"], cfg["num_labels"], cfg.get("remap"))
    except Exception as e:
        policy(raw.get("__url__", "?"), raw.get("__key__"), e)
        return None


def _read_or_none(raw: dict[str, Any], cfg: dict[str, Any], policy: BadSamplePolicy) -> StoredSample | None:
    try:
        return read_sample(raw, cfg["normalization"])
    except Exception as e:
        policy(raw.get("__url__", "?"), raw.get("__key__"), e)
        return None


# -------------------------------------------------------------------------------------------- training
def _seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (stable across processes and Python versions)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _collate(samples: list[Batch]) -> Batch:
    """Stack samples into one batch; in a loader worker straight into shared memory (torch's
    ``default_collate`` does that), which saves copying every batch once more on its way to the
    training process (a 16 x 256^2 batch is 12.6 MB)."""
    images, labels = default_collate(samples)
    return images, labels


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Streaming shuffle through a buffer of ``size`` items (0 or 1: no shuffle)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def class_weights(manifest: dict | None) -> torch.Tensor:
    """Per-class weights ``sqrt(f_max / f_k)`` from the manifest's valid-pixel histogram (0 for absent classes).

    Only ``class_histogram`` (single-class pixels) is used; ``set_histogram`` never changes the weights.
    """
    if not manifest or "class_histogram" not in manifest:
        raise ValueError(
            "data.class_balanced needs the shards' manifest.json (class_histogram); point data.train at its folder"
        )
    hist = torch.tensor(manifest["class_histogram"], dtype=torch.float64)
    w = torch.where(hist > 0, (hist.max() / hist.clamp_min(1)).sqrt(), torch.zeros_like(hist))
    return w.to(torch.float32)


_CROP_TRIES = 4


def crop_window(
    label_S: np.ndarray, size: int | list[int], gen: torch.Generator, class_weights: torch.Tensor | None = None
) -> CropWindow:
    """Where a crop of ``size`` (an int: ``size x size`` of a 2D slice; ``[z, y, x]``: of a 3D block) lies in a
    sample with labels ``label_S``, drawn from ``gen``, one draw per axis in axis order (so resume replays it).

    Uniform positions, or with ``class_weights`` centred on a voxel of a class drawn by weight among
    the classes present (single-class valid voxels only; uniform when none is present). Returns the box
    inside the sample and, per axis, how much to pad after it where the sample is smaller than ``size``.
    """
    size_S = (size, size) if isinstance(size, int) else tuple(size)
    if len(size_S) != label_S.ndim:
        raise ValueError(
            f"a {len(size_S)}D patch {list(size_S)} (data.patch_size) cannot be cut from a {label_S.ndim}D sample of "
            f"shape {list(label_S.shape)}: model.dims must match the shards (3D needs make-shards --stack --dims 3)"
        )
    padded_S = [max(n, s) for n, s in zip(label_S.shape, size_S)]  # a short axis is padded after its end
    centre = _weighted_voxel(label_S, class_weights, gen) if class_weights is not None else None
    if centre is None:
        start = [int(torch.randint(0, n - s + 1, (), generator=gen)) for n, s in zip(padded_S, size_S)]
    else:
        start = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, size_S, padded_S)]
    stop = [min(a + s, n) for a, s, n in zip(start, size_S, label_S.shape)]
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    return box, [a + s - b for a, s, b in zip(start, size_S, stop)]


def random_crop(
    image_CS: torch.Tensor,
    label_S: torch.Tensor,
    size: int | list[int],
    gen: torch.Generator,
    class_weights: torch.Tensor | None = None,
) -> Batch:
    """A crop of ``size`` of a decoded sample at the position :func:`crop_window` draws from ``gen``; a sample
    smaller than ``size`` is padded: image with 0 (the z-scored mean), label with uncertain."""
    box, pad_S = crop_window(label_S.numpy(), size, gen, class_weights)
    return _pad_after(image_CS[(slice(None), *box)], label_S[box], pad_S)


def _weighted_voxel(label_S: np.ndarray, weights: torch.Tensor, gen: torch.Generator) -> tuple[int, ...] | None:
    """A random voxel of a class drawn with probability ~ weight among the classes present; None if none is."""
    fine = label_S[(label_S >= 0) & (label_S < weights.numel())].astype(np.int64)
    present = torch.from_numpy(np.bincount(fine, minlength=weights.numel()) > 0)
    p = weights * present
    if float(p.sum()) <= 0:
        return None
    c = int(torch.multinomial(p, 1, generator=gen))
    idx = np.flatnonzero(label_S == c)
    flat = int(idx[int(torch.randint(0, idx.size, (), generator=gen))])
    return tuple(int(i) for i in np.unravel_index(flat, label_S.shape))


class _TrainSource(IterableDataset):
    """One rank's infinite batch stream; each DataLoader worker plays one logical worker."""

    def __init__(self, shards: list[str], cfg: dict[str, Any], start: dict[int, tuple[int, int]], offset: int):
        super().__init__()
        self.shards, self.cfg, self.start, self.offset = shards, cfg, start, offset

    def _epoch_shards(self, epoch: int, consumer: int, consumers: int) -> list[str]:
        n = len(self.shards)
        perm = np.random.default_rng(_seed(self.cfg["seed"], epoch, 0x5A4D)).permutation(n)
        return [self.shards[perm[(consumer + k * consumers) % n]] for k in range(math.ceil(n / consumers))]

    def _raw(self, epoch: int, consumer: int, consumers: int, policy: BadSamplePolicy) -> Iterator[dict]:
        raws = (r for url in self._epoch_shards(epoch, consumer, consumers) for r in _guarded_samples(url, policy))
        rng = np.random.default_rng(_seed(self.cfg["seed"], epoch, consumer, 0x5F))
        return _shuffled(raws, self.cfg["shuffle_buffer"], rng)

    def _prepare(
        self, raw: dict, gen: torch.Generator, policy: BadSamplePolicy, cfg: dict | None = None
    ) -> Batch | None:
        """Read a stored slice, draw a random crop with some valid pixel, convert only the crop, augment it."""
        cfg = cfg or self.cfg
        sample = _read_or_none(raw, cfg, policy)
        if sample is None:
            return None
        for _ in range(_CROP_TRIES):
            window = crop_window(sample.label, self.cfg["patch_size"], gen, cfg["class_weights"])
            if (sample.label[window[0]] >= 0).any():  # the padding is uncertain, so the box decides
                break
        else:
            return None  # a mostly uncertain slice: every try landed on uncertain pixels only
        try:
            image, label = finish_crop(sample, window, cfg["normalization"], cfg["num_labels"], cfg.get("remap"))
        except ValueError as e:
            policy(raw.get("__url__", "?"), raw.get("__key__"), e)
            return None
        if self.cfg["augment"] is not None:
            from hierseg.data.augment import augment

            image, label = augment(image, label, self.cfg["augment"], gen)
        return image, label

    def _identity(self) -> tuple[int, int, int]:
        """This DataLoader worker's logical worker, consumer index and the number of consumers."""
        info = get_worker_info()
        logical_workers = self.cfg["logical_workers"]
        lw = ((info.id if info else 0) + self.offset) % logical_workers
        return lw, self.cfg["rank"] * logical_workers + lw, self.cfg["world_size"] * logical_workers

    def __iter__(self) -> Iterator[tuple[Batch, tuple[int, int, int]]]:
        lw, consumer, consumers = self._identity()
        policy = BadSamplePolicy(self.cfg["on_bad_sample"])
        epoch, skip = self.start.get(lw, (0, 0))
        pending: list[Batch] = []
        while True:
            kept = 0
            for i, raw in enumerate(self._raw(epoch, consumer, consumers, policy)):
                if i < skip:
                    continue
                gen = torch.Generator().manual_seed(_seed(self.cfg["seed"], epoch, consumer, i))
                sample = self._prepare(raw, gen, policy)
                if sample is None:
                    continue
                kept += 1
                pending.append(sample)
                if len(pending) == self.cfg["batch_size"]:
                    batch = _collate(pending)
                    pending = []
                    yield batch, (lw, epoch, i + 1)
            if kept == 0 and skip == 0:
                raise ValueError(
                    f"rank {self.cfg['rank']} loader worker {lw}: a whole epoch of shards {self.shards[:3]}... "
                    "gave no usable training patch (all uncertain, or all bad); check the shards"
                )
            epoch, skip = epoch + 1, 0


class TrainStream:
    """Infinite, resumable per-rank batch stream: ``for image, label in stream`` never stops (several sources,
    :class:`MixedTrainStream`: ``for image, label, source in stream``, ``source`` each sample's index)."""

    def __init__(self, shards: list[str], cfg: dict[str, Any], num_workers: int):
        self.shards, self.cfg, self.num_workers = shards, cfg, num_workers
        self.logical_workers = cfg["logical_workers"]
        self.batches = 0
        self.positions: dict[int, tuple[int, int]] = {lw: (0, 0) for lw in range(self.logical_workers)}

    @property
    def epoch(self) -> int:
        """Slowest logical worker's epoch (each worker passes over its own share of the shards)."""
        return min(e for e, _ in self.positions.values())

    def _source(self) -> IterableDataset:
        return _TrainSource(self.shards, self.cfg, dict(self.positions), self.batches % self.logical_workers)

    def __iter__(self) -> Iterator[Batch]:
        source = self._source()
        # Its own generator: the workers' base seed must not draw from the global RNG, which resume
        # restores for dropout (drawing here would shift it and break bit-exact resume).
        generator = torch.Generator().manual_seed(_seed(self.cfg["seed"], self.cfg["rank"], self.batches))
        loader = DataLoader(
            source,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,
            persistent_workers=False,
            generator=generator,
        )
        for batch, (lw, epoch, pos) in loader:
            self.positions[lw] = (epoch, pos)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "epoch": self.epoch,
            "positions": [[lw, e, p] for lw, (e, p) in sorted(self.positions.items())],
            "logical_workers": self.logical_workers,
            "rank": self.cfg["rank"],
            "world_size": self.cfg["world_size"],
            "seed": self.cfg["seed"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; exact when the layout matches, else restart at the saved epoch."""
        if all(state.get(k) == v for k, v in self._layout().items()):
            self.batches = int(state["batches"])
            self.positions = self._parse_positions(state["positions"])
            return
        saved = {k: state.get(k) for k in self._layout()}
        warnings.warn(
            f"loader state was saved with {saved}; now {self._layout()}: resuming at the start of epoch "
            f"{state.get('epoch', 0)}, not at the exact sample",
            stacklevel=2,
        )
        self.batches = int(state.get("batches", 0))
        self.positions = self._restart_positions(int(state.get("epoch", 0)))

    def _parse_positions(self, saved: list) -> dict[int, Any]:
        return {int(lw): (int(e), int(p)) for lw, e, p in saved}

    def _restart_positions(self, epoch: int) -> dict[int, Any]:
        return {lw: (epoch, 0) for lw in range(self.logical_workers)}

    def _layout(self) -> dict[str, int]:
        keys = ("world_size", "seed")
        return {"logical_workers": self.logical_workers} | {k: self.cfg[k] for k in keys}


# ------------------------------------------------------------------------------ several training sources
SourcePositions = list[tuple[int, int]]


class _MixedTrainSource(_TrainSource):
    """One rank's infinite stream over several sources; sample ``j`` of a consumer draws its source by weight.

    Sample ``j``'s generator (seeded by ``(seed, consumer, j)``) first draws the source, then the crop
    and augmentation, so the mixture is a pure function of the positions too. Each source cycles its
    own shards forever (its own permutation per epoch and its own shuffle buffer), so no source, and
    no rank, can run dry; a source's position is ``(epoch, raw samples taken in that epoch)``.
    """

    def __init__(self, sources: list[dict[str, Any]], cfg: dict[str, Any],
                 start: dict[int, tuple[int, SourcePositions]], offset: int):  # fmt: skip
        super().__init__([], cfg, {}, offset)
        self.sources, self.mixed_start = sources, start
        self.weights = torch.tensor([s["weight"] for s in sources], dtype=torch.float64)

    def _source_raws(self, k: int, epoch: int, consumer: int, consumers: int, policy: BadSamplePolicy):
        src = self.sources[k]
        n = len(src["shards"])
        perm = np.random.default_rng(_seed(self.cfg["seed"], epoch, 0x5A4D, k)).permutation(n)
        urls = [src["shards"][perm[(consumer + m * consumers) % n]] for m in range(math.ceil(n / consumers))]
        raws = (r for url in urls for r in _guarded_samples(url, policy))
        rng = np.random.default_rng(_seed(self.cfg["seed"], epoch, consumer, 0x5F, k))
        return _shuffled(raws, self.cfg["shuffle_buffer"], rng)

    def _cycle(self, k: int, start: tuple[int, int], consumer: int, consumers: int, policy: BadSamplePolicy):
        """Source ``k``'s raw samples for this consumer as ``(epoch, index, raw)``, epoch after epoch, forever."""
        epoch, skip = start
        while True:
            seen = 0
            for i, raw in enumerate(self._source_raws(k, epoch, consumer, consumers, policy)):
                seen = i + 1
                if i >= skip:
                    yield epoch, i, raw
            if seen == 0:
                raise ValueError(
                    f"data source {self.sources[k]['name']!r}: rank {self.cfg['rank']} read no sample from a whole "
                    f"epoch of its shards {self.sources[k]['shards'][:3]}... (empty or all bad); check them"
                )
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[Batch, tuple[int, int, SourcePositions]]]:
        lw, consumer, consumers = self._identity()
        policy = BadSamplePolicy(self.cfg["on_bad_sample"])
        j, positions = self.mixed_start.get(lw, (0, [(0, 0)] * len(self.sources)))
        positions = list(positions)
        cycles = [self._cycle(k, pos, consumer, consumers, policy) for k, pos in enumerate(positions)]
        usable = _UsableWatch(self.sources, positions, self.cfg["rank"])
        pending: list[Batch] = []
        pending_sources: list[int] = []
        while True:
            gen = torch.Generator().manual_seed(_seed(self.cfg["seed"], consumer, j, 0x4D49))
            k = int(torch.multinomial(self.weights, 1, generator=gen))
            epoch, i, raw = next(cycles[k])
            positions[k], j = (epoch, i + 1), j + 1
            sample = self._prepare(raw, gen, policy, self.sources[k]["cfg"])
            usable.saw(k, epoch, sample is not None)
            if sample is None:
                continue
            pending.append(sample)
            pending_sources.append(k)
            if len(pending) == self.cfg["batch_size"]:
                # each sample's source too: a source_batch model normalises it with its source's statistics
                batch = (*_collate(pending), torch.tensor(pending_sources, dtype=torch.int64))
                pending, pending_sources = [], []
                yield batch, (lw, j, list(positions))


class _UsableWatch:
    """Fails a source whose whole epoch (for this consumer) gave no usable patch, instead of looping forever."""

    def __init__(self, sources: list[dict[str, Any]], positions: SourcePositions, rank: int):
        self.sources, self.rank = sources, rank
        self.epoch = [e for e, _ in positions]
        self.kept = [0] * len(sources)
        self.whole = [i == 0 for _, i in positions]  # a resumed epoch's skipped part is not seen again

    def saw(self, k: int, epoch: int, usable: bool) -> None:
        if epoch != self.epoch[k]:
            if self.kept[k] == 0 and self.whole[k]:
                raise ValueError(
                    f"data source {self.sources[k]['name']!r}: a whole epoch of its shards gave rank {self.rank} no "
                    "usable training patch (all uncertain, or all bad); check the source's shards and label map"
                )
            self.epoch[k], self.kept[k], self.whole[k] = epoch, 0, True
        self.kept[k] += int(usable)


class MixedTrainStream(TrainStream):
    """:class:`TrainStream` over several weighted sources; positions add every source's ``(epoch, index)``."""

    def __init__(self, sources: list[dict[str, Any]], cfg: dict[str, Any], num_workers: int):
        super().__init__([], cfg, num_workers)
        self.sources = sources
        start = [(0, 0)] * len(sources)
        self.positions = {lw: (0, list(start)) for lw in range(self.logical_workers)}  # type: ignore[assignment]

    @property
    def epoch(self) -> int:
        """Slowest source epoch of any logical worker."""
        return min(e for _, pos in self.positions.values() for e, _ in pos)  # type: ignore[misc]

    def _source(self) -> IterableDataset:
        offset = self.batches % self.logical_workers
        return _MixedTrainSource(self.sources, self.cfg, dict(self.positions), offset)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["positions"] = [[lw, j, [list(p) for p in pos]] for lw, (j, pos) in sorted(self.positions.items())]
        return state | {"sources": [s["name"] for s in self.sources]}

    def _parse_positions(self, saved: list) -> dict[int, Any]:
        return {int(lw): (int(j), [(int(e), int(i)) for e, i in pos]) for lw, j, pos in saved}

    def _restart_positions(self, epoch: int) -> dict[int, Any]:
        return {lw: (0, [(epoch, 0)] * len(self.sources)) for lw in range(self.logical_workers)}

    def _layout(self) -> dict[str, Any]:
        return super()._layout() | {"sources": [s["name"] for s in self.sources]}


def _mixed_sources(data: DataSpec, sources: Any, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-source shards, weight and decoding (own label range, remapping to the merged set table)."""
    out = []
    for src in sources.sources:
        weights = class_weights(src.train_manifest) if data.class_balanced else None
        where = f"data source {src.name!r}"
        try:
            shards = resolve_shards(src.train)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        source_cfg = {**cfg, "num_labels": src.num_labels, "remap": src.remap, "class_weights": weights}
        out.append({"name": src.name, "weight": src.weight, "shards": shards, "cfg": source_cfg})
    return out


def build_train_loader(
    data: DataSpec,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    normalization: dict[str, Any],
    num_labels: int,
    augment: bool = True,
    sources: Any = None,
) -> TrainStream:
    """The rank's infinite training stream of ``batch_size`` (per-rank) random crops of ``data.patch_size``.

    ``normalization`` is the run's resolved normalisation; ``num_labels`` is 12 plus the number of label sets.
    With several sources (``data.train`` a list; ``sources`` from :func:`hierseg.data.sources.resolve_sources`,
    resolved here when not given) the stream is a :class:`MixedTrainStream`.
    """
    multi = data.multi_source
    shards = [] if multi else resolve_shards(data.train)
    weights = class_weights(read_manifest(data.train)) if data.class_balanced and not multi else None
    cfg = {
        "patch_size": data.patch_size,
        "normalization": normalization,
        "num_labels": num_labels,
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "batch_size": batch_size,
        "logical_workers": max(1, data.num_workers),
        "shuffle_buffer": data.shuffle_buffer,
        "augment": data.augment if augment else None,
        "class_weights": weights,
        "on_bad_sample": data.on_bad_sample,
    }
    if multi:
        from hierseg.data.sources import resolve_sources

        return MixedTrainStream(_mixed_sources(data, sources or resolve_sources(data), cfg), cfg, data.num_workers)
    return TrainStream(shards, cfg, data.num_workers)


def check_shard_indexes(url: str, shards: list[str]) -> None:
    """Read every local shard's tar headers (not the data) and compare with its manifest: cheap, before any work.

    Why at preflight: a truncated validation shard used to surface only at the final evaluation,
    after the whole training run.
    """
    import tarfile

    manifest = read_manifest(url) or {}
    expected = {s["name"]: int(s["num_samples"]) for s in manifest.get("shards", [])}
    for shard in (s for s in shards if not _is_remote(s)):
        try:
            with tarfile.open(shard, "r:") as tar:
                keys = {m.name.split(".", 1)[0] for m in tar if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"shard {shard} is unreadable ({type(e).__name__}: {e}); rebuild the shards") from None
        want = expected.get(Path(shard).name)
        if want is not None and len(keys) != want:
            raise ValueError(f"shard {shard} holds {len(keys)} samples, its manifest says {want}; rebuild the shards")


# ------------------------------------------------------------------------------------------ validation
def _split_range(start: int, stop: int, parts: int, index: int) -> tuple[int, int]:
    n = stop - start
    return start + n * index // parts, start + n * (index + 1) // parts


def shard_counts(url: str, shards: list[str]) -> list[int]:
    """Samples per shard: from the manifest when it lists these shards, else by reading the tars."""
    manifest = read_manifest(url)
    if manifest:
        by_name = {s["name"]: int(s["num_samples"]) for s in manifest.get("shards", [])}
        if all(Path(s).name in by_name for s in shards):
            return [by_name[Path(s).name] for s in shards]
    return [sum(1 for _ in iter_raw_samples(s)) for s in shards]


class _ValSource(IterableDataset):
    """Samples with global index in ``[start, stop)``, split further over DataLoader workers.

    With ``shard_sources`` (several sources: the shards of all of them, in source order) each shard
    decodes with its source's entry of ``source_cfgs`` and each sample comes with its source index.
    """

    def __init__(self, shards: list[str], counts: list[int], start: int, stop: int, cfg: dict[str, Any],
                 shard_sources: list[int] | None = None, source_cfgs: list[dict[str, Any]] | None = None):  # fmt: skip
        super().__init__()
        self.shards, self.counts, self.start, self.stop, self.cfg = shards, counts, start, stop, cfg
        self.shard_sources, self.source_cfgs = shard_sources, source_cfgs

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        a, b = _split_range(self.start, self.stop, info.num_workers if info else 1, info.id if info else 0)
        policy = BadSamplePolicy(self.cfg["on_bad_sample"])
        offset = 0
        for k, (url, count) in enumerate(zip(self.shards, self.counts)):
            lo, hi = max(a, offset), min(b, offset + count)
            src = None if self.shard_sources is None else self.shard_sources[k]
            cfg = self.cfg if src is None else self.source_cfgs[src]
            if lo < hi:
                seen = 0
                for j, raw in enumerate(_guarded_samples(url, policy)):
                    seen = j + 1
                    if lo <= offset + j < hi and (sample := _decode_or_none(raw, cfg, policy)) is not None:
                        tagged = () if src is None else (src,)
                        yield sample[0][None], sample[1][None], *tagged
                if seen != count and policy.mode == "stop":
                    raise ValueError(f"shard {url} holds {seen} samples but the manifest says {count}; rebuild")
            offset += count


class ValLoader:
    """This rank's share of the validation slices, one ``[1, C, h, w]`` slice at a time (whole, never cropped).

    Over all ranks every stored slice or tile appears exactly once, so every valid pixel is scored once.
    """

    def __init__(self, shards: list[str], counts: list[int], rank: int, world_size: int, cfg: dict[str, Any],
                 num_workers: int, shard_sources: list[int] | None = None,
                 source_cfgs: list[dict[str, Any]] | None = None):  # fmt: skip
        self.start, self.stop = _split_range(0, sum(counts), world_size, rank)
        self.num_workers = num_workers
        self.source = _ValSource(shards, counts, self.start, self.stop, cfg, shard_sources, source_cfgs)

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[Batch]:
        if self.num_samples == 0:
            return iter(())
        workers = min(self.num_workers, self.num_samples)
        loader = DataLoader(self.source, batch_size=None, num_workers=workers, persistent_workers=False)
        return iter(loader)


def build_val_loader(
    data: DataSpec, *, rank: int, world_size: int, normalization: dict[str, Any], num_labels: int, sources: Any = None
) -> ValLoader:
    """Un-augmented whole slices of this rank's contiguous share of the validation samples.

    With several sources, the index runs over every validation source's slices in source order (so
    each is still seen exactly once) and a sample is ``(image, label, index in sources.val_sources)``.
    """
    cfg = {"normalization": normalization, "num_labels": num_labels, "on_bad_sample": data.on_bad_sample}
    if not data.multi_source:
        shards = resolve_shards(data.val)
        return ValLoader(shards, shard_counts(data.val, shards), rank, world_size, cfg, data.num_workers)
    from hierseg.data.sources import resolve_sources

    shards, counts, owners, cfgs = [], [], [], []
    for k, src in enumerate((sources or resolve_sources(data)).val_sources):
        try:
            mine = resolve_shards(src.val)
        except ValueError as e:
            raise ValueError(f"data source {src.name!r} (data.val): {e}") from None
        shards += mine
        counts += shard_counts(src.val, mine)
        owners += [k] * len(mine)
        cfgs.append({**cfg, "num_labels": src.num_labels, "remap": src.remap})
    return ValLoader(shards, counts, rank, world_size, cfg, data.num_workers, owners, cfgs)
