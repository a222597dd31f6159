"""The one volume reader: the shard builder, ``hierseg evaluate`` and ``hierseg predict`` (``--ray`` too) read here.

:func:`open_input` gives a lazy :class:`SliceStack` ``[Z, H, W]`` (a 2D image is a stack of one with ``is_2d``):
``stack[z]``, slabs ``stack[z0:z1]`` and parts ``stack.read(z, ys, xs)`` read only the slices or chunks they
touch, so a 200 GB stack never loads whole. :func:`read_array` is the eager convenience (the whole array, a 2D
image as ``[H, W]``) for labelled volumes. Everything goes through well-kept libraries (Pillow, tifffile, h5py,
zarr, ome-zarr, numpy), and every failure is a :class:`StackError` (a ``ValueError``) naming the file and the fix,
so a user with 400 volumes knows which one is bad and what to do about it.

Accepted sources:
- 2D image files ``.png``, ``.jpg``, ``.tif``/``.tiff``; a multi-page TIFF is a stack (read page by page)
- a folder of 2D slices (sorted by name) -> stack
- HDF5 ``file.h5:dataset/path``; zarr ``store.zarr`` or ``store.zarr:array/path``; an OME-Zarr image (its full
  resolution, or the level named after ``:``, with its voxel size); ``.npy`` (memory-mapped)

Colour: EM images and labels are single-channel. An image file decoded in colour (RGB/RGBA PNG, JPEG, TIFF)
whose channels are all equal is a grey image saved in colour and reads as that grey image; any other colour
image is refused. A raw array (``.npy``, HDF5, zarr) of shape ``(H, W, 3|4)`` is refused whatever its values:
nothing says it is colour rather than H slices 3 pixels wide, and read as a stack it would be garbage for minutes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy")
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_GREY_HOW = ("save it as greyscale (e.g. Pillow: Image.open(f).convert('L').save(g), or "
             "ImageMagick: magick f -colorspace Gray g)")  # fmt: skip


class StackError(ValueError):
    """A bad input (or, from :mod:`hierseg.serve.stackio`, output location); the message names it and the fix."""


@dataclass(frozen=True)
class VoxelSize:
    """Physical size of one voxel along z, y, x (``[Y, X]`` for a 2D image), with each axis's NGFF unit."""

    scale: tuple[float, ...]
    units: tuple[str | None, ...]

    def record(self) -> dict[str, list[Any]]:
        return {"scale": list(self.scale), "units": list(self.units)}


class SliceStack:
    """``[Z, H, W]`` view over a lazily indexed source (``get(z) -> [H, W]``)."""

    def __init__(self, shape: tuple[int, ...], get: Any, name: str, is_2d: bool = False, closer: Any = None,
                 crop: Any = None):  # fmt: skip
        self.shape, self._get, self.name, self.is_2d, self._closer = shape, get, name, is_2d, closer
        self._crop = crop  # (z, ys, xs) -> part of a slice, for formats that read parts (zarr, HDF5, .npy)
        self.voxel_size: VoxelSize | None = None  # known for OME-Zarr images (their scale)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, z: int | slice) -> np.ndarray:
        """Slice ``z`` ``[H, W]``, or the slices ``z0:z1`` stacked (a 3D model reads z slabs)."""
        if isinstance(z, slice):
            return self.read(z, slice(None), slice(None))
        try:
            return np.asarray(self._get(z))
        except StackError:
            raise
        except Exception as e:
            raise StackError(f"cannot read slice {z} of {self.name} (unreadable or truncated file?): "
                             f"{_brief(e)}") from None  # fmt: skip

    def read(self, z: int | slice, ys: slice, xs: slice) -> np.ndarray:
        """Pixels ``[ys, xs]`` of slice ``z``, or of the slices ``z`` (a slice) stacked ``[d, ...]``; chunked
        formats read only the chunks they touch."""
        if self._crop is None:
            if isinstance(z, slice):
                return np.stack([self[i][..., ys, xs] for i in range(*z.indices(len(self)))])
            return self[z][..., ys, xs]
        try:
            return np.asarray(self._crop(z, ys, xs))
        except Exception as e:
            where = f"slice {z}" if isinstance(z, int) else f"slices {z.start}:{z.stop}"
            raise StackError(f"cannot read {where} of {self.name} (unreadable or truncated file?): "
                             f"{_brief(e)}") from None  # fmt: skip

    def close(self) -> None:
        if self._closer is not None:
            self._closer()


