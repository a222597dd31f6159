"""3D (issue 12, first slice): spec, planned 3D U-Net, loss and metrics on [B, C, D, H, W]; 2D unchanged."""

from __future__ import annotations

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


def test_3d_spec_at_the_trainer_is_one_clear_line(tmp_path, capsys):
    """`hierseg train` on a 3D spec exits 2 with 'not yet supported: 3D shards' before touching storage."""
    from hierseg.train.cli import main

    storage = tmp_path / "runs"
    text = SPEC.format(patch="[16, 64, 64]", model="{dims: 3}")  # isotropic default: every side a multiple of 16
    text = text.replace("run: {max_steps: 1}", f"run: {{max_steps: 1, storage_path: {storage}}}")
    assert main(["--spec", str(_write(tmp_path, text)), "--launcher", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not yet supported: 3D shards" in err and "\n" not in err
    assert not storage.exists()
