"""3D (issue 12): spec, planned 3D U-Net, loss and metrics on [B, C, D, H, W]; 3D shards, crops, validation and a
3D training run end to end; 2D unchanged."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hierseg.labels import Hierarchy
from hierseg.losses import hierarchical_loss
from hierseg.metrics import EvalMetrics
from hierseg.model import UNet, UNetPlan, build_model, check_patch_size, plan_unet, sizes_that_work
from hierseg.spec import ModelSpec, SpecError, load_spec
from tests.dist_utils import TinyNet, run_ranks
from tests.plan_reference import PLAN_LUT, compute_losses_voxelwise, slices_of
from tests.test_blockwise import ray_cluster  # noqa: F401  (the module's one private local Ray)
from tests.test_partial_labels import SETS, TABLE, reference

VNC_SSTEM_NM = [50.0, 4.6, 4.6]  # z (section thickness), y, x
OVERLAPPING = Hierarchy.from_config(  # second level is no partition: classes 5-7 are in both groups
    {
        "levels": [
            Hierarchy.default().to_config()["levels"][0],
            {"name": "ovl", "groups": {"a": list(range(8)), "b": list(range(5, 12))}},
        ]
    }
)


def _batch3d(b, d, h, w, uncertain=0.2, p_set=0.0, seed=0, dtype=torch.float64, groups=(5,)):
    g = torch.Generator().manual_seed(seed)
    lf = torch.randn(b, 12, d, h, w, generator=g, dtype=dtype)
    lcs = [torch.randn(b, k, d, h, w, generator=g, dtype=dtype) for k in groups]
    y = torch.randint(0, 12, (b, d, h, w), generator=g)
    u = torch.rand(b, d, h, w, generator=g)
    y = torch.where(u < p_set, 12 + torch.randint(0, len(SETS), (b, d, h, w), generator=g), y)
    y[(u >= p_set) & (u < p_set + uncertain)] = -1
    return lf, lcs, y


def _terms_and_grads(fn, lf, lcs):
    """Terms of ``fn(fine, coarse list)`` and the autograd gradients of its total (float64)."""
    a = lf.clone().requires_grad_(True)
    bs = [c.clone().requires_grad_(True) for c in lcs]
    out = fn(a, bs)
    out[0].backward()
    return [t.detach() for t in out[:3]], [a.grad, *(b.grad for b in bs)]


# --------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 5), (2, 5, 16, 8)])
@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("uncertain", [0.0, 0.3, 0.9])
def test_3d_loss_equals_plan_formula_voxelwise(shape, lam, uncertain):
    """[B, C, D, H, W]: loss, loss_fine, loss_coarse equal the plan's formula over voxels (1e-6), int64 count."""
    lf, (lc,), y = _batch3d(*shape, uncertain=uncertain, seed=sum(shape) + int(10 * uncertain), dtype=torch.float32)
    out = hierarchical_loss(lf, lc, y, Hierarchy.default().lut(), lambda_coarse=lam)
    for got, want in zip(out[:3], compute_losses_voxelwise(lf, lc, y, lambda_coarse=lam)):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=1e-6)
    assert out.num_valid.dtype == torch.int64 and int(out.num_valid) == int((y != -1).sum())


def test_3d_gradients_and_non_partition_level_match_plan_formula():
    """Two levels (one not a partition), one all-uncertain sample: terms and gradients equal the plan's (float64)."""
    lf, lcs, y = _batch3d(3, 4, 6, 5, uncertain=0.3, seed=7, groups=(5, 2))
    y[1] = -1  # the middle sample is all uncertain
    luts = OVERLAPPING.luts()

    def plan(a, bs):  # the plan's formula per level, fine term counted once
        first, fine, c0 = compute_losses_voxelwise(a, bs[0], y, luts[0], 0.2)
        c1 = compute_losses_voxelwise(a, bs[1], y, luts[1], 0.5)[2]
        return first + 0.5 * c1, fine, torch.stack([c0, c1])

    got, got_grads = _terms_and_grads(lambda a, bs: hierarchical_loss(a, bs, y, luts, [0.2, 0.5]), lf, lcs)
    want, want_grads = _terms_and_grads(plan, lf, lcs)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grads, want_grads, atol=1e-12, rtol=1e-10)
    assert all(torch.all(g[1] == 0) for g in got_grads), "the all-uncertain sample gets exactly zero gradient"


def test_3d_all_uncertain_batch_is_zero_with_zero_gradient():
    """An all-uncertain 3D batch: finite zero terms, num_valid 0, every gradient exactly 0 (with label sets too)."""
    lf, lcs, _ = _batch3d(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), -1)
    for sets in (None, TABLE):
        (loss, fine, coarse), grads = _terms_and_grads(
            lambda a, bs, s=sets: hierarchical_loss(a, bs[0], y, PLAN_LUT, label_sets=s), lf, lcs
        )
        assert loss.item() == 0.0 and fine.item() == 0.0 and coarse.item() == 0.0 and torch.isfinite(loss)
        assert all(torch.count_nonzero(g) == 0 for g in grads)
        assert int(hierarchical_loss(lf, lcs[0], y, PLAN_LUT, label_sets=sets).num_valid) == 0


@pytest.mark.parametrize("p_set,uncertain", [(0.3, 0.2), (1.0, 0.0), (0.5, 0.5)])
def test_3d_label_sets_equal_dense_reference_voxelwise(p_set, uncertain):
    """Label sets in 3D: terms and gradients equal the dense partial-label formula over voxels (float64)."""
    lf, lcs, y = _batch3d(2, 3, 5, 4, uncertain=uncertain, p_set=p_set, seed=11)
    y[0, 1] = -1  # one whole all-uncertain section inside the block

    def dense(a, bs):
        return reference(slices_of(a), slices_of(bs[0]), slices_of(y), TABLE, lam=0.3)

    got, got_grads = _terms_and_grads(
        lambda a, bs: hierarchical_loss(a, bs[0], y, PLAN_LUT, 0.3, label_sets=TABLE), lf, lcs
    )
    want, want_grads = _terms_and_grads(dense, lf, lcs)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grads, want_grads, atol=1e-12, rtol=1e-10)


UNCERTAIN_PER_RANK = (0.05, 0.8, 1.0)  # very different valid counts; the last rank has none


def _rank_batch3d(rank):
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(2, 1, 3, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 12, (2, 3, 6, 5), generator=g)
    if rank == 0:  # label sets on one rank only: ranks take different local branches, same collectives
        set_ids = 12 + torch.randint(0, len(SETS), y.shape, generator=g)
        y = torch.where(torch.rand(2, 3, 6, 5, generator=g) < 0.3, set_ids, y)
    y[torch.rand(2, 3, 6, 5, generator=g) < UNCERTAIN_PER_RANK[rank]] = -1
    return x, y


