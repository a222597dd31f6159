"""One normalisation: shard builder + loader and prediction turn the same raw pixels into the same floats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hierseg.data import shards
from hierseg.data.loader import decode_sample, iter_raw_samples, resolve_shards
from hierseg.data.normalize import IntensitySummary, normalize, resolve
from hierseg.spec import NormalizationSpec

DTYPES = [np.uint8, np.uint16, np.int16, np.float32]


def _volume(dtype) -> np.ndarray:
    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind == "f":
        return rng.normal(-3.0, 40.0, (4, 70, 90)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (4, 70, 90), endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_builder_loader_and_predict_agree_with_the_formula(tmp_path: Path, dtype) -> None:
    """Stored tiles decoded by the loader equal predict's normalisation of the whole slice, and the z-score formula."""
    vol = _volume(dtype)
    np.save(tmp_path / "img.npy", vol)
    np.save(tmp_path / "lab.npy", np.zeros(vol.shape, np.uint8))
    argv = ["--stack", "--images", str(tmp_path / "img.npy"), "--labels", str(tmp_path / "lab.npy"),
            "--out", str(tmp_path / "s"), "--tile-size", "40", "--slabs", "train=0:2,val=3:4"]  # fmt: skip
    assert shards.main(argv) == 0
    norm = {"mode": "zscore"}
    seen = 0
    for url in resolve_shards(str(tmp_path / "s" / "train")):
        for raw in iter_raw_samples(url):
            meta = json.loads(raw["json"])
            z, y, x = meta["slice"], meta["y"], meta["x"]
            stored = np.load(io.BytesIO(raw["image.npy"]))
            assert stored.dtype == np.dtype(dtype)  # raw values kept: no pre-scaling in the shards
            tile, _ = decode_sample(raw, norm, 12)
            h, w = tile.shape[1:]
            whole = normalize(vol[z], norm)  # what hierseg predict computes for the whole slice
            np.testing.assert_array_equal(tile.numpy()[0], whole[y : y + h, x : x + w])
            ref = vol[z].astype(np.float64)
            expected = (ref[y : y + h, x : x + w] - ref.mean()) / ref.std()
            np.testing.assert_allclose(tile.numpy()[0], expected, rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == 2 * 2 * 3  # 2 slices x near-equal tiles of at most 40: 70 -> 2 rows, 90 -> 3 columns
    manifest = json.loads((tmp_path / "s" / "train" / "manifest.json").read_text())
    assert manifest["intensity"]["dtype"] == np.dtype(dtype).name


@pytest.mark.parametrize("stored_stats", [True, False], ids=["stats", "no-stats"])
def test_a_training_crop_is_normalised_with_the_whole_slice_statistics(tmp_path: Path, stored_stats: bool) -> None:
    """The loader converts only its crop, yet with the whole slice's mean/std (stored, or of the whole slice when an
    old shard has none): the z-score formula over the whole slice, at the crop's place; padding 0 and uncertain."""
    from hierseg.data.loader import crop_window, finish_crop, read_sample

    vol = _volume(np.uint16)
    np.save(tmp_path / "img.npy", vol)
    np.save(tmp_path / "lab.npy", np.ones(vol.shape, np.uint8))
    argv = ["--stack", "--images", str(tmp_path / "img.npy"), "--labels", str(tmp_path / "lab.npy"),
            "--out", str(tmp_path / "s"), "--slabs", "train=0:2,val=3:4"]  # fmt: skip
    assert shards.main(argv) == 0
    raw = next(iter_raw_samples(resolve_shards(str(tmp_path / "s" / "train"))[0]))
    z = json.loads(raw["json"])["slice"]
    if not stored_stats:
        raw = {**raw, "json": json.dumps({k: v for k, v in json.loads(raw["json"]).items() if k != "stats"})}
    ref = vol[z].astype(np.float64)
    expected = (ref - ref.mean()) / ref.std()
    sample = read_sample(raw, {"mode": "zscore"})
    for seed in range(4):
        window = crop_window(sample.label, 48, torch.Generator().manual_seed(seed))
        (ys, xs), _ = window
        crop, label = finish_crop(sample, window, {"mode": "zscore"}, 12)
        np.testing.assert_allclose(crop.numpy()[0], expected[ys, xs], rtol=1e-5, atol=1e-5)
        assert label.dtype == torch.int16 and bool((label == 1).all())
    window = crop_window(sample.label, 80, torch.Generator())  # taller than the 70-pixel slice: padded after
    crop, label = finish_crop(sample, window, {"mode": "zscore"}, 12)
    assert crop.shape == (1, 80, 80) and bool((crop[0, 70:] == 0).all()) and bool((label[70:] == -1).all())
    np.testing.assert_allclose(crop.numpy()[0, :70, :80], expected[:, window[0][1]], rtol=1e-5, atol=1e-5)


def test_percentile_and_range_modes_resolve_to_fixed_numbers() -> None:
    """Dataset percentiles are exact for 16-bit integers; range defaults to the dtype's full range."""
    vol = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    summary = IntensitySummary()
    summary.add(vol)
    record = summary.record()
    assert record["percentiles"]["1.0"] == pytest.approx(np.percentile(vol, 1, method="inverted_cdf"))
    assert record["percentiles"]["99.0"] == pytest.approx(np.percentile(vol, 99, method="inverted_cdf"))
    norm = resolve(NormalizationSpec(mode="percentile", percentiles=(1.0, 99.0)), record)
    assert norm["mode"] == "affine" and (norm["lo"], norm["hi"]) == (9.0, 989.0)
    assert resolve(NormalizationSpec(mode="range"), {"dtype": "int16"})["lo"] == -32768.0
    with pytest.raises(ValueError, match="data.normalization.range is needed"):
        resolve(NormalizationSpec(mode="range"), {"dtype": "float32"})
    x = normalize(np.array([9, 989], np.uint16), norm)
    np.testing.assert_allclose(x, [0.0, 1.0])


def test_bad_normalization_specs_name_the_field() -> None:
    from hierseg.spec import SpecError, validate_spec

    base = {"data": {"train": "a", "val": "b", "batch_size": 2}, "run": {"max_steps": 1, "num_workers": 1}}
    for norm, match in (({"percentiles": [99, 1]}, "percentiles"), ({"mode": "clip"}, "mode"),
                        ({"range": [5, 5]}, "range")):  # fmt: skip
        with pytest.raises(SpecError, match=rf"data\.normalization.*{match}"):
            validate_spec({**base, "data": {**base["data"], "normalization": norm}})
