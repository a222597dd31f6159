"""Round trips on the real EM data in ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hierseg.data import shards
from hierseg.data.loader import build_val_loader
from hierseg.spec import DataSpec
from tests.data_helpers import REAL_DATA

pytestmark = pytest.mark.realdata
MAPS = Path(__file__).resolve().parents[1] / "examples" / "label_maps"


UNIT = {"mode": "affine", "lo": 0.0, "hi": 255.0}  # uint8 -> [0, 1], so pixels compare exactly


def _need(name: str) -> Path:
    path = REAL_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (see ../shared/data/README.md)")
    return path


def test_srf_tem_round_trip_and_mouse_split(tmp_path) -> None:
    root = _need("srf_tem")
    out = tmp_path / "srf"
    args = ["--images", str(root / "images"), "--labels", str(root / "labels"), "--out", str(out)]
    args += ["--label-map", str(MAPS / "srf_tem.yaml"), "--tile-size", "600", "--min-valid", "0"]
    assert shards.main([*args, "--group-regex", "sub-[^_]+", "--val-frac", "0.3", "--seed", "1"]) == 0
    mice, seen = {}, 0
    for split in ("train", "val"):
        manifest = json.loads((out / split / "manifest.json").read_text())
        mice[split] = {re.match(r"sub-[^_]+", s["name"]).group(0) for s in manifest["sources"]}
        data = DataSpec(train=str(out / split), val=str(out / split), batch_size=4, num_workers=0)
        originals = {}
        for s in manifest["sources"]:
            img, lab = np.asarray(Image.open(s["image"])), np.asarray(Image.open(s["label"]))
            originals[img.tobytes()] = np.where(lab == 255, -1, lab.astype(np.int64))
        for images, labels in build_val_loader(data, rank=0, world_size=1, normalization=UNIT, num_labels=12):
            for img, lab in zip(images, labels):
                raw = (img[0].numpy() * 255).round().astype(np.uint8).tobytes()
                assert raw in originals, "a loaded image matches no source image pixel for pixel"
                assert np.array_equal(lab.numpy(), originals[raw])
                seen += 1
        assert set(np.flatnonzero(manifest["class_histogram"])) == {3, 6}
    assert seen == 21 and not mice["train"] & mice["val"] and mice["val"]


def test_vnc_sstem_stack_with_label_map(tmp_path) -> None:
    root = _need("vnc_sstem")
    out = tmp_path / "vnc"
    args = ["--images", str(root / "raw"), "--labels", str(root / "labels"), "--stack", "--out", str(out)]
    args += ["--label-map", str(MAPS / "vnc_sstem.yaml"), "--tile-size", "512", "--slabs", "train=0:15,val=17:20"]
    assert shards.main(args) == 0
    manifest = json.loads((out / "val" / "manifest.json").read_text())
    assert set(np.flatnonzero(manifest["class_histogram"])) == {0, 10}
    total = sum(manifest["class_histogram"]) + manifest["num_uncertain_pixels"]
    assert manifest["num_samples"] <= 3 * 4 and total == manifest["num_samples"] * 512 * 512
    data = DataSpec(train=str(out / "train"), val=str(out / "val"), batch_size=4, num_workers=0)
    valid = 0
    for _, labels in build_val_loader(data, rank=0, world_size=1, normalization=UNIT, num_labels=12):
        assert set(labels.unique().tolist()) <= {-1, 0, 10}
        valid += int((labels >= 0).sum())
    assert valid == sum(manifest["class_histogram"])