def _ddp_rank3d(rank, world):
    net = nn.parallel.DistributedDataParallel(TinyNet(dims=3).double())
    x, y = _rank_batch3d(rank)
    out = hierarchical_loss(*net(x), y, PLAN_LUT, lambda_coarse=0.3, label_sets=TABLE)
    out.loss.backward()
    return [p.grad.clone() for p in net.module.parameters()], out.loss_fine, out.loss_coarse, out.num_valid


def test_3d_ddp_gradient_equals_plan_formula_on_concatenated_batch():
    """3 gloo ranks in 3D (one all uncertain, one with label sets): gradients and terms equal the dense formula."""
    results = run_ranks(3, _ddp_rank3d)
    xs, ys = zip(*(_rank_batch3d(r) for r in range(3)))
    x, y = torch.cat(xs), torch.cat(ys)
    net = TinyNet(dims=3).double()
    lf, lc = net(x)
    _, ref_fine, ref_coarse = ref = reference(slices_of(lf), slices_of(lc), slices_of(y), TABLE, lam=0.3)
    ref[0].backward()
    for grads, loss_fine, loss_coarse, num_valid in results:
        for g, r in zip(grads, (p.grad for p in net.parameters())):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)
        assert int(num_valid) == int((y != -1).sum())
        torch.testing.assert_close(loss_fine, ref_fine.detach(), atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(loss_coarse, ref_coarse.detach(), atol=1e-10, rtol=1e-8)
    assert all(torch.equal(results[0][1], r[1]) and torch.equal(results[0][2], r[2]) for r in results)


# ------------------------------------------------------------------------------------------ metrics
def test_3d_metrics_count_every_voxel_as_a_pixel():
    """EvalMetrics on [B, D, H, W] (label sets too) equal those of the same voxels as 2D slices; fine counts by hand."""
    lf, lcs, y = _batch3d(2, 3, 5, 4, uncertain=0.2, p_set=0.3, seed=5, groups=(5, 2))
    pred = lf.argmax(1)
    probs = [c.sigmoid() for c in lcs]
    got = EvalMetrics(12, OVERLAPPING.luts(), label_sets=TABLE)
    got.update(pred, probs, y)
    want = EvalMetrics(12, OVERLAPPING.luts(), label_sets=TABLE)
    want.update(slices_of(pred), [slices_of(p) for p in probs], slices_of(y))
    for g, w in zip(got._tensors(), want._tensors(), strict=True):
        assert torch.equal(g, w)
    by_hand = np.zeros((12, 12), dtype=np.int64)
    for t, p in zip(y.ravel().tolist(), pred.ravel().tolist()):
        if 0 <= t < 12:
            by_hand[t, p] += 1
    assert np.array_equal(got.fine.matrix.numpy(), by_hand)


# ---------------------------------------------------------------------------------------------- model
def test_plan_for_vnc_sstem_pools_xy_only_until_roughly_isotropic():
    """z 50 nm, xy 4.6 nm: three xy-only stages with (1,3,3) kernels (z/xy 10.9, 5.4, 2.7), then 3D (1.36)."""
    plan = plan_unet(4, 3, VNC_SSTEM_NM)
    assert plan.strides == ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert plan.kernels == ((1, 3, 3), (1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
    assert plan.divisor() == (2, 16, 16)
    iso = plan_unet(3, 3, [8.0, 8.0, 8.0])
    assert iso.strides == ((2, 2, 2),) * 3 and iso.kernels == ((3, 3, 3),) * 4
    assert plan_unet(3, 3, None) == iso  # unknown voxel size: isotropic
    classic_2d = UNetPlan(kernels=((3, 3),) * 4, strides=((2, 2),) * 3)
    assert plan_unet(3, 2) == plan_unet(3, 2, VNC_SSTEM_NM) == classic_2d  # 2D sees no z


def test_planned_3d_network_pools_as_planned_and_keeps_the_input_shape():
    """vnc_sstem-planned 3D U-Net: features pool xy-only first; logits keep the input's [D, H, W], odd sizes too."""
    model = build_model(ModelSpec(dims=3, depth=4, base_channels=4, voxel_size=VNC_SSTEM_NM), Hierarchy.default())
    assert model.stem[0].kernel_size == (1, 3, 3) and model.stem[0].padding == (0, 1, 1)
    assert model.down[2][0].kernel_size == (3, 3, 3) and isinstance(model.fine_head, nn.Conv3d)
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[2:]))) for b in model.down]
    with torch.no_grad():
        fine, (coarse,) = model(torch.randn(1, 1, 4, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == [(4, 16, 16), (4, 8, 8), (4, 4, 4), (2, 2, 2)]
    assert fine.shape == (1, 12, 4, 32, 32) and coarse.shape == (1, 5, 4, 32, 32)
    with torch.no_grad():
        fine, (coarse,) = model(torch.randn(2, 1, 3, 20, 21))  # padded inside, cropped back
    assert fine.shape == (2, 12, 3, 20, 21) and coarse.shape == (2, 5, 3, 20, 21)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "batch"),
    [
        ((1, 3, 3), 1, (0, 1, 1), 2),  # torch's own 3D convolution
        ((1, 3, 3), (1, 2, 2), (0, 1, 0), 1),
        ((1, 1, 1), 1, 0, 1),
        ((3, 3, 3), 1, 1, 1),  # z-shifted sections
        ((3, 3, 3), (1, 2, 2), (1, 0, 1), 1),
        ((3, 3, 3), 1, (0, 1, 1), 1),
        ((3, 3, 3), 1, 1, 2),  # torch's own 3D convolution
    ],
)
def test_3d_convolution_by_sections_equals_torch_conv3d_values_and_gradients(kernel, stride, padding, batch):
    """hierseg's Conv3d (run as 2D convolutions of sections on CPU) equals ``F.conv3d``: output and gradients."""
    from hierseg.model import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(3, 5, kernel, stride=stride, padding=padding)
    x = torch.randn(batch, 3, 4, 9, 11, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref, b_ref = (p.detach().clone().requires_grad_(True) for p in (conv.weight, conv.bias))
    out = conv(x)
    ref = torch.nn.functional.conv3d(x_ref, w_ref, b_ref, conv.stride, conv.padding)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5) and torch.allclose(conv.weight.grad, w_ref.grad, atol=1e-4)
    assert torch.allclose(conv.bias.grad, b_ref.grad, atol=1e-4)
    assert set(conv.state_dict()) == {"weight", "bias"} and conv.weight.shape == (5, 3, *kernel)


