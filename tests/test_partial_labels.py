"""Partial labels (label sets): label map parsing, loss, metrics, statistics, DDP exactness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hierseg.data import shards
from hierseg.data.labelmap import LabelMap, resolve_label_sets, set_histogram
from hierseg.labels import FINE_CLASSES, Hierarchy, LabelSets, class_index
from hierseg.losses import hierarchical_loss
from hierseg.metrics import EvalMetrics
from tests.dist_utils import TinyNet, run_ranks
from tests.plan_reference import PLAN_LUT

MAPS = Path(__file__).resolve().parents[1] / "examples" / "label_maps"
# glia|ecs (straddles two groups), neuron_part (inside one), not-mito (straddles), non_tissue (inside one)
SETS = LabelSets.from_config(
    [
        {"name": "glia_or_ecs", "classes": ["glia", "extracellular space"]},
        {"name": "neuron_part", "classes": ["dendrite", "axon", "soma"]},
        {"name": "not_mito", "classes": [c for c in FINE_CLASSES if c != "mitochondria"]},
        {"name": "non_tissue", "classes": ["extracellular space", "tear"]},
    ]
)
TABLE = SETS.table()


def _batch(b, h, w, p_set=0.3, p_unc=0.2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lf = torch.randn(b, 12, h, w, generator=g, dtype=dtype)
    lc = torch.randn(b, 5, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, 12, (b, h, w), generator=g)
    u = torch.rand(b, h, w, generator=g)
    y = torch.where(u < p_set, 12 + torch.randint(0, len(SETS), (b, h, w), generator=g), y)
    y[(u >= p_set) & (u < p_set + p_unc)] = -1
    return lf, lc, y


def reference(lf, lc, y, table, lut=PLAN_LUT, lam=0.2):
    """Independent dense float64 formula: every pixel's label as a membership row (one-hot for a class)."""
    valid = y != -1
    rows = torch.cat([torch.eye(12, dtype=torch.bool), table])  # stored label -> members
    members = rows[torch.where(valid, y, 0)].permute(0, 3, 1, 2)  # [B,12,H,W]
    p = torch.softmax(lf, 1)
    p_set = (p * members).sum(1).clamp_min(1e-300)
    n = valid.sum().clamp_min(1)
    fine = torch.where(valid, -torch.log(p_set), torch.zeros_like(p_set)).sum() / n
    in_group = torch.einsum("bchw,ck->bkhw", members.double(), lut.double())  # members inside group k
    size = members.sum(1, keepdim=True)
    target = (in_group == size).double()
    known = (in_group == size) | (in_group == 0)
    bce = F.binary_cross_entropy_with_logits(lc, target, reduction="none") * known
    coarse = torch.where(valid, bce.sum(1) / lc.shape[1], torch.zeros_like(p_set)).sum() / n
    return fine + lam * coarse, fine, coarse


# --------------------------------------------------------------------------------------------- loss
def test_singleton_sets_reproduce_fine_ce() -> None:
    """A table of the 12 singletons: set ids give the same terms and gradients as plain class ids."""
    lf, lc, y = _batch(2, 9, 7, p_set=0.0)
    ys = torch.where(y >= 0, y + 12, y)
    eye = torch.eye(12, dtype=torch.bool)
    outs, grads = [], []
    for labels, table in ((y, None), (ys, eye)):
        a, b = lf.clone().requires_grad_(True), lc.clone().requires_grad_(True)
        out = hierarchical_loss(a, b, labels, PLAN_LUT, label_sets=table)
        out.loss.backward()
        outs.append(out)
        grads.append((a.grad, b.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, atol=0, rtol=1e-14)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-15, rtol=1e-13)
    for c in range(12):  # one pixel: the per-pixel value is bit-identical
        x = lf[:1, :, :1, :1]
        plain = hierarchical_loss(x, lc[:1, :, :1, :1], torch.tensor([[[c]]]), PLAN_LUT)
        as_set = hierarchical_loss(x, lc[:1, :, :1, :1], torch.tensor([[[c + 12]]]), PLAN_LUT, label_sets=eye)
        assert torch.equal(plain.loss_fine, as_set.loss_fine)


