"""Streaming loaders: WebDataset tar shards -> ``(image [B,C,H,W] float32, label [B,H,W] int64)`` batches.

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

import glob
import io
import json
import math
import os
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hierseg.data.normalize import normalize
from hierseg.spec import DataSpec

MANIFEST = "manifest.json"
SHARD_FORMAT = "hierseg-shards/2"
Batch = tuple[torch.Tensor, torch.Tensor]


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
        argv = shlex.split(command)
        keep = [a for i, a in enumerate(argv) if not _is_old_flag(argv, i)]
        fix = f"rebuild them with: {shlex.join(keep)} --overwrite" if keep else "rebuild them with hierseg make-shards"
    raise ValueError(
        f"{folder}/{MANIFEST} is {manifest.get('format', 'an unversioned format')}, a fixed grid of patches from an "
        f"older hierseg; this version stores whole slices ({SHARD_FORMAT}) and crops data.patch_size while "
        f"training: {fix}"
    )


def _is_old_flag(argv: list[str], i: int) -> bool:
    """``--patch-size N`` / ``--stride N`` (either form) of an old make-shards command."""
    old = ("--patch-size", "--stride")
    return argv[i] in old or argv[i].startswith(tuple(f"{o}=" for o in old)) or (i > 0 and argv[i - 1] in old)


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


def decode_sample(
    raw: dict[str, Any], norm: dict[str, Any], num_labels: int, remap: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``float32 [C,h,w]`` image and ``int64 [h,w]`` label of a stored slice or tile.

    ``norm`` is the run's resolved normalisation (:func:`hierseg.data.normalize.normalize`), applied
    with the whole slice's statistics stored beside the tile; labels must lie in ``-1 .. num_labels - 1``
    (fine classes, then label-set ids), which is checked here so that a bad value names its sample
    instead of failing deep inside the loss (a device-side assert on GPU). ``remap`` (a source of a
    multi-source run, :mod:`hierseg.data.sources`) then turns the source's set ids into the merged
    table's: ``label = remap[label + 1]``.
    """
    for part in ("image.npy", "label.npy"):
        if part not in raw:
            raise ValueError(f"missing member {part} (has {sorted(k for k in raw if not k.startswith('__'))})")
    image = np.load(io.BytesIO(raw["image.npy"]), allow_pickle=False)
    label = np.load(io.BytesIO(raw["label.npy"]), allow_pickle=False)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or label.ndim != 2 or image.shape[1:] != label.shape:
        raise ValueError(f"image shape {image.shape} does not fit label shape {label.shape}")
    if label.dtype.kind not in "iu":
        raise ValueError(f"label must be integers, got dtype {label.dtype}")
    if label.size and (label.min() < -1 or label.max() >= num_labels):
        bad = int(label.max()) if label.max() >= num_labels else int(label.min())
        raise ValueError(
            f"label value {bad} is outside -1..{num_labels - 1} (fine classes 0..11, then the manifest's label sets)"
        )
    meta = json.loads(raw["json"]) if "json" in raw else {}
    x = normalize(image, norm, meta.get("stats"))
    label = label.astype(np.int64) if remap is None else remap[label.astype(np.int64) + 1]
    return torch.from_numpy(x), torch.from_numpy(label)


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


# -------------------------------------------------------------------------------------------- training
def _seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (stable across processes and Python versions)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


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


def random_crop(
    image_CHW: torch.Tensor,
    label_HW: torch.Tensor,
    size: int,
    gen: torch.Generator,
    class_weights: torch.Tensor | None = None,
) -> Batch:
    """A ``size x size`` crop at a position drawn from ``gen`` (so resume replays it exactly).

    Uniform positions, or with ``class_weights`` centred on a pixel of a class drawn by weight among
    the classes present (single-class valid pixels only; uniform when none is present). A slice
    smaller than ``size`` is padded: image with 0 (the z-scored mean), label with uncertain.
    """
    _, h, w = image_CHW.shape
    if h < size or w < size:
        pad = (0, max(0, size - w), 0, max(0, size - h))
        image_CHW = F.pad(image_CHW, pad)
        label_HW = F.pad(label_HW, pad, value=-1)
        h, w = label_HW.shape
    centre = _weighted_pixel(label_HW, class_weights, gen) if class_weights is not None else None
    if centre is None:
        y0 = int(torch.randint(0, h - size + 1, (), generator=gen))
        x0 = int(torch.randint(0, w - size + 1, (), generator=gen))
    else:
        y0 = min(max(centre[0] - size // 2, 0), h - size)
        x0 = min(max(centre[1] - size // 2, 0), w - size)
    return image_CHW[:, y0 : y0 + size, x0 : x0 + size], label_HW[y0 : y0 + size, x0 : x0 + size]


def _weighted_pixel(label_HW: torch.Tensor, weights: torch.Tensor, gen: torch.Generator) -> tuple[int, int] | None:
    """A random pixel of a class drawn with probability ~ weight among the classes present; None if none is."""
    fine = label_HW[(label_HW >= 0) & (label_HW < weights.numel())]
    present = torch.bincount(fine, minlength=weights.numel()) > 0
    p = weights * present
    if float(p.sum()) <= 0:
        return None
    c = int(torch.multinomial(p, 1, generator=gen))
    idx = torch.nonzero(label_HW.reshape(-1) == c).squeeze(1)
    flat = int(idx[int(torch.randint(0, idx.numel(), (), generator=gen))])
    return flat // label_HW.shape[1], flat % label_HW.shape[1]


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
        """Decode a stored slice, draw a random crop with some valid pixel, augment it."""
        cfg = cfg or self.cfg
        sample = _decode_or_none(raw, cfg, policy)
        if sample is None:
            return None
        for _ in range(_CROP_TRIES):
            image, label = random_crop(*sample, self.cfg["patch_size"], gen, cfg["class_weights"])
            if (label >= 0).any():
                break
        else:
            return None  # a mostly uncertain slice: every try landed on uncertain pixels only
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
                    batch = (torch.stack([s[0] for s in pending]), torch.stack([s[1] for s in pending]))
                    pending = []
                    yield batch, (lw, epoch, i + 1)
            if kept == 0 and skip == 0:
                raise ValueError(
                    f"rank {self.cfg['rank']} loader worker {lw}: a whole epoch of shards {self.shards[:3]}... "
                    "gave no usable training patch (all uncertain, or all bad); check the shards"
                )
            epoch, skip = epoch + 1, 0


class TrainStream:
    """Infinite, resumable per-rank batch stream: ``for image, label in stream`` never stops."""

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
            if len(pending) == self.cfg["batch_size"]:
                batch = (torch.stack([s[0] for s in pending]), torch.stack([s[1] for s in pending]))
                pending = []
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
