"""Shard builder on synthetic data: manifests, splits, reproducibility, atomicity, errors."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hierseg.data import shards
from hierseg.data.loader import decode_sample, iter_raw_samples, resolve_shards
from tests.data_helpers import build, tree_bytes, write_pairs

ZSCORE = {"mode": "zscore"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    write_pairs(root, 6)
    return root


def test_manifest_fields_and_histogram(pairs, tmp_path) -> None:
    assert build(pairs, tmp_path / "s", "--group-regex", "sub-[^_]+", "--val-frac", "0.34") == 0
    total = 0
    groups = {}
    for split in ("train", "val"):
        m = json.loads((tmp_path / "s" / split / "manifest.json").read_text())
        assert isinstance(m["num_samples"], int) and m["patch_shape"] == [64, 64]
        assert len(m["class_histogram"]) == 12 and m["label_map"]["mapping"]["255"] == "uncertain"
        assert m["num_samples"] == sum(s["num_samples"] for s in m["shards"])
        assert all(len(s["image_sha256"]) == 64 for s in m["sources"]) and "make-shards" in m["command"]
        hist, unc = np.zeros(12, np.int64), 0
        for url in resolve_shards(str(tmp_path / "s" / split)):
            for raw in iter_raw_samples(url):
                _, lab = decode_sample(raw, ZSCORE, 12)
                hist += np.bincount(lab[lab >= 0].numpy(), minlength=12)
                unc += int((lab < 0).sum())
        assert hist.tolist() == m["class_histogram"] and unc == m["num_uncertain_pixels"] > 0
        total += m["num_samples"] * 64 * 64
        groups[split] = {s["group"] for s in m["sources"]}
    assert not groups["train"] & groups["val"]


def test_rerun_is_byte_identical(pairs, tmp_path) -> None:
    out = tmp_path / "s"
    assert build(pairs, out, "--samples-per-shard", "7") == 0
    first = tree_bytes(out)
    assert build(pairs, out, "--samples-per-shard", "7") == 2  # refuses a non-empty folder
    assert build(pairs, out, "--samples-per-shard", "7", "--overwrite") == 0
    assert tree_bytes(out) == first and len(first) > 4


def test_interrupted_write_leaves_no_half_shard(pairs, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    real = tarfile.TarFile.addfile

    def dying_addfile(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # mid-way through the second shard (3 members per sample, 3 samples per shard)
            raise KeyboardInterrupt("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", dying_addfile)
    with pytest.raises(KeyboardInterrupt):
        build(pairs, tmp_path / "s", "--samples-per-shard", "3")
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())  # nothing half-built, no temp left


def test_failed_rebuild_keeps_the_previous_shards(pairs, tmp_path, capsys) -> None:
    """--overwrite with a build that fails half-way (an unmapped value) leaves the old shards as they were."""
    out = tmp_path / "s"
    assert build(pairs, out) == 0
    before = tree_bytes(out)
    (tmp_path / "map.yaml").write_text("mapping: {0: extracellular space, 255: uncertain}\n")  # misses 1..11
    assert build(pairs, out, "--label-map", str(tmp_path / "map.yaml"), "--overwrite") == 2
    assert "not in label map" in capsys.readouterr().err
    assert tree_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["map.yaml", "s"]
    (out / "train" / "notes.txt").write_text("mine")
    assert build(pairs, out, "--overwrite") == 2  # a file hierseg did not write is never removed
    assert (out / "train" / "notes.txt").read_text() == "mine"


def test_old_patch_flags_and_bad_numbers_are_argument_errors(pairs, tmp_path, capsys) -> None:
    args = ["--images", str(pairs / "images"), "--labels", str(pairs / "labels"), "--out", str(tmp_path / "o")]
    assert shards.main([*args, "--patch-size", "64"]) == 2
    assert "data.patch_size" in capsys.readouterr().err
    for bad in (["--tile-size", "0"], ["--tile-size", "-8"], ["--samples-per-shard", "0"]):
        with pytest.raises(SystemExit) as e:
            shards.main([*args, *bad])
        assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_min_valid_drops_and_counts(pairs, tmp_path) -> None:
    assert build(pairs, tmp_path / "s", "--min-valid", "0.999") == 2  # everything dropped -> clear error
    assert build(pairs, tmp_path / "t", "--min-valid", "0.9") == 0
    m = json.loads((tmp_path / "t" / "train" / "manifest.json").read_text())
    assert m["num_dropped_tiles"] > 0


def test_stack_slab_split_with_context(tmp_path) -> None:
    from hierseg.data.synth import synth_stack

    image, label = synth_stack(3, 12, 64)
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "lab.npy", np.where(label < 0, 255, label).astype(np.uint8))
    args = ["--images", str(tmp_path / "img.npy"), "--labels", str(tmp_path / "lab.npy"), "--stack"]
    out = tmp_path / "s"
    assert shards.main([*args, "--out", str(out), "--tile-size", "32", "--context", "1", "--gap", "0"]) == 2
    assert (
        shards.main([*args, "--out", str(out), "--tile-size", "32", "--context", "1", "--slabs", "train=0:8,val=10:12"])
        == 0
    )
    m = json.loads((out / "val" / "manifest.json").read_text())
    assert m["channels"] == 3 and m["num_samples"] == 2 * 4 and m["split_config"]["slabs"]["val"] == [10, 12]
    raw = next(iter_raw_samples(resolve_shards(str(out / "val"))[0]))
    meta = json.loads(raw["json"])
    z, y, x = meta["slice"], meta["y"], meta["x"]
    stored = np.load(__import__("io").BytesIO(raw["image.npy"]))
    assert stored.dtype == np.uint8 and np.array_equal(stored, image[z - 1 : z + 2, y : y + 32, x : x + 32])
    whole = image[z - 1 : z + 2].astype(np.float64)  # z-score statistics of the whole slice and its context
    img, _ = decode_sample(raw, ZSCORE, 12)
    expected = (image[z - 1 : z + 2, y : y + 32, x : x + 32] - whole.mean()) / whole.std()
    np.testing.assert_allclose(img.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_input_errors_are_clear(pairs, tmp_path, capsys) -> None:
    img, lab = tmp_path / "i", tmp_path / "l"
    img.mkdir()
    lab.mkdir()
    assert shards.main(["--images", str(img), "--labels", str(lab), "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(img / "a.png")
    assert shards.main(["--images", str(img), "--labels", str(lab), "--out", str(tmp_path / "o")]) == 2
    assert "has no label file" in capsys.readouterr().err
    Image.fromarray(np.zeros((64, 65), np.uint8)).save(lab / "a.png")
    assert (
        shards.main(["--images", str(img), "--labels", str(lab), "--out", str(tmp_path / "o"), "--val-frac", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert "(64, 64)" in err and "(64, 65)" in err
    (lab / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert (
        shards.main(["--images", str(img), "--labels", str(lab), "--out", str(tmp_path / "o"), "--val-frac", "0"]) == 2
    )
    assert "a.png" in capsys.readouterr().err