def split_source(spec: str) -> tuple[Path, str | None]:
    """``file.h5:data/raw`` -> (Path('file.h5'), 'data/raw'); plain paths have no inner key."""
    for marker in (*H5_SUFFIXES, ".zarr"):
        idx = spec.find(marker + ":")
        if idx >= 0:
            return Path(spec[: idx + len(marker)]), spec[idx + len(marker) + 1 :]
    return Path(spec), None


def open_input(spec: str | Path) -> SliceStack:
    """A 2D image, a folder of slices, a (multi-page) TIFF, ``file.h5:dataset``, zarr, OME-Zarr or ``.npy``, lazily.

    Every problem is a one-line :class:`StackError` naming the file (the same for every caller).
    """
    spec = str(spec)
    path, inner = split_source(spec)
    if not path.exists():
        raise StackError(f"input {path} does not exist; check the path")
    try:
        return _open(path, inner, spec)
    except StackError:
        raise
    except Exception as e:  # library errors differ per format; the file name is what users need
        raise StackError(f"cannot read {spec} (unreadable or truncated file?): {_brief(e)}") from None


def read_array(spec: str | Path) -> np.ndarray:
    """The whole of :func:`open_input`'s stack in memory: ``[Z, H, W]``, a 2D image as ``[H, W]``."""
    stack = open_input(spec)
    try:
        arr = stack[0 : len(stack)]
    finally:
        stack.close()
    if not arr.flags.owndata:  # a view of a .npy memory map: the array must not hold the file open
        arr = arr.copy()
    return arr[0] if stack.is_2d else arr


