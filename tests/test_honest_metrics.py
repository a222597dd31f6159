"""Partial labels end to end: set pixels as known negatives, label-space IoU, set-aware decoding, logged == by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hierseg.labels import FINE_CLASSES, Hierarchy, LabelSets, LabelSpace
from hierseg.metrics import ConfusionMatrix, EvalMetrics
from hierseg.serve.evaluate import summarize
from hierseg.serve.infer import PredictOptions, decide

MITO = FINE_CLASSES.index("mitochondria")
GLIA, AXON = FINE_CLASSES.index("glia"), FINE_CLASSES.index("axon")
NOT_MITO = LabelSets(("not_mitochondria",), (tuple(c for c in range(12) if c != MITO),))
BINARY_MAP = {"mapping": {"0": "not_mitochondria", "1": "mitochondria"}, "sets": NOT_MITO.to_config()}


def _by_hand_iou(pred: np.ndarray, labelled: np.ndarray, predicted_in: np.ndarray) -> float:
    """IoU of 'labelled it' vs 'predicted inside it' over the scored pixels (independent of hierseg)."""
    tp = np.sum(labelled & predicted_in)
    union = np.sum(labelled | predicted_in)
    return tp / union if union else math.nan


def test_set_pixels_are_known_negatives_and_no_data_is_nan() -> None:
    """A mitochondria prediction on a 'not mitochondria' pixel is a false positive; empty classes are NaN."""
    y = torch.tensor([MITO, MITO, 12, 12, 12, -1])
    pred = torch.tensor([MITO, GLIA, MITO, MITO, GLIA, MITO])
    cm = ConfusionMatrix(12, label_sets=NOT_MITO.table()).update(pred, y)
    iou = cm.iou()
    assert iou[MITO] == pytest.approx(1 / 4)  # tp 1, fn 1 (glia), fp 2 (set pixels predicted mito)
    assert iou[GLIA] == 0.0  # a false positive on a mito pixel; glia on a not-mito pixel is unknown, not counted
    assert math.isnan(iou[AXON]) and cm.num_valid == 2
    assert cm.dice()[MITO] == pytest.approx(2 / 5)
    labelled = y.numpy()
    scored = labelled != -1
    p, lab = pred.numpy()[scored], labelled[scored]
    space = LabelSpace.from_label_map(BINARY_MAP, NOT_MITO)
    assert space.names == ("mitochondria", "not_mitochondria") and [v.code for v in space.values] == [1, 0]
    label_iou, support = cm.label_iou(space)
    assert support.tolist() == [2, 3]
    assert label_iou[0] == pytest.approx(_by_hand_iou(p, lab == MITO, p == MITO))
    assert label_iou[1] == pytest.approx(_by_hand_iou(p, lab == 12, p != MITO))


def test_pooled_label_iou_counts_overlapping_values_as_unknown() -> None:
    """Pooled over two label maps: a label inside a value is a positive, one sharing no class a negative."""
    names = ("neuron_part", "not_mitochondria")
    members = ({2, AXON, 4}, set(range(12)) - {MITO})
    sets = LabelSets(names, tuple(tuple(sorted(m)) for m in members))
    neuron, not_mito = 12, 13
    y = torch.tensor([AXON, AXON, neuron, neuron, MITO, not_mito, not_mito, GLIA])
    pred = torch.tensor([AXON, MITO, AXON, MITO, AXON, AXON, MITO, AXON])
    cm = ConfusionMatrix(12, label_sets=sets.table()).update(pred, y)
    record = {"mapping": {"3": "axon", "191": "mitochondria", "255": "neuron_part", "0": "not_mitochondria"}}
    space = LabelSpace.from_label_map(record, sets)
    iou, support = cm.label_iou(space)
    # By hand, with plain sets: what each stored label allows, and each value's classes.
    allows = {c: {c} for c in range(12)} | {neuron: members[0], not_mito: members[1]}
    for v, got, n in zip(space.values, iou.tolist(), support.tolist()):
        value = set(v.members)
        pos = [allows[int(t)] <= value for t in y]
        neg = [not (allows[int(t)] & value) for t in y]
        hit = [int(p) in value for p in pred]
        tp = sum(a and b for a, b in zip(pos, hit))
        fp = sum(a and b for a, b in zip(neg, hit))
        assert n == sum(pos) and got == pytest.approx(tp / (sum(pos) + fp)), v.name
    by_name = dict(zip(space.names, iou.tolist()))
    # axon: positives the 2 axon pixels (1 hit); the neuron_part pixels predicted axon are unknown, not false
    # positives; the mito pixel and the glia pixel (disjoint from axon) predicted axon are false positives.
    assert by_name["axon"] == pytest.approx(1 / 4)
    # not_mitochondria: the axon, neuron_part, glia and its own set pixels lie inside it (7 positives, 4 predicted
    # inside); the mito pixel predicted axon is its one false positive.
    assert by_name["not_mitochondria"] == pytest.approx(4 / 8)


def test_summary_ranks_on_labelled_values_only() -> None:
    """val/label/miou averages the values with labelled pixels; val/fine/* keeps the honest per-class figures."""
    y = torch.tensor([[[MITO, 12, 12, 12]]])
    pred = torch.tensor([[[MITO, AXON, MITO, GLIA]]])
    m = EvalMetrics(12, [Hierarchy.default().lut()], label_sets=NOT_MITO.table(), set_names=NOT_MITO.names)
    m.update(pred, [torch.zeros(1, 5, 1, 4)], y)
    s = summarize(m, Hierarchy.default(), LabelSpace.from_label_map(BINARY_MAP, NOT_MITO))
    assert s["val/label/iou/mitochondria"] == pytest.approx(1 / 2)
    assert s["val/label/iou/not_mitochondria"] == pytest.approx(2 / 3)
    assert s["val/label/miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s["val/fine/iou/mitochondria"] == pytest.approx(1 / 2) and "val/fine/iou/axon" not in s
    assert s["val/set_accuracy/not_mitochondria"] == pytest.approx(2 / 3)


def test_labels_decoding_equals_direct_softmax_computation() -> None:
    """--decode labels: the value with the largest summed softmax wins; fine_labels is the best class inside it."""
    g = torch.Generator().manual_seed(0)
    fine = torch.randn(12, 9, 11, generator=g).mul(2).softmax(0)
    coarse = torch.rand(5, 9, 11, generator=g)
    sets = LabelSets(("glia_or_ecs", "neurite"), ((0, 5), (2, 3, 4)))
    record = {"mapping": {"159": "glia_or_ecs", "191": "mitochondria", "255": "neurite", "0": "uncertain"}}
    space = LabelSpace.from_label_map(record, sets)
    out = decide(torch.cat([fine, coarse]), Hierarchy.default().lut(), PredictOptions(decode="labels"), space)
    f = fine.numpy()
    members = {191: [MITO], 159: [0, 5], 255: [2, 3, 4]}
    codes = np.array(list(members))
    value_p = np.stack([f[m].sum(0) for m in members.values()])
    want_codes = codes[value_p.argmax(0)]
    assert np.array_equal(out["label_values"], want_codes)
    for code, m in members.items():
        where = want_codes == code
        assert np.array_equal(out["fine_labels"][where], np.array(m)[f[m].argmax(0)][where])
    binary = LabelSpace.from_label_map(BINARY_MAP, NOT_MITO)
    b = decide(torch.cat([fine, coarse]), Hierarchy.default().lut(), PredictOptions(decode="labels"), binary)
    assert np.array_equal(b["fine_labels"] == MITO, f[MITO] > 1 - f[MITO])  # mito exactly where it beats the rest


@pytest.mark.slow
def test_logged_label_iou_equals_predict_then_by_hand(tmp_path: Path, capsys) -> None:
    """The logged val/label/iou/mitochondria equals hierseg predict on the validation images, scored by hand."""
    from PIL import Image

    from hierseg.data import shards
    from hierseg.train.checkpoint import load_state
    from tests.data_helpers import write_pairs
    from tests.train_utils import TRAIN, tiny_spec, write_spec

    root = tmp_path / "pairs"
    write_pairs(root, 6, size=96)
    lines = ["mapping:", "  10: mitochondria", "  255: uncertain"]
    lines += [f"  {v}: {{not: [mitochondria]}}" for v in range(12) if v != MITO]
    (tmp_path / "map.yaml").write_text("\n".join(lines) + "\n")
    args = ["--images", str(root / "images"), "--labels", str(root / "labels"), "--out", str(tmp_path / "s")]
    assert shards.main([*args, "--label-map", str(tmp_path / "map.yaml"), "--group-regex", "sub-[^_]+",
                        "--val-frac", "0.34"]) == 0  # fmt: skip
    spec = tiny_spec(tmp_path / "s", tmp_path, run={"num_workers": 1, "max_steps": 6, "eval_every": 6})
    spec["data"].pop("synthetic")
    spec["data"]["patch_size"] = 48
    out = subprocess.run([sys.executable, TRAIN, "--spec", str(write_spec(spec, tmp_path / "spec.yaml")),
                          "--launcher", "local"], capture_output=True, text=True, timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    best = load_state(tmp_path / "runs" / "t" / "best")
    logged = best["best_metrics"]["val/label/iou/mitochondria"]
    manifest = json.loads((tmp_path / "s" / "val" / "manifest.json").read_text())
    val_images = tmp_path / "val_images"
    val_images.mkdir()
    for src in manifest["sources"]:
        (val_images / Path(src["image"]).name).symlink_to(src["image"])
    pred_dir = tmp_path / "pred"
    from hierseg.serve.infer import main as predict

    assert predict(["--model", str(tmp_path / "runs" / "t" / "best"), "--input", str(val_images),
                    "--output", str(pred_dir), "--quiet"]) == 0  # fmt: skip
    import tifffile

    fine = tifffile.imread(pred_dir / "fine_labels.tif")
    labels = np.stack([np.asarray(Image.open(Path(s["label"]))) for s in manifest["sources"]])
    scored = labels != 255
    by_hand = _by_hand_iou(fine[scored], labels[scored] == MITO, fine[scored] == MITO)
    assert logged == pytest.approx(by_hand, abs=1e-9)
    assert (pred_dir / "label_values.tif").is_file()  # a set-trained model decodes in its label space
    # --label-map: the same decision in another map's codes (a 0/1 mask's), as a joint model is scored
    (tmp_path / "mask.yaml").write_text("mapping:\n  1: mitochondria\n  0: {not: [mitochondria]}\n")
    assert predict(["--model", str(tmp_path / "runs" / "t" / "best"), "--input", str(val_images),
                    "--output", str(tmp_path / "pred01"), "--label-map", str(tmp_path / "mask.yaml"),
                    "--quiet"]) == 0  # fmt: skip
    values01 = tifffile.imread(tmp_path / "pred01" / "label_values.tif")
    assert set(np.unique(values01)) <= {0, 1}
    assert np.array_equal(values01 == 1, tifffile.imread(pred_dir / "label_values.tif") == MITO)
    assert np.array_equal(tifffile.imread(tmp_path / "pred01" / "fine_labels.tif") == MITO, values01 == 1)
    # evaluate on a 0/1 mask with its own map: the by-hand IoU of that map; a map with other values gets a note
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, np.where(labels == 255, 255, (labels == MITO).astype(np.uint8)))
    from hierseg.serve.evaluate import main as evaluate

    def evaluated(mapping: str) -> tuple[float, str]:
        (tmp_path / "m.yaml").write_text(f"mapping:\n{mapping}  255: uncertain\n")
        assert evaluate(["--model", str(tmp_path / "runs" / "t" / "best"), "--image", str(val_images), "--labels",
                         str(mask), "--label-map", str(tmp_path / "m.yaml"), "--format", "json"]) == 0  # fmt: skip
        captured = capsys.readouterr()
        report = json.loads(captured.out[captured.out.index("{") :])
        return report["label"]["values"]["mitochondria"]["iou"], captured.err

    iou, err = evaluated("  1: mitochondria\n  0: {not: [mitochondria]}\n")
    assert iou == pytest.approx(_by_hand_iou(values01[scored], labels[scored] == MITO, values01[scored] == 1))
    assert "note:" not in err
    _, err = evaluated("  1: mitochondria\n  0: uncertain\n")
    assert "note: the labels use the values ['mitochondria'], the model was trained on" in err
