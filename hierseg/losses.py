"""Masked hierarchical loss, exact across ranks.

For one batch the plan's loss is::

    loss = sum_valid CE / N  +  lambda * sum_valid (sum_k BCE_k / K) / N

with ``N`` the number of valid (non-uncertain) pixels, or voxels: logits are ``[B, C, *S]`` and labels
``[B, *S]`` with ``S`` the spatial axes, ``(H, W)`` or ``(D, H, W)``; every rule holds per voxel in 3D.

Under data parallelism we want the gradient of that loss over the *global* batch (all ranks
together). Each rank therefore computes its local *sums*, the valid count ``N`` is all-reduced as an
int64, and the rank's loss is scaled by ``W / N`` so that DDP's gradient averaging (divide by ``W``)
yields exactly ``d(global sum / N)``. A rank with no valid pixel contributes a zero sum (and zero
gradient) but still takes part in the collectives.

Partial labels (``label_sets``): a stored label ``12 + i`` means "one of the fine classes of set
``i``". Such a pixel is valid; its fine term is ``-log sum_{c in set} softmax_c`` and its coarse
channel ``k`` has target 1 when the set lies inside group ``k``, 0 when it misses it, and is masked
(contributes 0, still divided by ``K``) when the set straddles it. Batches without a set id run
exactly the code path of plain labels, so their results are bit-for-bit unchanged.

Shape suffixes: ``B`` batch, ``C`` fine classes, ``K`` groups, ``N`` gathered pixels, and ``S`` after
``B``/``C``/``K`` the spatial axes, so ``x_BKS`` is ``[B, K, H, W]`` or ``[B, K, D, H, W]``; the set
tables' ``_SK`` rows are label sets. Class and group axes are moved with ``movedim``, never a fixed
``permute``, so no code knows how many spatial axes there are.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hierseg.labels import IGNORE_INDEX, SET_ID_OFFSET, set_coarse_targets


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
    ``[B, K, *S]`` logits and needs a materialised target; here the forward is one softplus pass
    plus a gather of the target channel, and the backward is ``(sigmoid(x) - t) * valid / K`` built
    in place. For a partition (each fine class in exactly one group, as in the plan) the target is
    a single channel per pixel, so no ``[B, K, *S]`` target is ever built. Every op is along the
    channel axis 1, so 2D and 3D run the same kernels.
    """

    @staticmethod
    def forward(ctx, x_BKS, y_safe_BS, valid_BS, lut_CK):  # type: ignore[override]
        num_groups = lut_CK.shape[1]
        w_B1S = valid_BS.unsqueeze(1).to(x_BKS.dtype)
        # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x): every term is a small positive number, so
        # the sum keeps its precision near convergence (softplus(x) - x*t summed over millions of
        # pixels and subtracted at the end lost up to all of it).
        group_C = _partition_index(lut_CK)
        bce_BKS = F.softplus(x_BKS)
        group_B1S = None
        if group_C is not None:
            group_B1S = group_C.to(y_safe_BS.device)[y_safe_BS].unsqueeze(1)
            bce_BKS.scatter_(1, group_B1S, F.softplus(-x_BKS.gather(1, group_B1S)))
        else:
            target_BKS = _lut_target(lut_CK, y_safe_BS, torch.bool)
            bce_BKS = torch.where(target_BKS, F.softplus(-x_BKS), bce_BKS)
        total = (bce_BKS.sum(1, keepdim=True) * w_B1S).sum()
        ctx.save_for_backward(x_BKS, y_safe_BS, w_B1S, lut_CK)
        ctx.group_index = group_B1S
        return total / num_groups

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_BKS, y_safe_BS, w_B1S, lut_CK = ctx.saved_tensors
        scale_B1S = w_B1S * (grad_out / lut_CK.shape[1])
        grad_BKS = torch.sigmoid(x_BKS).mul_(scale_B1S)
        if ctx.group_index is not None:
            grad_BKS.scatter_add_(1, ctx.group_index, -scale_B1S)
        else:
            grad_BKS.sub_(_lut_target(lut_CK, y_safe_BS, x_BKS.dtype) * scale_B1S)
        return grad_BKS, None, None, None


