"""Prediction's output sinks, which write slice by slice so stacks larger than RAM never load whole; the inputs
are :mod:`hierseg.data.io`'s one lazy reader (re-exported here: ``open_input``, ``SliceStack``, ``StackError``).

Each output accepts one slice at a time and writes it straight to disk (TIFF pages, ``.npy`` memory maps,
chunked zarr/HDF5 datasets).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hierseg.data.io import H5_SUFFIXES, SliceStack, StackError, open_input, split_source
from hierseg.fsutil import check_folder_path

if TYPE_CHECKING:
    from hierseg.data.io import VoxelSize

__all__ = ["SliceStack", "StackError", "check_not_input", "open_input", "open_output"]


# -------------------------------------------------------------------------------------------- outputs
OUR_NAMES = ("fine_labels", "fine_confidence", "coarse_prob", "fallback", "label_values", "block_done")
"""Every array prediction may write (``block_done``: ``--ray``'s finished blocks); ``--overwrite`` replaces these
and nothing else."""


def _layouts(shape: tuple[int, ...], k: int, is_2d: bool, label_values: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    z, h, w = shape[0], shape[-2], shape[-1]
    plane = (h, w) if is_2d else (z, h, w)
    layouts = {
        "fine_labels": (plane, "uint8"),
        "fine_confidence": (plane, "float16"),
        "coarse_prob": ((k, *plane), "float16"),
        "fallback": (plane, "uint8"),
    }
    if label_values:
        layouts["label_values"] = (plane, "int32")
    return layouts


class _ArraySink:
    """Writes slices into array-likes (zarr/HDF5 datasets or ``.npy`` memory maps) of full shape.

    The arrays are temporaries: ``commit()`` puts them in place of the outputs (replacing hierseg's own earlier
    ones), ``abort()`` removes them. Why: a prediction that stops half-way (a bad slice, Ctrl-C) must leave
    neither half-written outputs nor, with ``--overwrite``, a previous result destroyed for nothing.
    """

    def __init__(self, arrays: dict[str, Any], is_2d: bool, publish: Any, discard: Any):
        self.arrays, self.is_2d, self._publish, self._discard = arrays, is_2d, publish, discard

    def write(self, z: int, out: dict[str, np.ndarray]) -> None:
        for name, arr in self.arrays.items():
            if self.is_2d:
                arr[...] = out[name]
            elif name == "coarse_prob":
                arr[:, z] = out[name]
            else:
                arr[z] = out[name]

    def close(self) -> None:
        for arr in self.arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()

    def commit(self) -> None:
        self.close()
        self._publish()

    def abort(self) -> None:
        self.close()
        self._discard()


class _FolderSink(_ArraySink):
    """``<folder>/<name>.tif`` (pages written as they come) plus ``coarse_prob.npy`` ``[K, ...]``."""

    def __init__(self, files: dict[str, Path], layouts: dict[str, tuple[tuple[int, ...], str]], is_2d: bool,
                 publish: Any, discard: Any):  # fmt: skip
        import tifffile

        shape, dtype = layouts["coarse_prob"]
        mm = np.lib.format.open_memmap(files["coarse_prob"], mode="w+", dtype=dtype, shape=shape)
        super().__init__({"coarse_prob": mm}, is_2d, publish, discard)
        self.tiffs = {n: tifffile.TiffWriter(files[n]) for n in layouts if n != "coarse_prob"}

    def write(self, z: int, out: dict[str, np.ndarray]) -> None:
        super().write(z, out)
        for name, tw in self.tiffs.items():
            tw.write(out[name], contiguous=True)

    def close(self) -> None:
        super().close()
        for tw in self.tiffs.values():
            tw.close()


def _folder_file(name: str) -> str:
    return f"{name}.npy" if name == "coarse_prob" else f"{name}.tif"


def _our_folder_files(path: Path) -> list[Path]:
    names = {_folder_file(n) for n in OUR_NAMES}
    return [p for p in path.iterdir() if p.name in names] if path.is_dir() else []


def _check_output_path(spec: str, folder: Path) -> None:
    """A file where the output folder (or a folder above it) must go is refused, naming it."""
    try:
        check_folder_path(folder)
    except OSError as e:
        raise StackError(f"--output {spec}: {e.strerror}; give a folder, out.zarr or out.h5 there") from None


def _folder_sink(path: Path, layouts: dict, is_2d: bool, overwrite: bool) -> _ArraySink:
    """Only hierseg's own output files are replaced; anything else in the folder stays."""
    ours = _our_folder_files(path)
    if ours and not overwrite:
        raise StackError(f"--output {path} already holds {ours[0].name}; pass --overwrite or choose another path")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    final = {n: path / _folder_file(n) for n in layouts}
    temp = {n: f.with_name(f".{f.stem}.{os.getpid()}.tmp{f.suffix}") for n, f in final.items()}

    def publish() -> None:
        for p in ours:
            if p not in final.values():  # e.g. label_values.tif of an earlier --decode labels run
                p.unlink()
        for n, f in final.items():
            os.replace(temp[n], f)

    def discard() -> None:
        for t in temp.values():
            t.unlink(missing_ok=True)
        if created and not any(path.iterdir()):
            path.rmdir()

    try:
        return _FolderSink(temp, layouts, is_2d, publish, discard)
    except BaseException:
        discard()
        raise


def _check_zarr(path: Path, overwrite: bool) -> None:
    """A zarr store may be replaced only when it holds nothing but hierseg's arrays."""
    _check_output_path(str(path), path)
    if not path.exists():
        return
    if not overwrite:
        raise StackError(f"--output {path} already exists; pass --overwrite or choose another path")
    from hierseg.serve.omezarr import TOP_ENTRIES, is_ours

    entries = {p.name for p in path.iterdir()} - {"zarr.json", ".zgroup", ".zattrs", ".zmetadata"}
    foreign = sorted(entries - set(OUR_NAMES) - (set(TOP_ENTRIES) if is_ours(path) else set()))
    if foreign:
        raise StackError(f"--output {path} holds {foreign[:3]}, which hierseg did not write; choose another path")


def _prepare_zarr(path: Path, overwrite: bool) -> None:
    """:func:`_check_zarr`, then remove the old store (``--ray`` writes blocks into the final store itself)."""
    _check_zarr(path, overwrite)
    if path.exists():
        shutil.rmtree(path)


def check_not_input(output: str, input_spec: str) -> None:
    """Refuse an output that is, contains or lies inside the input: overwriting it would destroy the data."""
    out = split_source(output)[0].resolve()
    inp = split_source(input_spec)[0].resolve()
    if out == inp or inp.is_relative_to(out) or out.is_relative_to(inp):
        raise StackError(f"--output {output} overlaps --input {input_spec}; write the prediction somewhere else")


def _h5_sink(path: Path, group: str | None, layouts: dict, is_2d: bool, overwrite: bool) -> _ArraySink:
    """Datasets go in under temporary names and are renamed at the end; other datasets in the file stay."""
    import h5py

    created = not path.exists()
    f = h5py.File(path, "a")
    g = f.require_group(group) if group else f
    if not overwrite and (taken := [name for name in layouts if name in g]):
        f.close()
        raise StackError(f"--output {path}:{group or ''} already has {taken[0]!r}; pass --overwrite")
    temp = {name: f".{name}.{os.getpid()}.tmp" for name in layouts}
    arrays = {}
    for name, (shape, dtype) in layouts.items():
        if temp[name] in g:  # a crashed run of this process id; ours by its name
            del g[temp[name]]
        arrays[name] = g.create_dataset(
            temp[name], shape=shape, dtype=dtype, chunks=_tile_chunks(shape), compression="gzip"
        )

    def publish() -> None:
        for name, t in temp.items():
            if name in g:
                del g[name]
            g.move(t, name)
        f.close()

    def discard() -> None:
        for t in temp.values():
            if t in g:
                del g[t]
        f.close()
        if created:  # the file is this run's alone
            path.unlink()

    return _ArraySink(arrays, is_2d, publish, discard)


def create_zarr_outputs(path: Path, layouts: dict[str, tuple[tuple[int, ...], str]], chunks: Any,
                        voxel: VoxelSize | None = None,
                        group_names: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A new zarr store of the outputs ``layouts`` (``chunks(shape)`` each); an OME-Zarr layout for ``*.ome.zarr``.

    Returns the root group and name -> array; ``voxel`` and ``group_names`` go into the OME-Zarr metadata.
    """
    import zarr

    from hierseg.serve.omezarr import create_arrays, is_ome_output

    root = zarr.open_group(str(path), mode="w")
    if is_ome_output(path):
        return root, create_arrays(root, layouts, chunks, voxel, group_names)
    arrays = {name: root.create_array(name, shape=shape, dtype=dtype, chunks=chunks(shape))
              for name, (shape, dtype) in layouts.items()}  # fmt: skip
    return root, arrays


def zarr_output_arrays(root: Any) -> dict[str, Any]:
    """name -> array of the prediction outputs in a store :func:`create_zarr_outputs` made (either layout)."""
    from hierseg.serve.omezarr import MARKER_ATTR, open_arrays

    if MARKER_ATTR in root.attrs:
        return open_arrays(root)
    names = set(OUR_NAMES) - {"block_done"}
    return {name: root[name] for name in root.array_keys() if name in names}


def _tile_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of whole-volume outputs: one slice, tiles of 512."""
    return tuple([1] * (len(shape) - 2) + [min(shape[-2], 512), min(shape[-1], 512)])


def _zarr_sink(path: Path, layouts: dict, is_2d: bool, overwrite: bool, voxel: VoxelSize | None,
               group_names: tuple[str, ...]) -> _ArraySink:  # fmt: skip
    """A new store beside ``path``, swapped in at the end (its name keeps ``path``'s suffix: ``.ome.zarr`` decides
    the layout)."""
    _check_zarr(path, overwrite)
    temp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    shutil.rmtree(temp, ignore_errors=True)  # a crashed run of this process id; ours by its name
    arrays = create_zarr_outputs(temp, layouts, _tile_chunks, voxel, group_names)[1]

    def publish() -> None:
        old = path.with_name(f".old{os.getpid()}.{path.name}")
        if path.exists():  # checked by _check_zarr: hierseg's arrays only
            os.replace(path, old)
        os.replace(temp, path)
        shutil.rmtree(old, ignore_errors=True)

    return _ArraySink(arrays, is_2d, publish, lambda: shutil.rmtree(temp, ignore_errors=True))


@contextmanager
def open_output(spec: str, shape: tuple[int, ...], k: int, *, overwrite: bool = False, is_2d: bool | None = None,
                label_values: bool = False, voxel: VoxelSize | None = None,
                group_names: tuple[str, ...] = ()) -> Iterator[_ArraySink]:  # fmt: skip
    """A sink for the outputs of a ``shape`` stack (``label_values`` too when asked); ``sink.write(z, outputs)``.

    ``voxel`` and the coarse ``group_names`` are recorded in an OME-Zarr output (``*.ome.zarr``). The outputs
    appear (replacing hierseg's own earlier ones) only when the ``with`` block completes.
    """
    is_2d = bool(is_2d) if is_2d is not None else False
    layouts = _layouts(shape, k, is_2d, label_values)
    path, inner = split_source(spec)
    is_h5 = path.suffix.lower() in H5_SUFFIXES
    _check_output_path(spec, path.parent if is_h5 else path)
    try:
        if is_h5:
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = _h5_sink(path, inner, layouts, is_2d, overwrite)
        elif path.suffix == ".zarr":
            sink = _zarr_sink(path, layouts, is_2d, overwrite, voxel, group_names)
        else:
            sink = _folder_sink(path, layouts, is_2d, overwrite)
    except StackError:
        raise
    except OSError as e:
        raise StackError(f"cannot write --output {spec}: {e}") from None
    try:
        yield sink
    except BaseException:
        sink.abort()
        raise
    sink.commit()
