"""The one volume reader (:mod:`hierseg.data.io`): every format reads the same in the shard builder, ``hierseg
evaluate`` and ``hierseg predict`` (single-process and ``--ray``) as in the format's own library, and a bad input
is the same one-line error naming the file in all of them. Real files, small arrays, CPU only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SHAPE = (3, 40, 48)


def _vol() -> np.ndarray:
    """Values 0..11: label images in the default label map's space, so one file serves as image and labels."""
    return np.random.default_rng(0).integers(0, 12, SHAPE).astype(np.uint8)


def _write_all(root: Path) -> dict[str, tuple[str, Callable[[], np.ndarray]]]:
    """name -> (input spec, the library's own eager read of it) for every accepted format."""
    import h5py
    import tifffile
    import zarr
    from ome_zarr.writer import write_image
    from PIL import Image

    vol = _vol()
    Image.fromarray(vol[0]).save(root / "a.png")
    tifffile.imwrite(root / "a.tif", vol[0])
    tifffile.imwrite(root / "stack.tif", vol)
    (root / "slices").mkdir()
    for z in range(SHAPE[0]):
        Image.fromarray(vol[z]).save(root / "slices" / f"s{z:02d}.png")
    with h5py.File(root / "vol.h5", "w") as f:
        f.create_dataset("em/raw", data=vol, chunks=(1, 16, 16))
    zarr.create_array(store=str(root / "vol.zarr"), data=vol, chunks=(1, 16, 16))
    write_image(vol, zarr.open_group(str(root / "vol.ome.zarr"), mode="w"), scale_factors=(2,), axes="zyx")
    np.save(root / "vol.npy", vol)

    def ome() -> np.ndarray:
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

        return np.asarray(next(iter(Reader(parse_url(str(root / "vol.ome.zarr")))())).data[0])

    return {
        "png": (str(root / "a.png"), lambda: np.asarray(Image.open(root / "a.png"))),
        "tiff": (str(root / "a.tif"), lambda: tifffile.imread(root / "a.tif")),
        "multipage_tiff": (str(root / "stack.tif"), lambda: tifffile.imread(root / "stack.tif")),
        "png_folder": (str(root / "slices"), lambda: np.stack([np.asarray(Image.open(p))
                                                               for p in sorted((root / "slices").iterdir())])),
        "h5": (f"{root / 'vol.h5'}:em/raw", lambda: h5py.File(root / "vol.h5", "r")["em/raw"][...]),
        "zarr": (str(root / "vol.zarr"), lambda: zarr.open_array(str(root / "vol.zarr"), mode="r")[...]),
        "ome_zarr": (str(root / "vol.ome.zarr"), ome),
        "npy": (str(root / "vol.npy"), lambda: np.load(root / "vol.npy")),
    }  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[str, Callable[[], np.ndarray]]]:
    return _write_all(tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A real (untrained) 2D model's checkpoint folder: the CLIs load it before or after reading the input."""
    from tests.train_utils import untrained_checkpoint

    return str(untrained_checkpoint(tmp_path_factory.mktemp("m") / "model", 0))


@pytest.fixture(scope="module")
def predictor(checkpoint):
    """That model with the identity normalisation, so evaluate's batches are the raw values."""
    from hierseg.serve.infer import load_predictor

    predictor = load_predictor(checkpoint)
    predictor.normalization = {"mode": "affine", "lo": 0.0, "hi": 1.0}
    return predictor


FORMATS = ("png", "tiff", "multipage_tiff", "png_folder", "h5", "zarr", "ome_zarr", "npy")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_entry_point_reads_what_the_library_reads(files, predictor, fmt) -> None:
    """Shard builder, evaluate, predict and predict --ray give the library's own array for each format."""
    from hierseg.data.io import read_array
    from hierseg.data.labelmap import LabelMap
    from hierseg.data.shards import Source, load_pair
    from hierseg.serve.evaluate import volume_batches
    from hierseg.serve.infer import slice_input
    from hierseg.serve.stackio import open_input

    spec, library_read = files[fmt]
    want = np.asarray(library_read())
    want3 = want[None] if want.ndim == 2 else want
    np.testing.assert_array_equal(want3, _vol()[: len(want3)])  # the files hold what was written
    got = read_array(spec)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    image, label, _ = load_pair(Source("s", spec, spec, "s"), LabelMap.default(), 0)  # the shard builder
    np.testing.assert_array_equal(image, want3)
    np.testing.assert_array_equal(label, want3.astype(np.int64))  # 0..11: the default map is the identity
    batches = list(volume_batches(spec, spec, LabelMap.default(), predictor))  # hierseg evaluate
    np.testing.assert_array_equal(np.concatenate([x[:, 0].numpy() for x, _ in batches]), want3.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), want3)
    stack = open_input(spec)  # hierseg predict: whole slices (2D), z slabs (3D), parts of slices (--ray)
    try:
        assert stack.shape == want3.shape and stack.is_2d == (want.ndim == 2)
        np.testing.assert_array_equal(np.stack([slice_input(stack, z, 0) for z in range(len(stack))]), want3)
        np.testing.assert_array_equal(stack[0 : len(stack)], want3)
        np.testing.assert_array_equal(stack.read(slice(0, 2), slice(5, 30), slice(7, 41)), want3[0:2, 5:30, 7:41])
        np.testing.assert_array_equal(stack.read(len(stack) - 1, slice(3, 9), slice(40, 48)), want3[-1, 3:9, 40:48])
    finally:
        stack.close()


