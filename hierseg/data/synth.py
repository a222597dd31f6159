"""Seeded synthetic EM-like images with labels for all 12 fine classes and a share of uncertain pixels.

The demo and the fast tests need data that looks enough like EM to exercise the whole pipeline, and
that a tiny U-Net can learn in a few hundred CPU steps. So classes differ by intensity *and* texture
*and* context (myelin is a dark ring, tongues are crescents beside it, nuclei sit in somata, mitochondria
inside neurites), like the real thing, with blur and noise on top. Some object rims are labelled
uncertain, as human tracers do, so the ignore path is always exercised.

``hierseg synth --out DIR`` writes ``images/*.png`` and ``labels/*.png`` (255 = uncertain, the default
label map of ``make-shards``). :func:`ensure_synthetic` writes train/val shards straight from memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from hierseg.cli import int_at_least
from hierseg.fsutil import probe_writable
from hierseg.labels import IGNORE_INDEX, class_index

ECS, TEAR, DENDRITE, AXON, SOMA, GLIA = (
    class_index(n) for n in ("extracellular space", "tear", "dendrite", "axon", "soma", "glia")
)
MYELIN, INNER, OUTER = (class_index(n) for n in ("myelin", "myelin inner tongue", "myelin outer tongue"))
NUCLEUS, MITO, FAT = (class_index(n) for n in ("nucleus", "mitochondria", "fat globule"))

# Per-class base intensity and texture amplitude (fine, coarse) in a [0, 1] image.
BASE = np.array([0.80, 0.99, 0.60, 0.68, 0.56, 0.40, 0.10, 0.33, 0.46, 0.50, 0.26, 0.90], np.float32)
FINE_TEX = np.array([0.10, 0.00, 0.05, 0.03, 0.05, 0.12, 0.03, 0.04, 0.04, 0.06, 0.05, 0.01], np.float32)
COARSE_TEX = np.array([0.06, 0.00, 0.04, 0.02, 0.04, 0.06, 0.02, 0.02, 0.02, 0.03, 0.02, 0.00], np.float32)


@dataclass
class Canvas:
    """Label canvas being painted, plus the mask of pixels tracers leave uncertain."""

    label: np.ndarray
    uncertain: np.ndarray
    membrane: np.ndarray
    yy: np.ndarray = field(repr=False)
    xx: np.ndarray = field(repr=False)

    @classmethod
    def empty(cls, size: int) -> Canvas:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        zeros = np.zeros((size, size), bool)
        return cls(np.full((size, size), ECS, np.int64), zeros, zeros.copy(), yy, xx)


def _blob(c: Canvas, rng: np.random.Generator, cy: float, cx: float, ry: float, rx: float, wobble: float):
    """Normalised radius ``d`` (inside: d < 1) and angle of an ellipse with a wavy outline, on its bbox."""
    r = max(ry, rx) * (1.3 + wobble)
    n = c.label.shape[0]
    y0, y1 = int(max(0, cy - r)), int(min(n, cy + r + 1))
    x0, x1 = int(max(0, cx - r)), int(min(n, cx + r + 1))
    if y1 <= y0 or x1 <= x0:
        return None
    theta = rng.uniform(0, np.pi)
    dy, dx = c.yy[y0:y1, x0:x1] - cy, c.xx[y0:y1, x0:x1] - cx
    u = dy * np.cos(theta) + dx * np.sin(theta)
    v = -dy * np.sin(theta) + dx * np.cos(theta)
    phi = np.arctan2(u, v)
    k, p = rng.integers(2, 6), rng.uniform(0, 2 * np.pi)
    d = np.sqrt((u / ry) ** 2 + (v / rx) ** 2) / (1 + wobble * np.sin(k * phi + p))
    return (slice(y0, y1), slice(x0, x1)), d, phi


def _paint(c: Canvas, rng: np.random.Generator, cls: int, blob, rim_uncertain: float = 0.5) -> np.ndarray:
    """Fill a blob with a class, darken its membrane, maybe mark its rim uncertain; returns the inside mask."""
    sl, d, _ = blob
    inside = d < 1
    c.label[sl][inside] = cls
    c.membrane[sl] |= (d > 0.9) & (d < 1.02)
    if rng.random() < rim_uncertain:
        c.uncertain[sl] |= (d > 0.86) & (d < 1.1)
    return inside


def _axon(c: Canvas, rng: np.random.Generator, cy: float, cx: float, r: float) -> None:
    """Myelinated axon: light interior, dark myelin ring, inner tongue crescent inside, outer outside."""
    blob = _blob(c, rng, cy, cx, r, r * rng.uniform(0.8, 1.2), 0.05)
    if blob is None:
        return
    sl, d, phi = blob
    inner = 1 - rng.uniform(0.25, 0.4)
    lab = c.label[sl]
    a_in, a_out = rng.uniform(-np.pi, np.pi, 2)
    lab[(d >= 1) & (d < 1.18) & (np.cos(phi - a_out) > 0.75)] = OUTER
    lab[d < 1] = MYELIN
    lab[d < inner] = AXON
    lab[(d >= inner - 0.14) & (d < inner) & (np.cos(phi - a_in) > 0.6)] = INNER
    if rng.random() < 0.4:
        c.uncertain[sl] |= (d > inner - 0.04) & (d < inner + 0.04)
    if rng.random() < 0.3:
        _mito(c, rng, cy, cx, r * inner * 0.4)


def _mito(c: Canvas, rng: np.random.Generator, cy: float, cx: float, r: float) -> None:
    blob = _blob(c, rng, cy, cx, max(2.0, r * 0.45), max(3.5, r), 0.05)
    if blob is not None:
        _paint(c, rng, MITO, blob, rim_uncertain=0.2)


def _soma(c: Canvas, rng: np.random.Generator, cy: float, cx: float, r: float) -> None:
    blob = _blob(c, rng, cy, cx, r, r * rng.uniform(0.8, 1.1), 0.08)
    if blob is None:
        return
    _paint(c, rng, SOMA, blob)
    nuc = _blob(c, rng, cy + rng.normal(0, r * 0.1), cx + rng.normal(0, r * 0.1), r * 0.5, r * 0.45, 0.05)
    if nuc is not None:
        _paint(c, rng, NUCLEUS, nuc, rim_uncertain=0.3)
    for _ in range(rng.integers(2, 5)):
        ang, rad = rng.uniform(0, 2 * np.pi), r * rng.uniform(0.65, 0.8)
        _mito(c, rng, cy + rad * np.sin(ang), cx + rad * np.cos(ang), r * 0.15)


def _tear(c: Canvas, rng: np.random.Generator, scale: float) -> None:
    """A sectioning tear: a long thin white band across part of the image."""
    n = c.label.shape[0]
    y0, x0 = rng.uniform(0, n, 2)
    ang = rng.uniform(0, np.pi)
    dist = np.abs((c.yy - y0) * np.cos(ang) - (c.xx - x0) * np.sin(ang))
    along = np.abs((c.yy - y0) * np.sin(ang) + (c.xx - x0) * np.cos(ang))
    band = (dist < rng.uniform(2.5, 5) * scale) & (along < rng.uniform(0.3, 0.6) * n)
    c.label[band] = TEAR
    c.uncertain[band & (dist > dist[band].max() - 1.2)] = True


def layout(rng: np.random.Generator, size: int) -> Canvas:
    """Paint one label image: large cells first, neurites, then small organelles and tears on top."""
    c = Canvas.empty(size)
    s = size / 256

    def spot() -> tuple[float, float]:
        return tuple(rng.uniform(0, size, 2))

    if rng.random() < 0.8:
        _soma(c, rng, *spot(), rng.uniform(30, 45) * s)
    for _ in range(rng.integers(5, 9)):
        _paint(c, rng, GLIA, _blob(c, rng, *spot(), *rng.uniform(10, 20, 2) * s, 0.25) or _none(c))
    for _ in range(rng.integers(14, 20)):
        cy, cx = spot()
        r = rng.uniform(12, 24) * s
        if _paint(c, rng, DENDRITE, _blob(c, rng, cy, cx, r, r * 0.7, 0.12) or _none(c)).any() and rng.random() < 0.7:
            _mito(c, rng, cy, cx, r * 0.35)
    for _ in range(rng.integers(40, 55)):
        _axon(c, rng, *spot(), rng.uniform(8, 17) * s)
    for _ in range(rng.integers(1, 3)):
        _paint(c, rng, FAT, _blob(c, rng, *spot(), *[rng.uniform(6, 12) * s] * 2, 0.02) or _none(c), 0.3)
    if rng.random() < 0.6:
        _tear(c, rng, s)
    return c


def _none(c: Canvas):
    """An empty blob (object entirely off the canvas)."""
    return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)


def render(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Label canvas -> uint8 EM-like image: class intensities, textures, membranes, blur, noise."""
    size = c.label.shape[0]
    fine = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), 0.8) * 2.2
    coarse = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), 5) * 8
    lab = c.label
    img = BASE[lab] + FINE_TEX[lab] * fine + COARSE_TEX[lab] * coarse
    stripes = np.sin(0.9 * (c.xx * 0.8 + c.yy * 0.6))
    img += np.where(lab == MITO, 0.08 * stripes, 0) + np.where(lab == DENDRITE, 0.03 * np.sin(0.5 * c.xx), 0)
    img -= np.where((lab == NUCLEUS) & (coarse > 0.6), 0.18, 0)
    img = np.where(c.membrane & (lab != MYELIN), img * 0.55, img)
    img = ndimage.gaussian_filter(img, 0.7) + rng.normal(0, 0.035, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def synth_pair(seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 ``[H,W]``) and its label (int64 ``[H,W]``, -1 = uncertain) from a seed."""
    rng = np.random.default_rng(seed)
    c = layout(rng, size)
    image = render(c, rng)
    label = np.where(c.uncertain, IGNORE_INDEX, c.label)
    return image, label


def synth_stack(seed: int, depth: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A ``[Z,H,W]`` stack whose slices share one tissue layout that drifts slowly along z.

    Objects move by a smooth random shift per slice, so neighbouring slices are correlated like
    serial sections, which is what 2.5D context and slab splits need to be tested on.
    """
    rng = np.random.default_rng(seed)
    c = layout(rng, size)
    images, labels = [], []
    for z in range(depth):
        shift = (np.sin(z * 0.3) * 2.0, np.cos(z * 0.2) * 2.0)
        lab = ndimage.shift(c.label, shift, order=0, mode="nearest")
        unc = ndimage.shift(c.uncertain, shift, order=0, mode="nearest")
        mem = ndimage.shift(c.membrane, shift, order=0, mode="nearest")
        sc = Canvas(lab, unc, mem, c.yy, c.xx)
        images.append(render(sc, rng))
        labels.append(np.where(unc, IGNORE_INDEX, lab))
    return np.stack(images), np.stack(labels)


# ------------------------------------------------------------------------------------------- shards
def write_synthetic_split(out_dir: Path, num_images: int, image_size: int, seed: int) -> dict:
    """Generate images in memory and write whole-image shards + manifest for one split (as make-shards does)."""
    from hierseg.data.labelmap import LabelMap
    from hierseg.data.normalize import IntensitySummary
    from hierseg.data.shards import BuildConfig, ShardSink, add_slice, write_json_atomic

    sink = ShardSink(out_dir, max_samples=max(1, num_images // 4))
    intensity = IntensitySummary()
    cfg = BuildConfig(tile_size=max(image_size, 16), min_valid=0.0)
    for i in range(num_images):
        image, label = synth_pair(seed * 100_003 + i, image_size)
        intensity.add(image)
        add_slice(sink, f"synth{i:05d}", 0, image[None], label[None], 0, cfg)
    sink.close()
    manifest = sink.manifest(
        [image_size, image_size],
        1,
        label_map=LabelMap.default().to_manifest(),
        label_sets=[],
        intensity=intensity.record(),
        sources=[{"name": "synthetic", "seed": seed, "num_images": num_images, "image_size": image_size}],
        command=f"hierseg synthetic (seed={seed})",
    )
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def ensure_synthetic(data_spec) -> None:
    """Write synthetic train/val shards into ``data.train``/``data.val`` unless they already hold a manifest.

    Safe to call from several processes at once: each builds in a private temporary folder and
    renames it into place; a loser of the race discards its copy.
    """
    syn = data_spec.synthetic
    if syn is None:
        return
    for split, folder, num, seed in (
        ("train", data_spec.train, syn.num_train, syn.seed),
        ("val", data_spec.val, syn.num_val, syn.seed + 7919),
    ):
        dest = Path(folder)
        if (dest / "manifest.json").is_file():
            continue
        if dest.exists() and any(dest.iterdir()):
            raise ValueError(
                f"data.{split} folder {dest} exists without manifest.json; remove it or point data.{split} elsewhere"
            )
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_split(tmp, num, syn.image_size, seed)
        try:
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
            if not (dest / "manifest.json").is_file():
                raise


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hierseg synth", description="Generate synthetic EM-like images and labels.")
    p.add_argument("--out", required=True, type=Path, help="output folder (gets images/ and labels/)")
    p.add_argument("--num", type=int_at_least(1), default=16, help="number of 2D images (or stacks with --depth)")
    p.add_argument("--size", type=int_at_least(16), default=256, help="image side in pixels (at least 16)")
    p.add_argument("--depth", type=int_at_least(0), default=0,
                   help="write 3D stacks of this many slices (multi-page TIFF); 0: 2D images")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from PIL import Image

    for sub in ("images", "labels"):
        try:
            probe_writable(args.out / sub)
        except OSError as e:
            p.error(f"--out {args.out}: cannot write in {args.out / sub} ({e.strerror or e}); choose another --out")
    for i in range(args.num):
        name = f"synth_{i:04d}"
        if args.depth:
            import tifffile

            image, label = synth_stack(args.seed * 100_003 + i, args.depth, args.size)
            tifffile.imwrite(args.out / "images" / f"{name}.tif", image)
            tifffile.imwrite(args.out / "labels" / f"{name}.tif", np.where(label < 0, 255, label).astype(np.uint8))
        else:
            image, label = synth_pair(args.seed * 100_003 + i, args.size)
            Image.fromarray(image).save(args.out / "images" / f"{name}.png")
            Image.fromarray(np.where(label < 0, 255, label).astype(np.uint8)).save(args.out / "labels" / f"{name}.png")
    print(f"wrote {args.num} synthetic {'stacks' if args.depth else 'images'} to {args.out} (labels: 255 = uncertain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