def test_2d_model_keeps_its_checkpoint_keys_and_layers():
    """dims 2 (the default) builds the same Conv2d U-Net as before: state-dict keys and shapes unchanged."""
    model = build_model(ModelSpec(depth=1, base_channels=4), Hierarchy.default())
    block = {"0.weight": None, "1.weight": None, "1.bias": None, "3.weight": None, "4.weight": None, "4.bias": None}
    want = {f"{p}.{k}" for p in ("stem", "down.0", "merge.0") for k in block}
    want |= {
        "up.0.weight",
        "up.0.bias",
        "fine_head.weight",
        "fine_head.bias",
        "coarse_heads.0.weight",
        "coarse_heads.0.bias",
    }
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == want
    assert shapes["stem.0.weight"] == (4, 1, 3, 3) and shapes["down.0.3.weight"] == (8, 8, 3, 3)
    assert shapes["up.0.weight"] == (8, 4, 2, 2) and shapes["merge.0.0.weight"] == (4, 8, 3, 3)
    assert isinstance(model, UNet) and model.plan.dims == 2


def test_z_patch_size_the_pooling_cannot_divide_lists_sizes_that_work(tmp_path):
    """A z side that is no multiple of the z pooling is an error naming the field and sides that do work."""
    plan = plan_unet(4, 3, VNC_SSTEM_NM)  # pools z once: z sides must be even
    with pytest.raises(
        ValueError, match=r"data\.patch_size \[5, 64, 64\]: z 5 is not a multiple of 2.*z sizes that work: 2, 4, 6, 8"
    ):
        check_patch_size(plan, [5, 64, 64])
    work = sizes_that_work(plan, [5, 100, 64])
    assert work[0] == [2, 4, 6, 8] and work[1] == [80, 96, 112, 128]
    for z in work[0]:
        check_patch_size(plan, [z, 64, 64])  # every listed size is accepted
    text = "data: {train: a, val: b, batch_size: 2, patch_size: [5, 64, 64]}\nrun: {max_steps: 1}\n"
    text += f"model: {{dims: 3, depth: 4, voxel_size: {VNC_SSTEM_NM}}}\n"
    with pytest.raises(SpecError, match=r"data\.patch_size \[5, 64, 64\]: z 5 .*z sizes that work: 2, 4, 6, 8"):
        load_spec(_write(tmp_path, text))


# ----------------------------------------------------------------------------------------------- spec
SPEC = "data: {{train: a, val: b, batch_size: 2, patch_size: {patch}}}\nrun: {{max_steps: 1}}\nmodel: {model}\n"


def _write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "patch, model, match",
    [
        ("128", "{dims: 3}", r"data\.patch_size 128 is a 2D side but model\.dims is 3; give a 3D patch \[z, y, x\]"),
        (
            "[16, 128, 128]",
            "{dims: 2}",
            r"data\.patch_size \[16, 128, 128\] is a 3D patch \[z, y, x\] but model\.dims is 2",
        ),
        ("[128, 128]", "{dims: 3}", r"data\.patch_size: \[128, 128\]: a list is a 3D patch \[z, y, x\]"),
        ("128", "{voxel_size: [50, 4, 4]}", r"model\.voxel_size: only the 3D network uses it \(model\.dims is 2\)"),
        ("[8, 64, 64]", "{dims: 3, voxel_size: [4, 4]}", r"model\.voxel_size: \[4.0, 4.0\]: give three sizes"),
        ("128", "{dims: 4}", r"model\.dims: Input should be 2 or 3"),
    ],
)
def test_patch_size_and_dims_mismatch_is_a_spec_error(tmp_path, patch, model, match):
    """dims 3 with a 2D patch_size (and the other mismatches) is a SpecError naming the field."""
    with pytest.raises(SpecError, match=match):
        load_spec(_write(tmp_path, SPEC.format(patch=patch, model=model)))


def test_3d_spec_loads_and_2d_default_is_unchanged(tmp_path):
    """A valid 3D spec is typed ([z, y, x], voxel size); a spec without model.dims is 2D with an int patch."""
    text = SPEC.format(patch="[8, 64, 64]", model=f"{{dims: 3, voxel_size: {VNC_SSTEM_NM}}}")
    spec = load_spec(_write(tmp_path, text))
    assert spec.model.dims == 3 and spec.data.patch_size == [8, 64, 64] and spec.model.voxel_size == VNC_SSTEM_NM
    spec = load_spec(_write(tmp_path, SPEC.format(patch="128", model="{}")))
    assert spec.model.dims == 2 and spec.data.patch_size == 128 and spec.model.voxel_size is None


# ------------------------------------------------------------------------------------------- 3D shards
VOXEL_NM = [40.0, 10.0, 10.0]  # z 4x coarser than xy: with depth 2 the plan pools xy only (divisor 1, 4, 4)
TRAIN_Z, VAL_Z = (0, 9), (11, 16)


@pytest.fixture(scope="module")
def stack3d(tmp_path_factory) -> Path:
    """A synthetic 16 x 64 x 64 stack as 3D shards: train z 0:9, val z 11:16, blocks of z slab x 32 x 32."""
    from hierseg.data import shards
    from hierseg.data.synth import synth_stack

    root = tmp_path_factory.mktemp("stack3d")
    image, label = synth_stack(5, 16, 64)
    np.save(root / "img.npy", image)
    np.save(root / "lab.npy", np.where(label < 0, 255, label).astype(np.uint8))
    slabs = f"train={TRAIN_Z[0]}:{TRAIN_Z[1]},val={VAL_Z[0]}:{VAL_Z[1]}"
    args = [*_stack_args(root), "--out", str(root / "s"), "--dims", "3", "--voxel-size", "40,10,10"]
    assert shards.main([*args, "--slabs", slabs, "--tile-size", "32", "--samples-per-shard", "2"]) == 0
    return root


def _stack_args(root: Path) -> list[str]:
    return ["--images", str(root / "img.npy"), "--labels", str(root / "lab.npy"), "--stack"]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _blocks(folder: Path) -> list[dict]:
    from hierseg.data.loader import iter_raw_samples, resolve_shards

    return [raw for url in resolve_shards(str(folder)) for raw in iter_raw_samples(url)]


