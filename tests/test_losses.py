import pytest
import torch
from torch import nn

from hierseg.labels import Hierarchy
from hierseg.losses import hierarchical_loss
from tests.dist_utils import TinyNet, run_ranks
from tests.plan_reference import PLAN_LUT, compute_losses


def _batch(b, h, w, uncertain=0.2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits_fine = torch.randn(b, 12, h, w, generator=g, dtype=dtype)
    logits_coarse = torch.randn(b, 5, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, 12, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < uncertain] = -1
    return logits_fine, logits_coarse, y


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 5), (4, 32, 16), (3, 64, 64)])
@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("uncertain", [0.0, 0.3, 0.9])
def test_matches_plan_formula(shape, lam, uncertain):
    """Single process: loss, loss_fine, loss_coarse equal the plan's compute_losses (1e-6)."""
    lf, lc, y = _batch(*shape, uncertain=uncertain, seed=hash((shape, uncertain)) % 1000, dtype=torch.float32)
    out = hierarchical_loss(lf, lc, y, Hierarchy.default().lut(), lambda_coarse=lam)
    ref = compute_losses(lf, lc, y, lambda_coarse=lam)
    for got, want in zip(out[:3], ref):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=1e-6)
    assert out.num_valid.dtype == torch.int64 and int(out.num_valid) == int((y != -1).sum())


def test_all_uncertain_batch_is_zero_with_zero_gradient():
    """An all-uncertain batch: loss terms are finite zeros and every gradient is exactly 0."""
    lf, lc, _ = _batch(2, 8, 8)
    lf.requires_grad_(True)
    lc.requires_grad_(True)
    y = torch.full((2, 8, 8), -1)
    out = hierarchical_loss(lf, lc, y, PLAN_LUT)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.loss_fine.item() == 0.0 and out.loss_coarse.item() == 0.0
    assert torch.isfinite(out.loss)
    assert torch.count_nonzero(lf.grad) == 0 and torch.count_nonzero(lc.grad) == 0
    assert int(out.num_valid) == 0


def test_uncertain_pixels_get_exactly_zero_gradient_in_both_heads():
    """Gradient at uncertain pixels is exactly zero in fine and coarse logits; nonzero elsewhere."""
    lf, lc, y = _batch(2, 16, 16, uncertain=0.4)
    lf.requires_grad_(True)
    lc.requires_grad_(True)
    hierarchical_loss(lf, lc, y, PLAN_LUT).loss.backward()
    unc = (y == -1).unsqueeze(1)
    assert torch.all(lf.grad.masked_select(unc.expand_as(lf)) == 0)
    assert torch.all(lc.grad.masked_select(unc.expand_as(lc)) == 0)
    assert torch.all(lf.grad.abs().sum(1)[y != -1] > 0)


def test_gradient_matches_plan_formula():
    """Autograd gradient of hierarchical_loss equals that of the plan's formula (float64)."""
    lf, lc, y = _batch(2, 12, 10, uncertain=0.3)
    grads = []
    for f in (lambda a, b: hierarchical_loss(a, b, y, PLAN_LUT).loss, lambda a, b: compute_losses(a, b, y)[0]):
        a, b = lf.clone().requires_grad_(True), lc.clone().requires_grad_(True)
        f(a, b).backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)


def test_multi_level_sums_weighted_terms():
    """Several levels: loss = fine + sum(lambda_l * coarse_l); loss_coarse holds one value per level."""
    h = Hierarchy.from_config(
        {
            "levels": [
                Hierarchy.default().to_config()["levels"][0],
                {"name": "all", "groups": {"tissue": list(range(12))}},
            ]
        }
    )
    lf, lc, y = _batch(2, 8, 8)
    lc2 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = hierarchical_loss(lf, [lc, lc2], y, h.luts(), lambda_coarse=[0.2, 0.5])
    single = hierarchical_loss(lf, lc, y, PLAN_LUT, lambda_coarse=0.0)
    second = compute_losses(lf, lc2, y, lut=h.lut(1), lambda_coarse=1.0)[2]
    assert out.loss_coarse.shape == (2,)
    torch.testing.assert_close(
        out.loss, single.loss + 0.2 * out.loss_coarse[0] + 0.5 * second.float(), rtol=1e-6, atol=1e-6
    )


def test_bf16_autocast_accumulates_in_fp32():
    """Under bf16 logits the terms are fp32 and close to the fp32 computation."""
    lf, lc, y = _batch(2, 32, 32, dtype=torch.float32)
    out = hierarchical_loss(lf.bfloat16(), lc.bfloat16(), y, PLAN_LUT)
    ref = hierarchical_loss(lf.bfloat16().float(), lc.bfloat16().float(), y, PLAN_LUT)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- distributed
UNCERTAIN_PER_RANK = (0.05, 0.8, 1.0)  # very different valid counts; the last rank has none


def _rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 1, 10, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 12, (2, 10, 12), generator=g)
    y[torch.rand(2, 10, 12, generator=g) < UNCERTAIN_PER_RANK[rank]] = -1
    return x, y


def _ddp_rank(rank, world):
    net = nn.parallel.DistributedDataParallel(TinyNet().double())
    x, y = _rank_batch(rank)
    out = hierarchical_loss(*net(x), y, PLAN_LUT, lambda_coarse=0.3)
    out.loss.backward()
    grads = [p.grad.clone() for p in net.module.parameters()]
    return grads, out.loss_fine, out.loss_coarse, out.num_valid


def test_ddp_gradient_equals_single_process_on_concatenated_batch():
    """3 gloo ranks (one all uncertain) under DDP: gradients equal one process on the whole batch."""
    results = run_ranks(3, _ddp_rank)
    xs, ys = zip(*(_rank_batch(r) for r in range(3)))
    net = TinyNet().double()
    x, y = torch.cat(xs), torch.cat(ys)
    ref = hierarchical_loss(*net(x), y, PLAN_LUT, lambda_coarse=0.3)
    ref.loss.backward()
    ref_grads = [p.grad for p in net.parameters()]
    for grads, loss_fine, loss_coarse, num_valid in results:
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
        assert int(num_valid) == int((y != -1).sum())
        torch.testing.assert_close(loss_fine, ref.loss_fine, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(loss_coarse, ref.loss_coarse, atol=1e-6, rtol=1e-6)
    # reported terms are bit-identical on every rank
    assert all(torch.equal(results[0][1], r[1]) and torch.equal(results[0][2], r[2]) for r in results)
