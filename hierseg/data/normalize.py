"""The one image normalisation: raw pixel values -> float32 network input, for shards, loader and predict.

Why one function: the shard builder, the training loader and prediction must turn the same raw pixels
into the same float tensor. Two copies of this formula once disagreed on int16 stacks (training
divided by the dtype maximum, prediction did not), and the model predicted garbage without a word.

Shards store raw values (uint8/uint16/int16 stay integers; other types become float32) plus, per
slice, the statistics :func:`image_stats` computes over the *whole* slice. The loader normalises a
random crop with its slice's stored statistics, prediction computes them from the slice it reads:
the same numbers either way, so a crop of a stored tile equals the same pixels of a predicted slice.

Modes (the resolved form travels in checkpoints and logged models as a small dict):

- ``zscore``: ``(x - mean) / std`` over the whole slice (the usual EM default; robust to
  per-section brightness drift).
- ``affine``: ``(x - lo) / (hi - lo)`` with fixed numbers: dataset percentiles of the training
  split (``percentile`` in the spec) or a given range (``range``).
- ``dtype_max``: integers divided by their dtype's maximum, floats as they are: what hierseg
  did before normalisation was recorded; only for checkpoints that carry no normalisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

STORED_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)
PERCENTILE_GRID = tuple(np.round(np.arange(0, 100.0001, 0.5), 1).tolist())
"""Percentiles the shard builder records per split; ``data.normalization.percentiles`` picks two of them."""
_MIN_STD = 1e-6
LEGACY = {"mode": "dtype_max"}


def storage_array(image: np.ndarray) -> np.ndarray:
    """Raw values as stored in shards: uint8/uint16/int16 unchanged, anything else float32."""
    if image.dtype.kind == "b":
        image = image.astype(np.uint8)
    if any(image.dtype == d for d in STORED_DTYPES):
        return image
    if image.dtype.kind not in "uif":
        raise ValueError(f"image dtype {image.dtype} is not a number type; EM images are integers or floats")
    return image.astype(np.float32)


def image_stats(image: np.ndarray) -> dict[str, float]:
    """Mean and standard deviation (float64) of a whole slice, the numbers ``zscore`` needs."""
    x = np.asarray(image, dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std())}


def normalize(image: np.ndarray, norm: Mapping[str, Any], stats: Mapping[str, float] | None = None) -> np.ndarray:
    """``image`` (any shape, raw values) -> float32 network input, as ``norm`` (a resolved dict) says.

    ``stats`` are the :func:`image_stats` of the whole slice ``image`` was cut from; computed from
    ``image`` itself when not given (prediction passes whole slices).
    """
    mode = norm.get("mode")
    if mode == "zscore":
        s = stats if stats is not None else image_stats(image)
        scale = 1.0 / max(float(s["std"]), _MIN_STD)
        return ((np.asarray(image, dtype=np.float64) - float(s["mean"])) * scale).astype(np.float32)
    if mode == "affine":
        lo, hi = float(norm["lo"]), float(norm["hi"])
        return ((np.asarray(image, dtype=np.float64) - lo) / max(hi - lo, _MIN_STD)).astype(np.float32)
    if mode == "dtype_max":
        if image.dtype.kind in "ui":
            return (image.astype(np.float64) / np.iinfo(image.dtype).max).astype(np.float32)
        return image.astype(np.float32)
    raise ValueError(f"unknown normalisation {dict(norm)!r}; expected mode zscore, affine or dtype_max")


def normalize_block(
    image_CDHW: np.ndarray, norm: Mapping[str, Any], stats_per_slice: list[Mapping[str, float]] | None = None
) -> np.ndarray:
    """A 3D block ``[C, D, H, W]`` -> float32, each z slice through :func:`normalize` with its own statistics.

    Why per slice: serial sections differ in brightness and contrast section by section, so a 3D block
    is normalised exactly as its slices are in 2D training and prediction (``stats_per_slice[z]`` are the
    :func:`image_stats` of the whole slice ``z`` of the block, not of the tile).
    """
    depth = image_CDHW.shape[1]
    stats = stats_per_slice if stats_per_slice is not None else [None] * depth
    if len(stats) != depth:
        raise ValueError(f"a block of {depth} slices carries statistics of {len(stats)} slices; rebuild the shards")
    return np.stack([normalize(image_CDHW[:, z], norm, s) for z, s in enumerate(stats)], axis=1)


def resolve(spec: Any, intensity: Mapping[str, Any] | None) -> dict[str, Any]:
    """The concrete normalisation of a run from ``data.normalization`` and the training manifest's intensity record.

    ``percentile`` becomes fixed ``affine`` numbers here, once, so prediction on any other data uses
    exactly the training split's values.
    """
    if spec.mode == "zscore":
        return {"mode": "zscore"}
    if spec.mode == "range":
        if spec.range is not None:
            lo, hi = spec.range
        else:
            dtype = np.dtype((intensity or {}).get("dtype", "float32"))
            if dtype.kind not in "ui":
                raise ValueError(
                    f"data.normalization.range is needed: the shards store {dtype} images, which have no fixed range"
                )
            lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
        return {"mode": "affine", "lo": float(lo), "hi": float(hi), "from": "range"}
    table = (intensity or {}).get("percentiles")
    if not table:
        raise ValueError(
            "data.normalization.mode=percentile needs the training manifest's intensity percentiles; "
            "rebuild the shards with this hierseg version"
        )
    lo, hi = (float(table[_grid_key(p)]) for p in spec.percentiles)
    return {"mode": "affine", "lo": lo, "hi": hi, "from": f"training percentiles {list(spec.percentiles)}"}


def _grid_key(p: float) -> str:
    return f"{float(p):.1f}"


class IntensitySummary:
    """Pools the pixel values of one split into the manifest's ``intensity`` record (dtype, range, percentiles).

    Integers of up to 16 bits are counted exactly in a histogram; other types through a fixed-seed
    sample of at most 65,536 pixels per slice (percentiles of a float volume are estimates anyway).
    """

    def __init__(self) -> None:
        self.dtype: np.dtype | None = None
        self.hist: np.ndarray | None = None
        self.samples: list[np.ndarray] = []
        self._rng = np.random.default_rng(0)

    def add(self, image: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype = image.dtype
        elif image.dtype != self.dtype:
            raise ValueError(f"images of one split have different dtypes ({self.dtype} and {image.dtype})")
        if image.dtype in (np.uint8, np.uint16, np.int16):
            offset = -int(np.iinfo(image.dtype).min)
            counts = np.bincount((image.astype(np.int64) + offset).ravel(), minlength=1 << (8 * image.itemsize))
            self.hist = counts if self.hist is None else self.hist + counts
        else:
            flat = image.ravel()
            take = self._rng.choice(flat.size, size=min(flat.size, 65536), replace=False)
            self.samples.append(flat[np.sort(take)].astype(np.float64))

    def record(self) -> dict[str, Any]:
        if self.dtype is None:
            return {}
        if self.hist is not None:
            offset = -int(np.iinfo(self.dtype).min)
            cdf = np.cumsum(self.hist) / self.hist.sum()
            q = np.array(PERCENTILE_GRID) / 100.0
            values = np.searchsorted(cdf, np.clip(q, 1e-12, 1.0 - 1e-12), side="left") - offset
        else:
            values = np.percentile(np.concatenate(self.samples), PERCENTILE_GRID)
        table = {_grid_key(p): float(v) for p, v in zip(PERCENTILE_GRID, values, strict=True)}
        return {"dtype": str(self.dtype), "min": table["0.0"], "max": table["100.0"], "percentiles": table}