def test_3d_shards_store_each_slab_voxel_once_with_voxel_size_and_per_slice_stats(stack3d):
    """Blocks tile the train slab exactly once; manifest: dims, voxel size, block shape, exact valid histogram."""
    from hierseg.data.loader import decode_sample

    image, label = np.load(stack3d / "img.npy"), np.load(stack3d / "lab.npy")
    m = _manifest(stack3d / "s" / "train")
    assert (m["dims"], m["voxel_size"], m["patch_shape"], m["min_block_shape"]) == (
        3,
        VOXEL_NM,
        [9, 32, 32],
        [9, 32, 32],
    )
    assert m["num_samples"] == 4 and len(m["shards"]) == 2 and m["build"]["voxel_size"] == VOXEL_NM
    cover = np.zeros((TRAIN_Z[1] - TRAIN_Z[0], 64, 64), np.int64)
    hist, uncertain = np.zeros(12, np.int64), 0
    for raw in _blocks(stack3d / "s" / "train"):
        meta = json.loads(raw["json"])
        z, y, x = meta["z"], meta["y"], meta["x"]
        x_CDHW, y_DHW = decode_sample(raw, {"mode": "zscore"}, 12)
        d, h, w = y_DHW.shape
        cover[z : z + d, y : y + h, x : x + w] += 1
        np.testing.assert_array_equal(
            np.where(y_DHW.numpy() < 0, 255, y_DHW.numpy()), label[z : z + d, y : y + h, x : x + w]
        )
        whole = image[z : z + d].astype(np.float64)  # z-score of each slice with its whole-slice statistics
        want = (image[z : z + d, y : y + h, x : x + w] - whole.mean((1, 2), keepdims=True)) / whole.std(
            (1, 2), keepdims=True
        )
        np.testing.assert_allclose(x_CDHW[0].numpy(), want, rtol=1e-5, atol=1e-5)
        hist += np.bincount(y_DHW[y_DHW >= 0].numpy(), minlength=12)
        uncertain += int((y_DHW < 0).sum())
    assert np.all(cover == 1)
    assert hist.tolist() == m["class_histogram"] and uncertain == m["num_uncertain_pixels"] > 0


