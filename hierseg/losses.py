"""Masked hierarchical loss, exact across ranks.

For one batch the plan's loss is::

    loss = sum_valid CE / N  +  lambda * sum_valid (sum_k BCE_k / K) / N

with ``N`` the number of valid (non-uncertain) pixels. Under data parallelism we want the gradient
of that loss over the *global* batch (all ranks together). Each rank therefore computes its local
*sums*, the valid count ``N`` is all-reduced as an int64, and the rank's loss is scaled by ``W / N``
so that DDP's gradient averaging (divide by ``W``) yields exactly ``d(global sum / N)``. A rank with
no valid pixel contributes a zero sum (and zero gradient) but still takes part in the collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hierseg.labels import IGNORE_INDEX


class LossTerms(NamedTuple):
    loss: torch.Tensor
    """What to call ``.backward()`` on: this rank's sums scaled for DDP's gradient averaging."""
    loss_fine: torch.Tensor
    """Global fine term (detached, identical on every rank)."""
    loss_coarse: torch.Tensor
    """Global coarse term (detached); shape ``[L]`` when several levels are given."""
    num_valid: torch.Tensor
    """Global number of valid pixels (int64)."""


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in fp32 (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _world(process_group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class _MaskedCoarseBCESum(torch.autograd.Function):
    """``sum_valid sum_k BCE(x_k, lut[y]_k) / K`` with a hand-written backward.

    Autograd through ``binary_cross_entropy_with_logits`` makes several full passes over the
    ``[B, K, H, W]`` logits and needs a materialised target; here the forward is one softplus pass
    plus a gather of the target channel, and the backward is ``(sigmoid(x) - t) * valid / K`` built
    in place. For a partition (each fine class in exactly one group, as in the plan) the target is
    a single channel per pixel, so no ``[B, K, H, W]`` target is ever built.
    """

    @staticmethod
    def forward(ctx, x_BKHW, y_safe_BHW, valid_BHW, lut_CK):  # type: ignore[override]
        num_groups = lut_CK.shape[1]
        w_B1HW = valid_BHW.unsqueeze(1).to(x_BKHW.dtype)
        softplus_sum = (F.softplus(x_BKHW).sum(1, keepdim=True) * w_B1HW).sum()
        group_B1HW = _partition_index(lut_CK)
        if group_B1HW is not None:
            group_B1HW = group_B1HW.to(y_safe_BHW.device)[y_safe_BHW].unsqueeze(1)
            xt_sum = (x_BKHW.gather(1, group_B1HW) * w_B1HW).sum()
        else:
            target = lut_CK.to(device=x_BKHW.device, dtype=x_BKHW.dtype)[y_safe_BHW].permute(0, 3, 1, 2)
            xt_sum = ((x_BKHW * target).sum(1, keepdim=True) * w_B1HW).sum()
        ctx.save_for_backward(x_BKHW, y_safe_BHW, w_B1HW, lut_CK)
        ctx.group_index = group_B1HW
        return (softplus_sum - xt_sum) / num_groups

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_BKHW, y_safe_BHW, w_B1HW, lut_CK = ctx.saved_tensors
        scale_B1HW = w_B1HW * (grad_out / lut_CK.shape[1])
        grad = torch.sigmoid(x_BKHW).mul_(scale_B1HW)
        if ctx.group_index is not None:
            grad.scatter_add_(1, ctx.group_index, -scale_B1HW)
        else:
            target = lut_CK.to(device=x_BKHW.device, dtype=x_BKHW.dtype)[y_safe_BHW].permute(0, 3, 1, 2)
            grad.sub_(target * scale_B1HW)
        return grad, None, None, None


def _partition_index(lut_CK: torch.Tensor) -> torch.Tensor | None:
    """Group index per fine class when every class is in exactly one group, else ``None``."""
    if not bool((lut_CK.sum(1) == 1).all()):
        return None
    return lut_CK.argmax(1)


def coarse_bce_sum(
    logits_coarse_BKHW: torch.Tensor, y_safe_BHW: torch.Tensor, valid_BHW: torch.Tensor, lut_CK: torch.Tensor
) -> torch.Tensor:
    """Sum over valid pixels of the per-pixel BCE averaged over the K channels (fp32 or fp64)."""
    assert logits_coarse_BKHW.shape[1] == lut_CK.shape[1], "coarse head width must match the LUT"
    return _MaskedCoarseBCESum.apply(_acc(logits_coarse_BKHW), y_safe_BHW, valid_BHW, lut_CK)


def hierarchical_loss(
    logits_fine: torch.Tensor,
    logits_coarse: torch.Tensor | Sequence[torch.Tensor],
    y_fine: torch.Tensor,
    coarse_lut: torch.Tensor | Sequence[torch.Tensor],
    lambda_coarse: float | Sequence[float] = 0.2,
    process_group: dist.ProcessGroup | None = None,
) -> LossTerms:
    """Masked CE + lambda * masked BCE, normalised by the global valid-pixel count.

    Args:
        logits_fine: ``[B, 12, H, W]`` fine logits.
        logits_coarse: ``[B, K, H, W]`` coarse logits, or one such tensor per hierarchy level.
        y_fine: ``[B, H, W]`` integer labels in ``0..11`` or ``IGNORE_INDEX``.
        coarse_lut: ``[12, K]`` table (or one per level) mapping fine class -> group membership.
        lambda_coarse: weight of the coarse term (or one per level).
        process_group: group to reduce over when ``torch.distributed`` is initialised
            (default: the world group). Without it the loss is the single-process one.

    Uncertain pixels get exactly zero loss and zero gradient in every head. A batch (or a rank)
    with no valid pixel gives a finite zero and zero gradients.
    """
    multi = not isinstance(logits_coarse, torch.Tensor)
    coarse_list = list(logits_coarse) if multi else [logits_coarse]
    luts = list(coarse_lut) if not isinstance(coarse_lut, torch.Tensor) else [coarse_lut]
    lambdas = (
        [float(lambda_coarse)] * len(coarse_list) if isinstance(lambda_coarse, (int, float)) else list(lambda_coarse)
    )
    assert len(coarse_list) == len(luts) == len(lambdas), "one LUT and one lambda per coarse head"
    assert logits_fine.dim() == 4 and y_fine.dim() == 3, "logits [B,C,H,W], labels [B,H,W]"

    y = y_fine.long()
    valid_BHW = y != IGNORE_INDEX
    y_safe_BHW = torch.where(valid_BHW, y, 0)
    num_valid = valid_BHW.sum(dtype=torch.int64)

    # CE's ignore_index already gives zero loss and zero gradient to uncertain pixels; fp32 sums.
    fine_sum = F.cross_entropy(_acc(logits_fine), y, ignore_index=IGNORE_INDEX, reduction="sum")
    coarse_sums = torch.stack(
        [coarse_bce_sum(lc, y_safe_BHW, valid_BHW, lut) for lc, lut in zip(coarse_list, luts, strict=True)]
    )
    weights = torch.tensor(lambdas, dtype=fine_sum.dtype, device=fine_sum.device)
    local_sum = fine_sum + (weights * coarse_sums).sum()

    world = _world(process_group)
    detached_sums = torch.cat([fine_sum.detach().reshape(1), coarse_sums.detach()]).double()
    if world > 1:
        dist.all_reduce(num_valid, group=process_group)
        dist.all_reduce(detached_sums, group=process_group)
    denom = num_valid.clamp_min(1).double()  # float64: exact for any realistic pixel count

    loss = local_sum * (world / denom).to(local_sum.dtype)
    global_terms = (detached_sums / denom).to(local_sum.dtype)
    loss_coarse = global_terms[1:] if multi else global_terms[1]
    return LossTerms(loss=loss, loss_fine=global_terms[0], loss_coarse=loss_coarse, num_valid=num_valid)