def _lut_target(lut_CK: torch.Tensor, y_safe_BS: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``lut[y]`` with the group axis moved to 1: a ``[B, K, *S]`` view of a ``[B, *S, K]`` gather (any ``S``)."""
    return lut_CK.to(device=y_safe_BS.device, dtype=dtype)[y_safe_BS].movedim(-1, 1)


_PARTITION_INDEX: dict[int, tuple[int, torch.Tensor | None]] = {}  # id(lut) -> (version, index)


def _partition_index(lut_CK: torch.Tensor) -> torch.Tensor | None:
    """Group index per fine class when every class is in exactly one group, else ``None``.

    Cached per LUT tensor and its version counter (``_version`` grows with every in-place edit, so an
    edited table is checked again): the check reads the table on the host, which would stall a GPU
    every step if the training loop, which reuses its LUT tensors, paid it each time.
    """
    key, version = id(lut_CK), lut_CK._version
    cached = _PARTITION_INDEX.get(key)
    if cached is None or cached[0] != version:
        if not bool(((lut_CK == 0) | (lut_CK == 1)).all()):
            raise ValueError("coarse LUT rows must be 0/1 (group membership); got soft values in the table")
        is_partition = bool((lut_CK.sum(1) == 1).all())
        if cached is None:
            weakref.finalize(lut_CK, _PARTITION_INDEX.pop, key, None)
        _PARTITION_INDEX[key] = (version, lut_CK.argmax(1) if is_partition else None)
    return _PARTITION_INDEX[key][1]


def coarse_bce_sum(
    logits_coarse_BKS: torch.Tensor, y_safe_BS: torch.Tensor, valid_BS: torch.Tensor, lut_CK: torch.Tensor
) -> torch.Tensor:
    """Sum over valid pixels of the per-pixel BCE averaged over the K channels (fp32 or fp64)."""
    assert logits_coarse_BKS.shape[1] == lut_CK.shape[1], "coarse head width must match the LUT"
    return _MaskedCoarseBCESum.apply(_acc(logits_coarse_BKS), y_safe_BS, valid_BS, lut_CK)


def hierarchical_loss(
    logits_fine: torch.Tensor,
    logits_coarse: torch.Tensor | Sequence[torch.Tensor],
    y_fine: torch.Tensor,
    coarse_lut: torch.Tensor | Sequence[torch.Tensor],
    lambda_coarse: float | Sequence[float] = 0.2,
    process_group: dist.ProcessGroup | None = None,
    *,
    label_sets: torch.Tensor | None = None,
) -> LossTerms:
    """Masked CE + lambda * masked BCE, normalised by the global valid-pixel count.

    Args:
        logits_fine: ``[B, 12, *S]`` fine logits, ``S`` = ``(H, W)`` or ``(D, H, W)``.
        logits_coarse: ``[B, K, *S]`` coarse logits, or one such tensor per hierarchy level.
        y_fine: ``[B, *S]`` integer labels in ``0..11`` or ``IGNORE_INDEX``.
        coarse_lut: ``[12, K]`` table (or one per level) mapping fine class -> group membership.
        lambda_coarse: weight of the coarse term (or one per level).
        process_group: group to reduce over when ``torch.distributed`` is initialised
            (default: the world group). Without it the loss is the single-process one.
        label_sets: optional bool ``[S, 12]`` table; label ``12 + i`` then means "one of the fine
            classes in row ``i``" (partial labels; see the module docstring).

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
    assert logits_fine.dim() in (4, 5) and y_fine.shape == logits_fine.shape[:1] + logits_fine.shape[2:], (
        f"logits [B, C, *S] with labels [B, *S], S = (H, W) or (D, H, W); got logits {tuple(logits_fine.shape)}, "
        f"labels {tuple(y_fine.shape)}"
    )

    y = y_fine.long()
    valid_BS = y != IGNORE_INDEX
    num_valid = valid_BS.sum(dtype=torch.int64)

    if _uses_sets(y, label_sets):
        fine_sum, coarse_sums = _set_label_sums(logits_fine, coarse_list, y, luts, label_sets)
    else:
        y_safe_BS = torch.where(valid_BS, y, 0)
        # CE's ignore_index already gives zero loss and zero gradient to uncertain pixels; fp32 sums.
        fine_sum = F.cross_entropy(_acc(logits_fine), y, ignore_index=IGNORE_INDEX, reduction="sum")
        coarse_sums = torch.stack(
            [coarse_bce_sum(lc, y_safe_BS, valid_BS, lut) for lc, lut in zip(coarse_list, luts, strict=True)]
        )
    # Python-float weights: no host-to-device copy per step.
    local_sum = fine_sum + sum(lam * coarse_sums[i] for i, lam in enumerate(lambdas))

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


# ------------------------------------------------------------------------------------------ label sets
def _uses_sets(y: torch.Tensor, label_sets: torch.Tensor | None) -> bool:
    """Whether this rank's batch holds a set id; checks that every id has a row in ``label_sets``.

    Purely local: ranks may take different branches, but both branches make no collective, so
    every rank still runs the same two all-reduces.
    """
    if label_sets is None or y.numel() == 0:
        return False
    top = int(y.max())
    if top < SET_ID_OFFSET:
        return False
    if label_sets.dim() != 2 or label_sets.shape[1] != SET_ID_OFFSET:
        raise ValueError(f"label_sets must be a bool [S, {SET_ID_OFFSET}] table, got shape {tuple(label_sets.shape)}")
    if top >= SET_ID_OFFSET + label_sets.shape[0]:
        raise ValueError(
            f"label value {top} is a set id but label_sets has only {label_sets.shape[0]} rows "
            f"(ids {SET_ID_OFFSET}..{SET_ID_OFFSET + label_sets.shape[0] - 1}); pass the shards' label_sets table"
        )
    return True


def _set_label_sums(
    logits_fine: torch.Tensor,
    coarse_list: list[torch.Tensor],
    y: torch.Tensor,
    luts: list[torch.Tensor],
    label_sets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine and per-level coarse sums when the batch holds set ids.

    Dense over the batch, because on a binary mask nearly every pixel is a set ("not mitochondria"):
    gathering set pixels into ``[N, C]`` rows spent more time in boolean indexing and its backward than
    the loss itself. A set of one class is that class (its term bit-identical to the class's CE term); a
    set pixel's ``-log sum_{c in S} softmax_c`` is ``-log`` of its set's member sum of the softmax, one
    matrix product for all sets, except where that sum underflows (every member below ~1e-38): there it
    is the stable ``logsumexp`` of the members' log-probabilities, gathered for those pixels only.
    """
    members_RC = label_sets.to(device=y.device, dtype=torch.bool)
    sizes_R = members_RC.sum(1)
    is_set_BS = y >= SET_ID_OFFSET
    row_BS = torch.where(is_set_BS, y - SET_ID_OFFSET, 0)
    # a one-class set is that class: relabel it, so only sets of 2+ classes take the set term
    y = torch.where(is_set_BS & (sizes_R[row_BS] == 1), members_RC.to(torch.int64).argmax(1)[row_BS], y)
    is_set_BS = y >= SET_ID_OFFSET
    valid_BS = y != IGNORE_INDEX

    logp_BCS = torch.log_softmax(_acc(logits_fine), dim=1)
    fine_sum = F.nll_loss(logp_BCS, torch.where(is_set_BS, IGNORE_INDEX, y), ignore_index=IGNORE_INDEX, reduction="sum")
    if bool(is_set_BS.any()):
        fine_sum = fine_sum - _set_log_prob_sum(logp_BCS, members_RC, row_BS, is_set_BS)

    y_safe_BS = torch.where(valid_BS, y, 0)  # stored label: class 0..11 or set id; rows of the tables below
    coarse = []
    for lc, lut in zip(coarse_list, luts, strict=True):
        lut_CK = lut.to(y.device)
        target_SK, known_SK = set_coarse_targets(members_RC, lut_CK)
        target_LK = torch.cat([lut_CK > 0, target_SK])
        known_LK = torch.cat([torch.ones_like(target_LK[:SET_ID_OFFSET]), known_SK])
        x_BKS = _acc(lc)
        # [K, L] tables indexed by the labels give [K, B, *S]: each group's plane is contiguous
        w_BKS = (known_LK.t()[:, y_safe_BS] & valid_BS).movedim(0, 1).to(x_BKS.dtype) / lut_CK.shape[1]
        coarse.append(_WeightedBCESum.apply(x_BKS, target_LK.t()[:, y_safe_BS].movedim(0, 1), w_BKS))
    return fine_sum, torch.stack(coarse)


class _WeightedBCESum(torch.autograd.Function):
    """``sum w * BCE(x, t)`` over ``[B, K, *S]`` with bool targets, with a hand-written backward.

    ``BCE(x, 1) = softplus(-x)`` and ``BCE(x, 0) = softplus(x)``, so one softplus of the sign-flipped
    logit gives every term as a small positive number (the sum keeps its precision near convergence);
    the backward is ``(sigmoid(x) - t) * w``. Autograd through ``where`` of two softplus branches made
    four passes each way over the logits.
    """

    @staticmethod
    def forward(ctx, x_BKS, target_BKS, w_BKS):  # type: ignore[override]
        ctx.save_for_backward(x_BKS, target_BKS, w_BKS)
        return (F.softplus(torch.where(target_BKS, -x_BKS, x_BKS)) * w_BKS).sum()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_BKS, target_BKS, w_BKS = ctx.saved_tensors
        grad_BKS = torch.sigmoid(x_BKS).sub_(target_BKS.to(x_BKS.dtype)).mul_(w_BKS * grad_out)
        return grad_BKS, None, None


def _set_log_prob_sum(
    logp_BCS: torch.Tensor, members_RC: torch.Tensor, row_BS: torch.Tensor, is_set_BS: torch.Tensor
) -> torch.Tensor:
    """``sum over set pixels of log sum_{c in set} softmax_c`` (``row_BS``: each pixel's set row)."""
    p_BCN = logp_BCS.exp().flatten(2)  # N: the spatial axes flattened (a view): every operand stays contiguous
    member_sum_BRN = torch.matmul(members_RC.to(p_BCN.dtype), p_BCN)
    member_sum_BS = member_sum_BRN.gather(1, row_BS.flatten(1).unsqueeze(1)).view_as(row_BS)
    under_BS = is_set_BS & (member_sum_BS < torch.finfo(p_BCN.dtype).tiny)
    direct_BS = is_set_BS & ~under_BS
    # where before log: an underflowed 0 must not reach log (its inf would turn the masked gradient into NaN)
    total = torch.where(direct_BS, torch.where(direct_BS, member_sum_BS, 1.0).log(), 0.0).sum()
    if bool(under_BS.any()):
        logp_NC = logp_BCS.movedim(1, -1)[under_BS]
        total = total + torch.logsumexp(logp_NC.masked_fill(~members_RC[row_BS[under_BS]], -torch.inf), dim=1).sum()
    return total