def test_block_depth_cuts_slabs_and_2d_builds_keep_their_manifest(stack3d, tmp_path):
    """--block-depth 4 cuts the 9-slice slab into 3 blocks of 3; a 2D build of the stack writes no 3D field."""
    from hierseg.data import shards

    out = tmp_path / "b"
    args = [*_stack_args(stack3d), "--slabs", "train=0:9,val=11:16", "--tile-size", "64"]
    assert shards.main([*args, "--out", str(out), "--dims", "3", "--voxel-size", "40,10,10", "--block-depth", "4"]) == 0
    m = _manifest(out / "train")
    assert m["num_samples"] == 3 and m["patch_shape"] == [3, 64, 64]
    assert [json.loads(r["json"])["z"] for r in _blocks(out / "train")] == [0, 3, 6]
    assert shards.main([*args, "--out", str(tmp_path / "d2")]) == 0
    m2 = _manifest(tmp_path / "d2" / "train")
    assert not {"dims", "voxel_size", "min_block_shape"} & set(m2) and m2["patch_shape"] == [64, 64]
    assert list(m2["build"]) == ["tile_size", "axis", "context", "min_valid", "shard_mb", "samples_per_shard"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--dims", "3"], r"--dims 3 needs --voxel-size Z,Y,X"),
        (["--dims", "3", "--voxel-size", "40,10,10", "--context", "1"], r"--context 1 is 2.5D.*drop --context"),
        (["--voxel-size", "40,10,10"], r"--voxel-size and --block-depth describe 3D blocks; add --dims 3"),
    ],
)
def test_3d_build_flag_errors_are_one_clear_line(stack3d, tmp_path, capsys, extra, match):
    """make-shards with a missing/contradicting 3D flag exits 2 naming the flag and the fix; nothing written."""
    from hierseg.data import shards

    assert shards.main([*_stack_args(stack3d), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_3d_build_needs_a_stack_and_a_valid_voxel_size(stack3d, tmp_path, capsys):
    """--dims 3 without --stack, or a voxel size that is not three positive numbers, is refused."""
    from hierseg.data import shards

    base = ["--images", str(stack3d / "img.npy"), "--labels", str(stack3d / "lab.npy"), "--out", str(tmp_path / "o")]
    assert shards.main([*base, "--dims", "3", "--voxel-size", "40,10,10"]) == 2
    assert "--dims 3 stores blocks of a stack: add --stack" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shards.main([*base, "--stack", "--dims", "3", "--voxel-size", "40,10"])
    assert "give three positive sizes Z,Y,X in nm" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- 3D crops, augment
def test_3d_crop_position_comes_from_the_seed_one_draw_per_axis():
    """random_crop [z, y, x]: same seed same crop, positions spread over the block; small blocks pad uncertain."""
    from hierseg.data.loader import random_crop

    image = torch.arange(10 * 40 * 30, dtype=torch.float32).view(1, 10, 40, 30)
    label = torch.zeros(10, 40, 30, dtype=torch.int64)

    def origin(seed: int) -> tuple[int, ...]:
        crop, lab = random_crop(image, label, [4, 16, 16], torch.Generator().manual_seed(seed))
        assert crop.shape == (1, 4, 16, 16) and lab.shape == (4, 16, 16)
        flat = int(crop[0, 0, 0, 0])
        return flat // 1200, flat // 30 % 40, flat % 30

    origins = [origin(s) for s in range(60)]
    assert origins == [origin(s) for s in range(60)] and len(set(origins)) > 50
    assert all(0 <= z <= 6 and 0 <= y <= 24 and 0 <= x <= 14 for z, y, x in origins)
    assert {z for z, _, _ in origins} == set(range(7))  # every z start is reachable
    small, small_label = random_crop(image[:, :2, :8, :8], label[:2, :8, :8], [4, 16, 16], torch.Generator())
    assert small.shape == (1, 4, 16, 16) and int((small_label == -1).sum()) == 4 * 16 * 16 - 2 * 8 * 8


def test_3d_class_balanced_crop_centres_on_a_rare_voxel_and_dims_must_match():
    """Class-weighted 3D crops contain the rare class; a 2D patch on a 3D block names data.patch_size."""
    from hierseg.data.loader import random_crop

    label = torch.full((12, 60, 60), 2, dtype=torch.int64)
    label[9:11, 50:53, 4:7] = 10
    image, weights = torch.zeros(1, 12, 60, 60), torch.zeros(12)
    weights[10] = 1.0
    for seed in range(10):
        assert (random_crop(image, label, [4, 16, 16], torch.Generator().manual_seed(seed), weights)[1] == 10).any()
    with pytest.raises(ValueError, match=r"a 2D patch \[16, 16\] \(data\.patch_size\) cannot be cut from a 3D sample"):
        random_crop(image, label, 16, torch.Generator())


def test_3d_augment_flips_z_and_xy_and_keeps_label_values():
    """3D flips are the 8 axis-flip combinations (z included); with every transform, shapes and values hold."""
    from hierseg.data.augment import augment
    from hierseg.spec import AugmentSpec

    label = torch.randint(-1, 12, (4, 16, 16), generator=torch.Generator().manual_seed(0))
    image = label[None].float()
    flips_only = AugmentSpec(rot90=False, contrast=0, gamma=0, noise=0)
    combos = {
        dims: label.flip(dims) if dims else label for dims in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    }
    seen = set()
    for seed in range(40):
        img, lab = augment(image, label, flips_only, torch.Generator().manual_seed(seed))
        match = [d for d, want in combos.items() if torch.equal(lab, want)]
        assert match and torch.equal(img[0], lab.float())  # image and label move together
        seen.add(match[0])
    assert any(0 in d for d in seen) and any(0 not in d for d in seen)  # z is flipped sometimes, not always
    full = AugmentSpec(elastic=1.0, blur=1.0)
    for seed in range(3):
        img, lab = augment(torch.rand(1, 4, 16, 16), label, full, torch.Generator().manual_seed(seed))
        assert img.shape == (1, 4, 16, 16) and lab.shape == (4, 16, 16) and lab.dtype == torch.int64
        assert set(lab.unique().tolist()) <= set(label.unique().tolist())


def _stream_digests(
    data, steps: int, state: dict | None = None, skip: int = 0, seed: int = 7
) -> tuple[list[str], dict]:
    from tests.data_helpers import digest, train_loader

    stream = train_loader(data, rank=1, world_size=2, batch_size=2, seed=seed)
    if state is not None:
        stream.load_state_dict(state)
    it = iter(stream)
    out, saved = [], {}
    for i in range(steps):
        if i == skip:
            saved = json.loads(json.dumps(stream.state_dict()))
        x, y = next(it)
        assert x.shape == (2, 1, 4, 16, 16) and y.shape == (2, 4, 16, 16) and bool((y >= 0).flatten(1).any(1).all())
        out.append(digest(x) + digest(y))
    return out, saved


@pytest.mark.parametrize("num_workers", [0, 2])
def test_3d_crop_stream_is_deterministic_per_seed_and_resumes_exactly(stack3d, num_workers):
    """3D batches: same seed same stream; a stream resumed from its state gives the uninterrupted batches."""
    from hierseg.spec import AugmentSpec, DataSpec

    folder = str(stack3d / "s" / "train")
    data = DataSpec(train=folder, val=folder, batch_size=4, num_workers=num_workers, shuffle_buffer=3,
                    patch_size=[4, 16, 16], augment=AugmentSpec(elastic=0.5, blur=0.5))  # fmt: skip
    ref, state = _stream_digests(data, 8, skip=5)
    assert _stream_digests(data, 8)[0] == ref and len(set(ref)) == 8
    assert _stream_digests(data, 8, seed=8)[0] != ref
    resumed, _ = _stream_digests(data, 3, state=state)
    assert resumed == ref[5:]


def _val_rank3d(rank: int, world: int, val_dir: str) -> dict:
    """One gloo rank: its share of the 3D validation blocks through 3D evaluation, counts all-reduced once."""
    from hierseg.serve.evaluate import run_eval, summarize
    from hierseg.serve.infer import PredictOptions
    from hierseg.spec import DataSpec
    from tests.data_helpers import digest, val_loader

    data = DataSpec(train=val_dir, val=val_dir, batch_size=2, num_workers=1, patch_size=[4, 16, 16])
    blocks: list[str] = []

    def tapped():  # the blocks this rank scores, recorded as they pass
        for image, label in val_loader(data, rank=rank, world_size=world):
            blocks.append(digest(label))
            yield image, label

    torch.manual_seed(0)
    model = build_model(ModelSpec(dims=3, depth=2, base_channels=4, voxel_size=VOXEL_NM), Hierarchy.default())
    opts = PredictOptions(window=(4, 16, 16))
    metrics, _ = run_eval(model, tapped(), Hierarchy.default(), torch.device("cpu"), opts)
    local = metrics.fine.num_valid
    metrics.all_reduce()
    return {"blocks": blocks, "local": local, "summary": summarize(metrics, Hierarchy.default())}


def test_3d_validation_scores_every_valid_voxel_exactly_once_on_2_ranks(stack3d):
    """2 gloo ranks: each val block on exactly one rank; all-reduced val/num_valid = the manifest's histogram sum."""
    from tests.data_helpers import digest

    val_dir = stack3d / "s" / "val"
    every = sorted(digest(_decode(raw)[1]) for raw in _blocks(val_dir))
    results = run_ranks(2, _val_rank3d, str(val_dir))
    seen = sorted(b for r in results for b in r["blocks"])
    assert seen == every and len(every) == 4 and all(r["blocks"] for r in results)
    want = sum(_manifest(val_dir)["class_histogram"])
    assert sum(r["local"] for r in results) == want
    assert all(r["summary"]["val/num_valid"] == want for r in results)
    assert results[0]["summary"] == results[1]["summary"]


def _decode(raw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from hierseg.data.loader import decode_sample

    return decode_sample(raw, {"mode": "zscore"}, 12)


# ------------------------------------------------------------------------------------------ voxel size
def _spec3d(train: Path, val: Path, tmp_path: Path, **model) -> dict:
    return {
        "data": {"train": str(train), "val": str(val), "batch_size": 2, "num_workers": 0, "patch_size": [4, 16, 16]},
        "model": {"dims": 3, "depth": 2, "base_channels": 4, **model},
        "run": {"num_workers": 1, "max_steps": 1, "storage_path": str(tmp_path / "runs")},
    }


def test_voxel_size_resolves_from_spec_then_manifest_then_isotropic(stack3d, tmp_path):
    """model.voxel_size wins, else the training manifest's fills it in, else it stays null (isotropic)."""
    import shutil

    from hierseg.spec import validate_spec
    from hierseg.train.launch import resolve_voxel_size

    train, val = stack3d / "s" / "train", stack3d / "s" / "val"
    resolved = resolve_voxel_size(validate_spec(_spec3d(train, val, tmp_path)))
    assert resolved.model.voxel_size == VOXEL_NM
    assert resolve_voxel_size(validate_spec(_spec3d(train, val, tmp_path, voxel_size=[8, 8, 8]))).model.voxel_size == [
        8,
        8,
        8,
    ]
    bare = tmp_path / "bare"
    shutil.copytree(train, bare)
    m = _manifest(bare)
    del m["voxel_size"]
    (bare / "manifest.json").write_text(json.dumps(m))
    assert resolve_voxel_size(validate_spec(_spec3d(bare, val, tmp_path))).model.voxel_size is None


def test_patch_size_is_checked_against_the_resolved_plan(stack3d, tmp_path):
    """z 2 is fine for the manifest's plan (xy-only pooling) but not for an isotropic one: checked at preflight."""
    from hierseg.spec import validate_spec
    from hierseg.train.launch import resolve_voxel_size

    raw = _spec3d(stack3d / "s" / "train", stack3d / "s" / "val", tmp_path)
    raw["data"]["patch_size"] = [2, 16, 16]
    spec = validate_spec(raw)  # no voxel size yet: the spec does not guess the plan
    assert resolve_voxel_size(spec).model.voxel_size == VOXEL_NM
    iso = spec.model_copy(update={"model": spec.model.model_copy(update={"voxel_size": None})})
    iso = iso.model_copy(update={"data": iso.data.model_copy(update={"train": str(tmp_path / "none")})})
    with pytest.raises(
        ValueError, match=r"data\.patch_size \[2, 16, 16\]: z 2 is not a multiple of 4.*isotropic voxels"
    ):
        resolve_voxel_size(iso)


# -------------------------------------------------------------------------------------- preflight errors
def _train_main(spec: dict, tmp_path: Path, capsys) -> str:
    from hierseg.train.cli import main
    from tests.train_utils import write_spec

    assert main(["--spec", str(write_spec(spec, tmp_path / "s.yaml")), "--launcher", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_3d_spec_with_2d_shards_is_a_preflight_error_with_the_fix(tmp_path, capsys):
    """model.dims 3 on 2D shards exits 2 naming data.train and how to build 3D shards; nothing trains."""
    from tests.data_helpers import build, write_pairs

    write_pairs(tmp_path / "p", 3, size=64)
    assert build(tmp_path / "p", tmp_path / "s2", "--val-frac", "0.34") == 0
    capsys.readouterr()  # the build's own output
    err = _train_main(_spec3d(tmp_path / "s2" / "train", tmp_path / "s2" / "val", tmp_path), tmp_path, capsys)
    assert "data.train: " in err and "holds 2D slices/tiles but model.dims is 3" in err
    assert "--stack --dims 3 --voxel-size Z,Y,X" in err
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))


def test_2d_spec_with_3d_shards_gives_the_2d_rebuild_command(stack3d, tmp_path, capsys):
    """model.dims 2 on 3D shards exits 2 naming data.train, model.dims: 3 and the make-shards command without --dims."""
    spec = _spec3d(stack3d / "s" / "train", stack3d / "s" / "val", tmp_path)
    spec["model"] = {"depth": 2, "base_channels": 4}
    spec["data"]["patch_size"] = 32
    err = _train_main(spec, tmp_path, capsys)
    assert "data.train: " in err and "holds 3D blocks but model.dims is 2; set model.dims: 3" in err
    rebuild = err.split("rebuild 2D shards with: ")[1]
    assert rebuild.startswith("hierseg make-shards ") and "--dims" not in rebuild and "--voxel-size" not in rebuild
    assert rebuild.endswith("--overwrite")


def test_3d_patch_larger_than_the_stack_is_a_preflight_error_with_the_sizes(stack3d, tmp_path, capsys):
    """A z patch of 16 on a 9-slice training slab exits 2 naming data.patch_size and the block [9, 32, 32]."""
    spec = _spec3d(stack3d / "s" / "train", stack3d / "s" / "val", tmp_path)
    spec["data"]["patch_size"] = [16, 32, 32]
    err = _train_main(spec, tmp_path, capsys)
    assert "data.train: data.patch_size [16, 32, 32] is larger than the largest 3D block" in err
    assert "[9, 32, 32]" in err


# --------------------------------------------------------------------------------------- 3D end to end
@pytest.fixture(scope="module")
def run3d(stack3d, tmp_path_factory):
    """One tiny 3D training through jobs/train.py --launcher local (6 steps, 2 evaluations); its outputs."""
    from tests.train_utils import tiny_spec, train_cli, write_spec

    work = tmp_path_factory.mktemp("run3d")
    spec = tiny_spec(stack3d / "s", work, data={"patch_size": [4, 16, 16], "batch_size": 2},
                     model={"dims": 3, "base_channels": 4, "depth": 2},
                     run={"num_workers": 1, "max_steps": 6, "eval_every": 3, "log_every": 1},
                     tracking={"registered_model": "tiny3d"})  # fmt: skip
    spec["data"].pop("synthetic")
    out = train_cli(write_spec(spec, work / "s.yaml"), "--launcher", "local")
    return spec, out, work / "runs" / "t"


def test_3d_local_run_finishes_with_a_finite_logged_loss(run3d):
    """A 3D spec trains end to end: exit 0, one FINISHED MLflow run, finite train/loss_fine at every logged step."""
    from mlflow.tracking import MlflowClient

    from tests.train_utils import mlflow_runs

    spec, out, _ = run3d
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = mlflow_runs(spec["tracking"]["uri"])
    assert run.info.status == "FINISHED"
    history = MlflowClient(spec["tracking"]["uri"]).get_metric_history(run.info.run_id, "train/loss_fine")
    losses = [h.value for h in sorted(history, key=lambda h: h.step)]
    assert len(losses) == 6 and all(math.isfinite(v) and v > 0 for v in losses)
    assert "val/fine/miou" in run.data.metrics and "val/coarse/iou/non_tissue" in run.data.metrics


def test_3d_run_scores_every_val_voxel_once(run3d, stack3d):
    """val/num_valid of the 3D run equals the validation manifest's valid voxels (each block tiled once)."""
    from tests.train_utils import mlflow_runs

    spec, out, _ = run3d
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = mlflow_runs(spec["tracking"]["uri"])
    assert run.data.metrics["val/num_valid"] == sum(_manifest(stack3d / "s" / "val")["class_histogram"])


def test_3d_checkpoint_spec_carries_the_manifest_voxel_size_and_rebuilds_the_network(run3d):
    """The manifest's voxel size is in the saved spec; model_from_state rebuilds that plan."""
    from hierseg.serve.pyfunc import model_from_state
    from hierseg.train.checkpoint import load_state

    _, out, run_dir = run3d
    assert out.returncode == 0, out.stderr[-3000:]
    for state in (load_state(run_dir / "best"), load_state(sorted(run_dir.glob("checkpoint_*"))[-1])):
        assert state["spec"]["model"]["voxel_size"] == VOXEL_NM and state["patch_size"] == [4, 16, 16]
        model, _ = model_from_state(state)
        assert model.plan == plan_unet(2, 3, VOXEL_NM) != plan_unet(2, 3, None)


@pytest.mark.usefixtures("one_torch_thread")
def test_3d_run_registers_a_pyfunc_that_predicts_the_fine_labels_hierseg_predict_writes(run3d, stack3d, tmp_path):
    """models:/tiny3d@alias of the 3D run: [D, H, W] signature, card; predict(volume) = predict CLI's fine_labels."""
    import mlflow
    import tifffile
    from mlflow.tracking import MlflowClient

    from hierseg.serve.infer import main

    spec, out, run_dir = run3d
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model logged: models:/tiny3d/1" in out.stdout
    uri = spec["tracking"]["uri"]
    MlflowClient(uri).set_registered_model_alias("tiny3d", "champion", "1")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny3d@champion")
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, -1, -1)
    assert pyfunc.metadata.metadata["hierseg"]["patch_size"] == [4, 16, 16]
    volume = np.load(stack3d / "img.npy")
    got = pyfunc.predict(volume.astype(np.float32))
    argv = ["--model", str(run_dir / "best"), "--input", str(stack3d / "img.npy"), "--output", str(tmp_path / "p")]
    assert main([*argv, "--quiet"]) == 0
    want = tifffile.imread(tmp_path / "p" / "fine_labels.tif")
    assert got.dtype == np.int16 and got.shape == volume.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.usefixtures("one_torch_thread")
def test_predict_cli_writes_a_3d_checkpoint_into_ome_zarr(run3d, stack3d, tmp_path, capsys):
    """predict a 3D checkpoint into out.ome.zarr: exit 0, one line, NGFF zyx + voxel size, values = one-shot windows."""
    from hierseg.serve.infer import block_input, decide, default_options, load_predictor, main, predict_probs

    _, out, run_dir = run3d
    assert out.returncode == 0, out.stderr[-3000:]
    dst = tmp_path / "o.ome.zarr"
    argv = ["--model", str(run_dir / "best"), "--input", str(stack3d / "img.npy"), "--output", str(dst), "--quiet"]
    assert main([*argv, "--voxel-size", "40,10,10"]) == 0
    said = capsys.readouterr().out.strip()
    assert "\n" not in said and "wrote fine_labels" in said and "voxel size 40,10,10" in said
    predictor = load_predictor(str(run_dir / "best"))
    opts = default_options(predictor)
    assert (opts.tile, opts.overlap) == ((4, 16, 16), (1, 2, 2))  # the training patch; 1/8, z at least 1 slice
    volume = np.load(stack3d / "img.npy")
    probs = predict_probs(predictor.model, block_input(volume, predictor.normalization, 1), opts)
    want = decide(probs, predictor.hierarchy.lut(), opts, predictor.label_space)
    nodes = _ome_nodes(dst)
    assert [a["name"] for a in nodes[""].metadata["axes"]] == ["z", "y", "x"]
    assert nodes[""].metadata["coordinateTransformations"] == [[{"type": "scale", "scale": VOXEL_NM}]]
    got = {name: np.asarray(a[...]) for name, a in _arrays(dst).items()}
    assert set(got) == set(want) and got["fine_labels"].shape == volume.shape
    for name, value in want.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(got[name], value.astype(np.float32), atol=1e-5, rtol=0, err_msg=name)
        else:
            assert np.array_equal(got[name], value), name


# --------------------------------------------------------------------------------------------- 3D prediction
@pytest.fixture
def one_torch_thread():
    """Predict on one torch thread, as each Ray worker does (CPU kernels round differently with 2); tiny 3D
    windows also run many times faster on one thread than on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ome_nodes(path: Path) -> dict:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return {Path(n.zarr.path).relative_to(path).as_posix().strip("."): n for n in Reader(parse_url(str(path)))()}


def _arrays(store: Path) -> dict:
    import zarr

    from hierseg.serve.stackio import zarr_output_arrays

    return zarr_output_arrays(zarr.open_group(str(store), mode="r"))


class Pointwise(nn.Module):
    """A 3D model of 1x1x1 convolutions: each voxel's output depends on that voxel only, so any tiling and
    blending must give exactly the whole volume's probabilities (the blend weights sum out)."""

    plan = plan_unet(0, 3)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.fine, self.coarse = nn.Conv3d(1, 8, 1), nn.Conv3d(8, 12, 1), nn.Conv3d(8, 5, 1)

    def forward(self, x):
        h = torch.tanh(self.hidden(x)) * 4
        return self.fine(h), [self.coarse(h)]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "tile, overlap",
    [((4, 16, 20), (1, 5, 3)), ((3, 17, 16), (0, 0, 6)), ((16, 16, 16), (2, 4, 4))],  # the last: z longer than D
)
def test_3d_tiled_prediction_equals_whole_volume_for_a_pointwise_model(tile, overlap):
    """Blended non-dividing [z, y, x] windows (z longer than the volume: cut) = the whole volume's output, 1e-6."""
    from hierseg.serve.infer import PredictOptions, predict_probs, tile_grid

    model = Pointwise().eval()
    x_CDHW = torch.randn(1, 11, 37, 29, generator=torch.Generator().manual_seed(1))
    opts = PredictOptions(tile=tile, overlap=overlap, batch=3)
    window_S, starts = tile_grid(11, 37, 29, opts)
    assert window_S == tuple(min(t, n) for t, n in zip(tile, (11, 37, 29))) and len(starts) > 8
    with torch.no_grad():
        fine, (coarse,) = model(x_CDHW[None])
    whole = torch.cat([fine.softmax(1), coarse.sigmoid()], 1)[0]
    torch.testing.assert_close(predict_probs(model, x_CDHW, opts), whole, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def model3d(tmp_path_factory) -> Path:
    """An untrained 3D checkpoint (heads sharpened: near-ties everywhere), planned for 40 x 10 x 10 nm voxels."""
    from tests.train_utils import untrained_checkpoint

    folder = tmp_path_factory.mktemp("model3d") / "m"
    return untrained_checkpoint(folder, 0, data={"patch_size": [3, 16, 16]}, dims=3, depth=2, base_channels=4,
                                voxel_size=VOXEL_NM)  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
def test_a_window_covering_the_volume_is_one_forward_pass(model3d):
    """A 3D U-Net window covering the volume (cut to it) gives exactly the whole volume's forward pass."""
    from hierseg.serve.infer import PredictOptions, load_predictor, predict_probs

    model = load_predictor(str(model3d)).model
    x_CDHW = torch.randn(1, 2, 20, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fine, (coarse,) = model(x_CDHW[None])
    got = predict_probs(model, x_CDHW, PredictOptions(tile=(8, 32, 32), overlap=(1, 4, 4)))
    assert torch.equal(got, torch.cat([fine.softmax(1), coarse.sigmoid()], 1)[0])


class RecordingStack:
    """A [Z, H, W] reader (len, shape, [z0:z1]) that records every z range asked for and the furthest read."""

    def __init__(self, volume: np.ndarray):
        self.volume, self.shape, self.reads = volume, volume.shape, []

    def __len__(self) -> int:
        return len(self.volume)

    def __getitem__(self, z: slice) -> np.ndarray:
        assert isinstance(z, slice), "a 3D model reads z slabs, never single slices"
        self.reads.append((z.start, z.stop))
        return self.volume[z]


@pytest.mark.usefixtures("one_torch_thread")
def test_z_slab_streamed_prediction_equals_one_shot_and_reads_bounded_z_ranges(model3d):
    """z-slab streaming reads each slice once, <= 2 windows ahead; = one-shot (labels exact, probs 1e-5)."""
    from hierseg.serve.infer import PredictOptions, block_input, decide, load_predictor, predict_probs, predict_volume

    predictor = load_predictor(str(model3d))
    volume = np.random.default_rng(3).integers(0, 200, (13, 32, 28)).astype(np.uint8)
    opts = PredictOptions(tile=(3, 16, 16), overlap=(1, 4, 4), batch=4)
    stack, outs, ahead = RecordingStack(volume), [], []
    for z, out in enumerate(predict_volume(predictor, stack, opts)):
        ahead.append(max(stop for _, stop in stack.reads) - z)
        outs.append(out)
    assert [a for a, _ in stack.reads] == [0, *(b for _, b in stack.reads[:-1])] and stack.reads[-1][1] == 13
    assert max(b - a for a, b in stack.reads) <= 2 * 3 and max(ahead) <= 2 * 3 and len(stack.reads) > 4
    probs = predict_probs(predictor.model, block_input(volume, predictor.normalization, 1), opts)
    want = decide(probs, predictor.hierarchy.lut(), opts, predictor.label_space)
    for name, value in want.items():
        got = np.stack([o[name] for o in outs], axis=1 if name == "coarse_prob" else 0)
        if value.dtype.kind == "f":
            np.testing.assert_allclose(got.astype(np.float32), value.astype(np.float32), atol=1e-5, err_msg=name)
        else:
            assert np.array_equal(got, value), name
    assert len(np.unique(want["fine_labels"])) > 3  # near-ties: a numeric difference would show


SHAPE3D, BLOCK3D = (7, 40, 44), "4,24,30"  # divides no side: 2 x 2 x 2 blocks, cut at every far edge
FLAGS3D = ["--tile", "3,16,16", "--overlap", "1,4,4", "--batch", "3", "--device", "cpu", "--quiet"]


@pytest.mark.usefixtures("ray_cluster", "one_torch_thread")
def test_blockwise_3d_on_ray_equals_single_process_3d_predict(model3d, tmp_path):
    """predict --ray of a 3D model (8 blocks, 2 workers) = single-process 3D predict (labels exact, probs 1e-5)."""
    import zarr

    from hierseg.serve.blockwise import predict_blockwise
    from hierseg.serve.infer import main, parse_args
    from tests.test_blockwise import _assert_same

    ramp = np.linspace(0, 90, SHAPE3D[2])[None, None, :] + 8 * np.arange(SHAPE3D[0])[:, None, None]
    vol = (np.random.default_rng(4).integers(0, 120, SHAPE3D) + ramp).astype(np.uint8)  # z-score matters
    zarr.create_array(store=str(tmp_path / "vol.zarr"), data=vol, chunks=(2, 16, 16))
    base = ["--model", str(model3d), "--input", str(tmp_path / "vol.zarr"), *FLAGS3D]
    assert main([*base, "--output", str(tmp_path / "one.zarr")]) == 0
    args = parse_args([*base, "--output", str(tmp_path / "bw.zarr"), "--ray", "--block", BLOCK3D, "--halo", "1,4,4"])
    result = predict_blockwise(args)
    assert (result.blocks, result.computed, result.voxels) == (8, 8, int(np.prod(SHAPE3D)))
    _assert_same(tmp_path / "bw.zarr", tmp_path / "one.zarr", ("fine_labels", "fine_confidence", "coarse_prob",
                                                               "fallback"))  # fmt: skip
    root = zarr.open_group(str(tmp_path / "bw.zarr"), mode="r")
    assert root["fine_labels"].chunks == (4, 24, 30) and root.attrs["hierseg_blockwise"]["tile"] == [3, 16, 16]
    assert len(np.unique(root["fine_labels"][...])) > 3


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tile", "3,8,8"], "--tile 3,8,8 --overlap 1,1,1 --batch 8: a 3D window needs y and x sides >= 16"),
        (["--tile", "3,16"], "--tile 3,16: give one integer, or Z,Y,X"),
        (["--overlap", "3,4,4"], "each overlap in [0, its side)"),
        (["--ray", "--block", BLOCK3D, "--halo", "4,4"],
         "--halo 0,4,4 is smaller than the window overlap 1,2,2 in z: the 3D windows blend over it; give at least "
         "--halo 1,4,4"),
        (["--ray", "--block", BLOCK3D, "--halo", "0,1,2"], "in z,y: the 3D windows"),
    ],
)  # fmt: skip
def test_bad_3d_window_flags_are_one_line_errors(model3d, tmp_path, capsys, extra, message):
    """Bad 3D --tile/--overlap, a --halo under the overlap in z: exit 2, one line with flag and fix, no output."""
    from hierseg.serve.infer import main

    zarr_in = tmp_path / "vol.npy"
    np.save(zarr_in, np.zeros((4, 40, 44), np.uint8))
    out = tmp_path / "o.zarr"
    assert main(["--model", str(model3d), "--input", str(zarr_in), "--output", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists(), err


def test_a_2d_model_refuses_a_3d_window_and_keeps_its_defaults(tmp_path, capsys):
    """A 2D model with --tile Z,Y,X exits 2 naming the flag and one side; its default windows stay int."""
    from hierseg.serve.infer import default_options, load_predictor, main
    from tests.train_utils import untrained_checkpoint

    ckpt = untrained_checkpoint(tmp_path / "m2", 0)
    np.save(tmp_path / "x.npy", np.zeros((2, 40, 40), np.uint8))
    argv = ["--model", str(ckpt), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, "--tile", "3,48,48"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tile 3,48,48 is a 3D window but the model is 2D; give one integer (e.g. --tile 48)" in err
    opts = default_options(load_predictor(str(ckpt)))
    assert (opts.tile, opts.overlap) == (64, 8)