def test_ome_zarr_level_and_voxel_size(files) -> None:
    """An OME-Zarr image reads at full resolution; ``:<level>`` reads the level the library wrote, with its scale."""
    import zarr

    from hierseg.data.io import open_input, read_array

    spec = files["ome_zarr"][0]
    levels = zarr.open_group(spec, mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    for level in levels:
        stack = open_input(f"{spec}:{level['path']}")
        assert stack.voxel_size is not None
        assert list(stack.voxel_size.scale) == level["coordinateTransformations"][0]["scale"]
        np.testing.assert_array_equal(read_array(f"{spec}:{level['path']}"),
                                      zarr.open_array(f"{spec}/{level['path']}", mode="r")[...])  # fmt: skip
    assert open_input(spec).voxel_size == open_input(f"{spec}:{levels[0]['path']}").voxel_size


def test_grey_saved_in_colour_reads_as_grey(tmp_path) -> None:
    """An RGB(A) PNG or TIFF with equal channels is the grey image it shows (as the shard builder always read it)."""
    import tifffile
    from PIL import Image

    from hierseg.data.io import read_array

    grey = _vol()[0] * 20
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1)).save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([grey] * 3, -1), photometric="rgb")
    for name in ("rgb.png", "rgba.png", "rgb.tif"):
        np.testing.assert_array_equal(read_array(tmp_path / name), grey, err_msg=name)


def _bad_inputs(root: Path) -> dict[str, Path]:
    """A true-colour PNG and TIFF, and files cut short (PNG, TIFF, .npy, HDF5), each with a good twin to pair."""
    import h5py
    import tifffile
    from PIL import Image

    vol = _vol()
    colour = np.stack([vol[0], vol[0] * 2, vol[0] * 3], -1)
    Image.fromarray(colour).save(root / "colour.png")
    tifffile.imwrite(root / "colour.tif", colour, photometric="rgb")
    Image.fromarray(vol[0]).save(root / "cut.png")
    tifffile.imwrite(root / "cut.tif", vol[0])
    np.save(root / "cut.npy", vol)
    with h5py.File(root / "cut.h5", "w") as f:
        f.create_dataset("raw", data=vol)
    for name in ("cut.png", "cut.tif", "cut.npy", "cut.h5"):
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    return {p.stem + p.suffix: p for p in root.iterdir()}


def _message(err: str, prefix: str) -> str:
    """The error line a CLI printed, without its ``hierseg <command>:`` prefix."""
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0].removeprefix(prefix)


@pytest.mark.parametrize("name", ["colour.png", "colour.tif", "cut.png", "cut.tif", "cut.npy", "cut.h5"])
def test_bad_input_is_one_error_everywhere(tmp_path, checkpoint, capsys, name) -> None:
    """A colour or truncated file: make-shards, evaluate, predict and predict --ray print one line, the same one,
    naming the file (and, for colour, how to fix it)."""
    from hierseg.data import shards
    from hierseg.data.io import IMAGE_SUFFIXES
    from hierseg.serve import evaluate, infer

    bad = _bad_inputs(tmp_path)[name]
    for folder in ("img", "lab"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(bad.read_bytes())
    spec, out = str(tmp_path / "img" / name), ["--out", str(tmp_path / "o")]
    assert shards.main(["--images", spec, "--labels", spec, "--stack", *out]) == 2
    messages = {"make-shards --stack": _message(capsys.readouterr().err, "hierseg make-shards: error: ")}
    if bad.suffix in IMAGE_SUFFIXES:  # a folder pair: each image read whole
        pairs = ["--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--val-frac", "0"]
        assert shards.main([*pairs, *out]) == 2
        messages["make-shards"] = _message(capsys.readouterr().err, "hierseg make-shards: error: ")
    assert evaluate.main(["--model", checkpoint, "--image", spec, "--labels", spec]) == 2
    messages["evaluate"] = _message(capsys.readouterr().err, "hierseg evaluate: ")
    assert infer.main(["--model", checkpoint, "--input", spec, "--output", str(tmp_path / "p")]) == 2
    messages["predict"] = _message(capsys.readouterr().err, "hierseg predict: ")
    ray = ["--ray", "--block", "2,32,32", "--output", str(tmp_path / "p.zarr")]
    assert infer.main(["--model", checkpoint, "--input", spec, *ray]) == 2
    messages["predict --ray"] = _message(capsys.readouterr().err, "hierseg predict: ")
    assert len(set(messages.values())) == 1, messages
    message = messages["predict"]
    assert spec in message, message
    assert ("colour" in message and "greyscale" in message) if "colour" in name else "truncated" in message


def test_colour_npy_is_refused_whatever_its_values(tmp_path) -> None:
    """A raw (H, W, 3) array says nothing about colour: refused even when grey, naming the file and the fix."""
    from hierseg.data.io import StackError, read_array
    from hierseg.serve import stackio

    assert stackio.StackError is StackError and issubclass(StackError, ValueError)
    np.save(tmp_path / "rgb.npy", np.zeros((40, 48, 3), np.uint8))
    with pytest.raises(StackError, match=r"rgb\.npy has shape \(40, 48, 3\), a colour image.*a\[\.\.\., 0\]"):
        read_array(tmp_path / "rgb.npy")