@pytest.mark.parametrize("p_set,p_unc", [(0.3, 0.2), (1.0, 0.0), (0.5, 0.5)])
def test_values_and_gradients_match_float64_reference(p_set, p_unc) -> None:
    """Terms and autograd gradients equal the dense reference (mixed, all-set, set+uncertain batches)."""
    lf, lc, y = _batch(2, 11, 6, p_set=p_set, p_unc=p_unc, seed=3)
    got, want = [], []
    for fn, store in (
        (lambda a, b: hierarchical_loss(a, b, y, PLAN_LUT, 0.3, label_sets=TABLE), got),
        (lambda a, b: reference(a, b, y, TABLE, lam=0.3), want),
    ):
        a, b = lf.clone().requires_grad_(True), lc.clone().requires_grad_(True)
        out = fn(a, b)
        out[0].backward()
        store += [*(t.detach() for t in out[:3]), a.grad, b.grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    assert int(hierarchical_loss(lf, lc, y, PLAN_LUT, label_sets=TABLE).num_valid) == int((y != -1).sum())


def test_set_term_is_exact_where_every_member_probability_underflows() -> None:
    """float32 logits 120 apart: a set's members' softmax underflows to 0, yet the set term and its gradient
    equal the float64 reference (no inf, no NaN), for 2 pixels of a set and 2 of a single class."""
    lf, lc, _ = _batch(1, 2, 2, dtype=torch.float32)
    y = torch.tensor([[[12 + SETS.names.index("glia_or_ecs"), 3], [12 + SETS.names.index("not_mito"), -1]]])
    members = TABLE[SETS.names.index("glia_or_ecs")]
    lf[0, :, 0, 0] = torch.where(members, -60.0, 60.0)  # p(glia or ECS) = e^-120 < float32's smallest normal
    lf[0, :, 1, 0] = torch.where(torch.arange(12) == 10, 60.0, -60.0)  # "not mitochondria" on a sure mitochondrion
    got, want = [], []
    for fn, store, dtype in (
        (lambda a, b: hierarchical_loss(a, b, y, PLAN_LUT, 0.3, label_sets=TABLE), got, torch.float32),
        (lambda a, b: reference(a, b, y, TABLE, lam=0.3), want, torch.float64),
    ):
        a, b = (t.detach().to(dtype).clone().requires_grad_(True) for t in (lf, lc))
        out = fn(a, b)
        out[0].backward()
        store += [*(t.detach().double() for t in out[:3]), a.grad.double(), b.grad.double()]
    assert float(got[1]) > 50 and all(torch.isfinite(t).all() for t in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_uncertain_stays_zero_gradient_and_all_uncertain_is_zero() -> None:
    lf, lc, y = _batch(2, 8, 8, p_set=0.4, p_unc=0.3)
    a, b = lf.clone().requires_grad_(True), lc.clone().requires_grad_(True)
    hierarchical_loss(a, b, y, PLAN_LUT, label_sets=TABLE).loss.backward()
    unc = (y == -1).unsqueeze(1)
    assert torch.all(a.grad.masked_select(unc.expand_as(a)) == 0)
    assert torch.all(b.grad.masked_select(unc.expand_as(b)) == 0)
    a, b = lf.clone().requires_grad_(True), lc.clone().requires_grad_(True)
    out = hierarchical_loss(a, b, torch.full_like(y, -1), PLAN_LUT, label_sets=TABLE)
    out.loss.backward()
    assert out.loss.item() == 0.0 and int(out.num_valid) == 0
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_straddled_channels_get_no_gradient() -> None:
    """not-mitochondria straddles every group: its coarse logits get exactly zero gradient."""
    lf, lc, _ = _batch(1, 4, 4)
    y = torch.full((1, 4, 4), 12 + SETS.names.index("not_mito"))
    b = lc.clone().requires_grad_(True)
    hierarchical_loss(lf, b, y, PLAN_LUT, label_sets=TABLE).loss.backward()
    assert torch.count_nonzero(b.grad) == 0


def test_no_set_labels_are_bit_identical() -> None:
    """label_sets=None and a table with a set-free batch run the plain path: bit-for-bit equal."""
    lf, lc, y = _batch(3, 16, 16, p_set=0.0, dtype=torch.float32)
    results = []
    for table in (None, TABLE):
        a, b = lf.clone().requires_grad_(True), lc.clone().requires_grad_(True)
        out = hierarchical_loss(a, b, y, PLAN_LUT, label_sets=table)
        out.loss.backward()
        results.append([*out, a.grad, b.grad])
    assert all(torch.equal(u, v) for u, v in zip(*results))


def test_multi_level_and_unknown_set_id() -> None:
    h = Hierarchy.from_config(
        {"levels": [Hierarchy.default().to_config()["levels"][0], {"name": "all", "groups": {"t": list(range(12))}}]}
    )
    lf, lc, y = _batch(2, 6, 6, seed=5)
    lc2 = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    out = hierarchical_loss(lf, [lc, lc2], y, h.luts(), [0.2, 0.5], label_sets=TABLE)
    ref1 = reference(lf, lc, y, TABLE, lut=h.luts()[0])
    ref2 = reference(lf, lc2, y, TABLE, lut=h.luts()[1])
    torch.testing.assert_close(out.loss_coarse, torch.stack([ref1[2], ref2[2]]), atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match=r"label value 15 is a set id but label_sets has only 2 rows"):
        hierarchical_loss(lf, lc, torch.full_like(y, 15), PLAN_LUT, label_sets=TABLE[:2])


# ------------------------------------------------------------------------------------------ DDP
RANK_MIX = ((0.3, 0.1), (1.0, 0.0), (0.0, 1.0))  # mixed; only sets; only uncertain


def _rank_batch(rank):
    _, _, y = _batch(2, 10, 12, *RANK_MIX[rank], seed=100 + rank)
    x = torch.randn(2, 1, 10, 12, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    return x, y


def _ddp_rank(rank, world):
    net = nn.parallel.DistributedDataParallel(TinyNet().double())
    x, y = _rank_batch(rank)
    out = hierarchical_loss(*net(x), y, PLAN_LUT, lambda_coarse=0.3, label_sets=TABLE)
    out.loss.backward()
    return [p.grad.clone() for p in net.module.parameters()], out.loss_fine, out.loss_coarse, out.num_valid


def test_ddp_three_ranks_equal_one_process() -> None:
    """3 gloo ranks (mixed / all-set / all-uncertain): gradients and terms equal one process."""
    results = run_ranks(3, _ddp_rank)
    xs, ys = zip(*(_rank_batch(r) for r in range(3)))
    net = TinyNet().double()
    y = torch.cat(ys)
    ref = hierarchical_loss(*net(torch.cat(xs)), y, PLAN_LUT, lambda_coarse=0.3, label_sets=TABLE)
    ref.loss.backward()
    for grads, loss_fine, loss_coarse, num_valid in results:
        for g, r in zip(grads, (p.grad for p in net.parameters())):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)
        assert int(num_valid) == int((y != -1).sum())
        torch.testing.assert_close(loss_fine, ref.loss_fine, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(loss_coarse, ref.loss_coarse, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------- metrics
def test_metrics_set_accuracy_and_group_confusion() -> None:
    y = torch.tensor([[[10, 12, 12, 13, 14, -1]]])  # mito, glia|ecs x2, neuron_part, not_mito, uncertain
    pred_cls = torch.tensor([[[10, 5, 3, 2, 10, 0]]])
    coarse = torch.full((1, 5, 1, 6), 0.01)
    coarse[0, 0] = 0.99  # predicts neuron_part everywhere
    m = EvalMetrics(12, [PLAN_LUT], label_sets=TABLE, set_names=SETS.names).all_reduce()
    m.update(pred_cls, [coarse], y)
    assert m.fine.num_valid == 1  # only the single-class pixel
    assert m.fine.set_counts().tolist() == [[1, 2], [1, 1], [0, 1], [0, 0]]
    c = m.coarse[0].counts  # neuron_part (k=0): mito->0, glia|ecs->0 x2, neuron_part->1; not_mito straddles
    assert c[0].tolist() == [[0, 3], [0, 1]]
    assert int(c[1].sum()) == 2 and int(c[4].sum()) == 2  # glia|ecs straddles glia and non_tissue: skipped
    assert int(c[3].sum()) == 4  # organelle: mito inside, glia|ecs and neuron_part disjoint
    from hierseg.serve.evaluate import summarize

    s = summarize(m, Hierarchy.default())
    assert s["val/set_accuracy/glia_or_ecs"] == 0.5 and s["val/set_accuracy/not_mito"] == 0.0
    assert "val/set_accuracy/non_tissue" not in s and s["val/num_valid"] == 1.0


# -------------------------------------------------------------------------------------- label map
def test_example_maps() -> None:
    vnc = LabelMap.from_yaml(MAPS / "vnc_sstem_sets.yaml")
    out, _ = vnc.apply(np.array([0, 32, 64, 96, 128, 159, 191, 223, 255], np.uint8), "v")
    assert out.tolist() == [-1, -1, -1, -1, -1, 12, 10, -1, 13]
    assert vnc.sets.names == ("glia_or_extracellular_space", "neuron_part")
    assert vnc.sets.members == ((0, 5), (2, 3, 4))
    mito = LabelMap.from_yaml(MAPS / "binary_mito.yaml")
    assert mito.apply(np.array([1, 0]), "m")[0].tolist() == [10, 12]
    assert mito.sets.members[0] == tuple(c for c in range(12) if c != class_index("mitochondria"))
    assert mito.to_manifest()["mapping"] == {"0": "not_mitochondria", "1": "mitochondria"}


def test_label_map_set_forms_dedup_and_singletons() -> None:
    m = LabelMap.from_config(
        {
            "mapping": {1: ["axon"], 2: "glia", 3: "non_tissue", 4: ["tear", "extracellular_space"], 5: "nd"},
            "sets": {"nd": ["neuron_part", "glia"]},
        }
    )
    assert m.values == {1: 3, 2: 5, 3: 13, 4: 13, 5: 12}  # singleton -> class; same set -> same id
    assert m.sets.names == ("nd", "non_tissue")
    assert LabelSets.from_config(m.to_manifest()["sets"]) == m.sets


@pytest.mark.parametrize(
    "target,match",
    [
        ("neuron_parts", r"value 7: unknown fine class 'neuron_parts'.*group/set name \(neuron_part"),
        ([], r"value 7: \[\] is an empty set"),
        ({"not": ["mitochondria", "neuron_part", "glia", "myelin_related", "non_tissue", "organelle"]}, "empty set"),
        ({"not": []}, r"all 12 fine classes.*that is 'uncertain'; map the value to uncertain"),
        (list(FINE_CLASSES), r"that is 'uncertain'"),
        ({"but": ["glia"]}, r"must be \{not: \[classes\]\}"),
        (["glia", "uncertain"], r"'uncertain' cannot be part of a set"),
    ],
)
def test_label_map_set_errors(target, match) -> None:
    with pytest.raises(ValueError, match=match):
        LabelMap.from_config({"mapping": {7: target}}, source="m.yaml")


def test_resolve_label_sets_sources_and_mismatch() -> None:
    recorded = {"label_sets": SETS.to_config()}
    assert resolve_label_sets(None, recorded, recorded) == SETS
    assert resolve_label_sets(None, None, None) == LabelSets()
    assert resolve_label_sets(SETS.to_config(), None, None) == SETS
    with pytest.raises(ValueError, match="training and validation manifests have different label_sets"):
        resolve_label_sets(None, recorded, {"label_sets": []})
    with pytest.raises(ValueError, match=r"data.label_sets .* differs from the shards' manifest"):
        resolve_label_sets(SETS.to_config()[:1], recorded, recorded)
    with pytest.raises(ValueError, match=r"label_sets\[1\] has id 99 .* expected 13"):
        LabelSets.from_config([{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3], "id": 99}])


# ---------------------------------------------------------------------------------- shards, loader
def test_manifest_set_histogram_and_class_balanced_loader(tmp_path) -> None:
    """Set pixels are counted per set, never as a class; all-set patches stay; weights ignore them."""
    rng = np.random.default_rng(0)
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    for i in range(4):
        lab = np.zeros((64, 64), np.uint8)  # background: not mitochondria
        if i % 2:
            lab[:16, :16] = 1  # mitochondria
            lab[40:, 40:] = 3  # uncertain
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "images" / f"s{i}.png")
        Image.fromarray(lab).save(tmp_path / "labels" / f"s{i}.png")
    (tmp_path / "map.yaml").write_text("mapping: {1: mitochondria, 0: {not: [mitochondria]}, 3: uncertain}\n")
    args = ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "o")]
    assert (
        shards.main([*args, "--label-map", str(tmp_path / "map.yaml"), "--tile-size", "32", "--val-frac", "0.25"]) == 0
    )
    ms = [json.loads((tmp_path / "o" / s / "manifest.json").read_text()) for s in ("train", "val")]
    for m in ms:
        assert m["label_sets"] == [
            {"id": 12, "name": "not_mitochondria", "classes": list(m["label_sets"][0]["classes"])}
        ]
        assert (
            m["class_histogram"][10] + m["set_histogram"][0] + m["num_uncertain_pixels"] == m["num_samples"] * 32 * 32
        )
        assert sum(m["class_histogram"]) == m["class_histogram"][10]
    assert sum(m["num_samples"] for m in ms) == 16  # all-set patches are kept
    assert set_histogram(np.array([[-1, 10, 12, 12]]), 1).tolist() == [2]

    from hierseg.data.loader import build_train_loader
    from hierseg.spec import DataSpec

    data = DataSpec(train=str(tmp_path / "o" / "train"), val=str(tmp_path / "o" / "val"), batch_size=2, patch_size=16)
    data = data.model_copy(update={"num_workers": 0, "class_balanced": True})
    stream = iter(build_train_loader(data, rank=0, world_size=1, batch_size=2, seed=0,
                                     normalization={"mode": "zscore"}, num_labels=13))  # fmt: skip
    labels = torch.cat([next(stream)[1] for _ in range(6)])
    assert int(labels.max()) == 12 and int(labels.min()) >= -1