def _open(path: Path, inner: str | None, spec: str) -> SliceStack:
    """Dispatch on the format; :func:`open_input` turns library errors into one-line errors naming ``spec``."""
    if path.suffix.lower() in H5_SUFFIXES:
        return _open_h5(path, inner)
    if path.suffix == ".zarr" or _looks_like_zarr(path):
        return _open_zarr(path, inner, spec)
    if path.is_dir():
        return _slice_folder(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return _open_tiff(path)
    if path.suffix.lower() == ".npy":
        return _from_array(np.load(path, mmap_mode="r", allow_pickle=False), str(path))
    return _from_array(_read_pil(path), str(path))


def _brief(e: BaseException) -> str:
    """``Type: message`` on one line (some libraries' messages span lines)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def check_not_colour(arr: Any, name: str) -> Any:
    """Refuse a raw ``(H, W, 3|4)`` array: read as a stack it would be H slices of garbage, for minutes."""
    shape = tuple(arr.shape)
    if len(shape) == 3 and shape[-1] in (3, 4) and shape[0] > 4 and shape[1] > 4:
        raise StackError(f"{name} has shape {shape}, a colour image (H, W, {shape[-1]}); EM images and labels "
                         "must be single-channel [H, W] (a stack is [Z, H, W]): save one channel, e.g. "
                         "np.save(g, a[..., 0])")  # fmt: skip
    return arr


def _grey(arr: np.ndarray, name: str) -> np.ndarray:
    """An image decoded in colour ``(H, W, 3|4)``: its grey image when R == G == B (alpha ignored), else refused."""
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        return arr
    rgb = arr[..., :3]
    if not (rgb == rgb[..., :1]).all():
        raise StackError(f"{name} is a colour image ({arr.shape[-1]} channels that differ); EM images and labels "
                         f"are single-channel: {_GREY_HOW}")  # fmt: skip
    return np.ascontiguousarray(arr[..., 0])


def _from_array(arr: Any, name: str) -> SliceStack:
    """A stack over an in-memory or lazily indexed array (h5py/zarr/memmap): only what is asked is read."""
    check_not_colour(arr, name)
    if arr.ndim == 2:
        return SliceStack((1, *arr.shape), lambda z: arr[...], name, is_2d=True)
    if arr.ndim == 3:
        return SliceStack(tuple(arr.shape), lambda z: arr[z], name, crop=lambda z, ys, xs: arr[z, ys, xs])
    raise StackError(f"{name} has shape {tuple(arr.shape)}; expected a 2D image [H, W] or a stack [Z, H, W] "
                     "(give one channel and time point as its own array)")  # fmt: skip


def _read_pil(path: Path) -> np.ndarray:
    """A PNG/JPEG (or any other image Pillow decodes) as ``[H, W]``; palette images keep their indices (labels)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("LA", "PA"):  # grey or palette plus alpha: the alpha is no part of the image
            im = im.getchannel(0)
        elif len(im.getbands()) > 1:
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        return _grey(np.asarray(im), str(path))


def _open_tiff(path: Path) -> SliceStack:
    """A 2D TIFF reads whole; a stack of one page per slice reads page by page (what tifffile assembles otherwise)."""
    import tifffile

    tif = tifffile.TiffFile(path)
    try:
        series, name = tif.series[0], str(path)
        axes, shape = series.axes, tuple(series.shape)
        if len(tif.pages) > 1 and len(tif.pages) == shape[0] and len(shape) == 3 + axes.endswith("S"):

            def page(z: int) -> np.ndarray:
                return _grey(tif.pages[z].asarray(), f"{name} page {z}")

            return SliceStack((shape[0], *shape[1:3]), page, name, closer=tif.close)
        data = series.asarray()
    except BaseException:
        tif.close()
        raise
    tif.close()
    if axes.endswith("S"):  # colour samples per pixel; planar "SYX" stays a stack, as tifffile writes 3-slice ones
        data = _grey(data, name)
    return _from_array(data, name)


def _open_h5(path: Path, inner: str | None) -> SliceStack:
    import h5py

    f = h5py.File(path, "r")
    try:
        if inner is None:
            names = [k for k in f if isinstance(f[k], h5py.Dataset)]
            if len(names) != 1:
                raise StackError(f"{path} holds datasets {names}; name one as {path}:<dataset>")
            inner = names[0]
        if inner not in f or not isinstance(f[inner], h5py.Dataset):
            raise StackError(f"{path} has no dataset {inner!r}; name one as {path}:<dataset> (datasets: {list(f)})")
        stack = _from_array(f[inner], f"{path}:{inner}")
    except BaseException:
        f.close()
        raise
    stack._closer = f.close
    return stack


def _looks_like_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in (".zarray", ".zgroup", "zarr.json"))


def _open_zarr(path: Path, inner: str | None, spec: str) -> SliceStack:
    """A zarr array; an OME-Zarr image (group or level) reads at full resolution and knows its voxel size."""
    import zarr

    image = find_image(path, inner)
    inner, voxel = image if image else (inner, None)
    node = zarr.open(str(path), mode="r")
    node = node[inner] if inner else node
    if not hasattr(node, "shape"):
        raise StackError(f"{path} is a zarr group; name an array as {path}:<array>")
    stack = _from_array(node, spec)
    stack.voxel_size = voxel
    return stack


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (hidden files ignored)."""
    if not folder.is_dir():
        raise StackError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _slice_folder(path: Path) -> SliceStack:
    """A folder of 2D slices; a slice whose size is not the first's is refused by name when it is reached."""
    files = list_images(path)
    if not files:
        raise StackError(f"folder {path} holds no image slices ({', '.join(IMAGE_SUFFIXES)})")
    first = _read_slice(files[0])
    return SliceStack((len(files), *first.shape), lambda z: check_slice(files, z, _read_slice(files[z]), first.shape),
                      str(path))  # fmt: skip


