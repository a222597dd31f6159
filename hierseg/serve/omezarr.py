"""OME-Zarr (NGFF 0.5 on zarr v3): prediction outputs that napari and neuroglancer open, and their voxel sizes.

Asked for by an output path ending in ``.ome.zarr`` (plain ``.zarr`` stays the flat store it was). The NGFF
metadata is written by ome-zarr-py (``write_multiscales_metadata``, ``write_label_metadata``) and read back by its
reader; hierseg only creates the arrays, because ``predict --ray`` must choose their chunks (the block grid)
and let many workers fill them chunk by chunk, which the library's own ``write_image`` cannot do. Layout::

    out.ome.zarr/                 image "fine_confidence" (axes z, y, x; scale = the voxel size)
      0                           fine_confidence  float32 [Z, Y, X]
      coarse_prob/0               image "coarse_prob" (axes c, z, y, x): one channel per coarse group
      labels/                     NGFF labels: fine_labels, fallback [, label_values]
        fine_labels/0             uint8, image-label properties name every value
        fallback/0
        label_values/0            int32 (decoded into a label map's values)
      block_done                  predict --ray's finished blocks

Why float32 where the plain store has float16: neuroglancer cannot read float16 zarr arrays; the values are
the same float16 ones, widened. One resolution level only: a pyramid would need the whole volume written
before its first downsampling, and viewers open a single level fine. Reading OME-Zarr inputs (finding an image's
full resolution and voxel size) is the one reader's, :func:`hierseg.data.io.find_image`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hierseg.data.io import StackError, VoxelSize

SUFFIX = ".ome.zarr"
MARKER_ATTR = "hierseg_output"
"""Root attribute set before any array is created: the proof that ``--overwrite`` may replace this store."""
IMAGE = "fine_confidence"
LABELS = ("fine_labels", "fallback", "label_values")
PATHS = {IMAGE: "0", "coarse_prob": "coarse_prob/0", **{name: f"labels/{name}/0" for name in LABELS}}
"""Each output's array inside the store."""
TOP_ENTRIES = ("0", "coarse_prob", "labels")
"""What the layout puts at the store's top (besides ``block_done``)."""
VIEWER_DTYPES = {"float16": "float32"}


def is_ome_output(output: str | Path) -> bool:
    return str(output).rstrip("/").endswith(SUFFIX)


def parse_voxel_size(text: str) -> VoxelSize:
    """``--voxel-size Z,Y,X`` in nanometres (EM's unit) -> :class:`VoxelSize`; a ``StackError`` naming the flag."""
    try:
        scale = tuple(float(p) for p in text.split(","))
    except ValueError:
        scale = ()
    if len(scale) != 3 or min(scale) <= 0:
        raise StackError(f"--voxel-size {text}: give Z,Y,X in nanometres, three numbers > 0 (e.g. 30,4,4)")
    return VoxelSize(scale, ("nanometer",) * 3)


def output_voxel_size(flag: str | None, from_input: VoxelSize | None, output: str) -> VoxelSize | None:
    """The voxel size an output records: ``--voxel-size`` when given, else the input's (an OME-Zarr input's scale)."""
    if flag and not is_ome_output(output):
        raise StackError(f"--voxel-size is recorded in OME-Zarr outputs only; give --output ending in {SUFFIX} "
                         "or drop --voxel-size")  # fmt: skip
    return parse_voxel_size(flag) if flag else from_input


def voxel_note(output: str, voxel: VoxelSize | None) -> str:
    """What the final message adds about an OME-Zarr output's voxel size ("" for other outputs)."""
    if not is_ome_output(output):
        return ""
    if voxel is None:
        return "; OME-Zarr with voxel size 1 (unknown: pass --voxel-size Z,Y,X in nm)"
    size = ",".join(f"{v:g}" for v in voxel.scale)
    return f"; OME-Zarr, voxel size {size} {voxel.units[-1] or '(no unit)'}"


# ----------------------------------------------------------------------------------------- output
def create_arrays(root: Any, layouts: dict[str, tuple[tuple[int, ...], str]], chunks: Any,
                  voxel: VoxelSize | None, group_names: tuple[str, ...]) -> dict[str, Any]:  # fmt: skip
    """The outputs ``layouts`` (name -> shape, dtype) as NGFF images and labels in the empty group ``root``.

    ``chunks(shape)`` gives each array's chunks; returns name -> zarr array.
    """
    from ome_zarr.writer import write_label_metadata

    root.attrs[MARKER_ATTR] = "ome-zarr"
    arrays: dict[str, Any] = {}
    labels = root.create_group("labels") if any(n in layouts for n in LABELS) else None
    for name, (shape, dtype) in layouts.items():
        group = root if name == IMAGE else labels.create_group(name) if name in LABELS else root.create_group(name)
        arrays[name] = group.create_array("0", shape=shape, dtype=VIEWER_DTYPES.get(dtype, dtype),
                                          chunks=chunks(shape))  # fmt: skip
        _write_multiscales(group, name, len(shape), voxel)
        if name in LABELS:
            props = label_properties(name, group_names)
            write_label_metadata(labels, name, properties=props, source={"image": "../../"})
    return arrays


def _write_multiscales(group: Any, name: str, ndim: int, voxel: VoxelSize | None) -> None:
    """One level, path ``0``: spatial axes z, y, x (y, x for 2D), a channel axis first for ``coarse_prob``."""
    from ome_zarr.writer import write_multiscales_metadata

    spatial = ndim - 1 if name == "coarse_prob" else ndim
    scale = list(voxel.scale[-spatial:]) if voxel else [1.0] * spatial
    units = list(voxel.units[-spatial:]) if voxel else [None] * spatial
    axes: list[dict[str, str]] = [{"name": "c", "type": "channel"}] * (ndim - spatial)
    for axis, unit in zip("zyx"[-spatial:], units):
        axes.append({"name": axis, "type": "space", **({"unit": unit} if unit else {})})
    transform = [{"type": "scale", "scale": [1.0] * (ndim - spatial) + scale}]
    write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": transform}], axes=axes, name=name)


def label_properties(name: str, group_names: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """NGFF image-label properties: what each value of ``fine_labels`` / ``fallback`` means (viewers show it)."""
    from hierseg.labels import FINE_CLASSES
    from hierseg.serve.infer import FALLBACK_GROUP_OFFSET, UNDECIDED

    fine = [{"label-value": i, "class": c} for i, c in enumerate(FINE_CLASSES)]
    if name == "fine_labels":
        return fine
    if name == "fallback":
        groups = [{"label-value": FALLBACK_GROUP_OFFSET + i, "class": g} for i, g in enumerate(group_names)]
        return [*fine, *groups, {"label-value": UNDECIDED, "class": "undecided"}]
    return None


def open_arrays(root: Any) -> dict[str, Any]:
    """name -> array of the outputs present in an OME-Zarr store opened as the zarr group ``root``."""
    arrays = {}
    for name, path in PATHS.items():
        try:
            arrays[name] = root[path]
        except KeyError:
            continue
    return arrays


def is_ours(path: Path) -> bool:
    """A store hierseg laid out: the marker attribute on its root, nothing but hierseg's labels under ``labels``."""
    import zarr

    try:
        if MARKER_ATTR not in zarr.open_group(str(path), mode="r").attrs:
            return False
    except Exception:
        return False
    entries = {p.name for p in (path / "labels").iterdir()} if (path / "labels").is_dir() else set()
    return entries <= {*LABELS, "zarr.json"}
