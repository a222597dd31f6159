"""Readers for the image and label formats EM labs use, all returning plain numpy arrays.

Everything goes through well-kept libraries (Pillow, tifffile, h5py, zarr, numpy) and every failure
is re-raised as a ``ValueError`` naming the file, so a user with 400 volumes knows which one is bad.

Accepted sources:
- 2D image files: ``.png``, ``.jpg``, ``.tif``/``.tiff`` (a multi-page TIFF reads as a 3D stack)
- a folder of 2D slices (sorted by name) -> 3D stack
- HDF5 ``file.h5:dataset/path``; zarr ``store.zarr`` or ``store.zarr:array/path``; ``.npy``
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy")
_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def split_source(spec: str) -> tuple[Path, str | None]:
    """``file.h5:data/raw`` -> (Path('file.h5'), 'data/raw'); plain paths have no inner key."""
    for marker in (*_H5_SUFFIXES, ".zarr"):
        idx = spec.find(marker + ":")
        if idx >= 0:
            return Path(spec[: idx + len(marker)]), spec[idx + len(marker) + 1 :]
    return Path(spec), None


def read_array(spec: str | Path) -> np.ndarray:
    """Read one image, stack or volume; ``ValueError`` naming the file on any problem."""
    path, inner = split_source(str(spec))
    if not path.exists():
        raise ValueError(f"input {path} does not exist; check the path")
    try:
        if path.is_dir() and path.suffix != ".zarr" and not _looks_like_zarr(path):
            return read_slices(path)
        if path.suffix.lower() in _H5_SUFFIXES:
            return _read_h5(path, inner)
        if path.suffix == ".zarr" or _looks_like_zarr(path):
            return _read_zarr(path, inner)
        if path.suffix.lower() == ".npy":
            return check_not_colour(np.load(path, allow_pickle=False), str(path))
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        return _read_pil(path)
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"cannot read {spec}: {e}") from None
    except Exception as e:  # library errors differ per format; the file name is what users need
        raise ValueError(f"cannot read {spec} (unreadable or truncated file?): {type(e).__name__}: {e}") from None


def check_not_colour(arr: np.ndarray, name: str) -> np.ndarray:
    """Refuse an ``(H, W, 3|4)`` array: read as a stack it would be H slices of garbage, for minutes."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4 and arr.shape[1] > 4:
        raise ValueError(
            f"{name} has shape {arr.shape}, a colour image (H, W, {arr.shape[-1]}); EM images and labels must be "
            "single-channel (a stack is [Z, H, W])"
        )
    return arr


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (hidden files ignored)."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_slices(folder: Path) -> np.ndarray:
    """Stack a folder of 2D slices (sorted by file name) into ``[Z, H, W]``."""
    files = list_images(folder)
    if not files:
        raise ValueError(f"folder {folder} holds no image slices ({', '.join(IMAGE_SUFFIXES)})")
    first = read_array(files[0])
    return np.stack([first, *(check_slice(files, z, read_array(files[z]), first.shape) for z in range(1, len(files)))])


def check_slice(files: list[Path], z: int, arr: np.ndarray, first_shape: tuple[int, ...]) -> np.ndarray:
    """Slice ``z`` of a slice folder, refused naming both files when its size is not the first slice's."""
    if arr.shape != first_shape:
        raise ValueError(
            f"slice {files[z]} is {'x'.join(map(str, arr.shape))} but the first slice {files[0].name} is "
            f"{'x'.join(map(str, first_shape))}; every slice of a folder stack must have one size (crop or pad "
            f"{files[z].name}, or move it out)"
        )
    return arr


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGB", "RGBA"):
            arr = np.asarray(im.convert("RGB"))
            if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
                raise ValueError(f"{path} is a colour image; EM images and label images must be single-channel")
            return arr[..., 0].copy()
        return np.asarray(im)


def _read_h5(path: Path, inner: str | None) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        if inner is None:
            names = [k for k in f if isinstance(f[k], h5py.Dataset)]
            if len(names) != 1:
                raise ValueError(f"{path} holds datasets {names}; name one as {path}:<dataset>")
            inner = names[0]
        if inner not in f:
            raise ValueError(f"{path} has no dataset {inner!r}; datasets: {list(f)}")
        return np.asarray(f[inner])


def _looks_like_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in (".zarray", ".zgroup", "zarr.json"))


def _read_zarr(path: Path, inner: str | None) -> np.ndarray:
    import zarr

    node = zarr.open(str(path), mode="r")
    if inner:
        node = node[inner]
    if not hasattr(node, "shape"):
        raise ValueError(f"{path} is a zarr group; name an array as {path}:<array>")
    return np.asarray(node[...])


def file_sha256(path: Path) -> str:
    """Checksum of a file, or of a folder's files (name + content, sorted) for slice folders and zarr."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            h.update(bytes.fromhex(file_sha256(p)))
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
