"""Shared helpers of the data tests: tiny synthetic datasets built through the real CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from hierseg.data import shards, synth

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_pairs(folder: Path, num: int, size: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic PNG pairs with mouse-like group prefixes ``sub-<k>_...`` (255 = uncertain)."""
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        image, label = synth.synth_pair(seed * 1000 + i, size)
        name = f"sub-{i % 3}_img-{i:02d}.png"
        Image.fromarray(image).save(images / name)
        Image.fromarray(np.where(label < 0, 255, label).astype(np.uint8)).save(labels / name)
    return images, labels


def build(src: Path, out: Path, *extra: str) -> int:
    args = ["--images", str(src / "images"), "--labels", str(src / "labels"), "--out", str(out)]
    return shards.main([*args, "--tile-size", "64", *extra])


def train_loader(data, **kw):
    """The training stream with the default normalisation and the 12 fine classes (no label sets)."""
    from hierseg.data.loader import build_train_loader

    return build_train_loader(data, normalization={"mode": "zscore"}, num_labels=12, **kw)


def val_loader(data, **kw):
    from hierseg.data.loader import build_val_loader

    return build_val_loader(data, normalization={"mode": "zscore"}, num_labels=12, **kw)


def digest(t) -> str:
    return hashlib.sha256(np.ascontiguousarray(t.numpy()).tobytes()).hexdigest()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