def _read_slice(file: Path) -> np.ndarray:
    """One slice file of a folder stack, through :func:`open_input` (its errors name the file)."""
    stack = open_input(file)
    try:
        if not stack.is_2d:
            raise StackError(f"slice {file} is a stack of shape {stack.shape}; the files of a folder stack must be "
                             "2D images (give the stack itself as the input, or split it into slices)")  # fmt: skip
        return stack[0]
    finally:
        stack.close()


def check_slice(files: list[Path], z: int, arr: np.ndarray, first_shape: tuple[int, ...]) -> np.ndarray:
    """Slice ``z`` of a slice folder, refused naming both files when its size is not the first slice's."""
    if arr.shape != first_shape:
        raise StackError(
            f"slice {files[z]} is {'x'.join(map(str, arr.shape))} but the first slice {files[0].name} is "
            f"{'x'.join(map(str, first_shape))}; every slice of a folder stack must have one size (crop or pad "
            f"{files[z].name}, or move it out)"
        )
    return arr


# ------------------------------------------------------------------------------------------ OME-Zarr input
def find_image(path: Path, inner: str | None) -> tuple[str, VoxelSize] | None:
    """An OME-Zarr image at ``path[:inner]``: (the array to read, its voxel size); None for anything else.

    ``inner`` may name the image group (its full resolution is read), one of its levels, or be absent.
    (Writing OME-Zarr outputs is :mod:`hierseg.serve.omezarr`'s.)
    """
    parts = [p for p in (inner or "").split("/") if p]
    for group_parts, level in ((parts, None), (parts[:-1], parts[-1] if parts else None)):
        found = _image_level(path.joinpath(*group_parts), level)
        if found is not None:
            array, voxel = found
            return "/".join([*group_parts, array]), voxel
    return None


def _image_level(group: Path, level: str | None) -> tuple[str, VoxelSize] | None:
    """Level ``level`` (default: the first, full resolution) of the multiscales image at ``group``, if it is one."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Node

    loc = _quietly(parse_url, str(group)) if group.is_dir() else None
    if loc is None or not Multiscales.matches(loc):
        return None
    node = Node(loc, [])
    spec = next(s for s in node.specs if isinstance(s, Multiscales))
    index = 0 if level is None else spec.datasets.index(level) if level in spec.datasets else None
    if index is None:
        return None
    axes = node.metadata["axes"]
    names = "".join(str(a["name"]) for a in axes)
    if names not in ("zyx", "yx"):
        raise StackError(f"{group} is an OME-Zarr image with axes {','.join(names)}; hierseg reads a [Z, Y, X] or "
                         f"[Y, X] image: give one channel and time point as its own array")  # fmt: skip
    scale = [1.0] * len(axes)
    transforms = (node.metadata.get("coordinateTransformations") or [None] * (index + 1))[index] or []
    whole = loc.root_attrs["multiscales"][0].get("coordinateTransformations") or []  # applies to every level
    for t in [*transforms, *whole]:
        if t.get("type") == "scale":
            scale = [a * float(b) for a, b in zip(scale, t["scale"])]
    return spec.datasets[index], VoxelSize(tuple(scale), tuple(a.get("unit") for a in axes))


def _quietly(func: Any, *args: Any) -> Any:
    """``func(*args)`` with ome-zarr's io logger at ERROR: it warns "version mismatch" on every NGFF 0.4
    (zarr v2) image it is asked to open, which is no problem here."""
    import logging

    logger = logging.getLogger("ome_zarr.io")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return func(*args)
    finally:
        logger.setLevel(level)


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
