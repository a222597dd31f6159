"""The plan's reference implementation, written out independently of hierseg (tests compare against it)."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1

PLAN_LUT = torch.tensor(
    [
        [0, 0, 0, 0, 1],
        [0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0],
    ],
    dtype=torch.float32,
)


def make_coarse_targets(y_fine, lut):
    B, H, W = y_fine.shape
    K = lut.shape[1]
    y_coarse = torch.zeros((B, K, H, W), dtype=lut.dtype, device=y_fine.device)
    valid = y_fine != IGNORE_INDEX
    if valid.any():
        perm = y_coarse.permute(0, 2, 3, 1)
        perm[valid] = lut[y_fine[valid].long()]
        y_coarse = perm.permute(0, 3, 1, 2)
    return y_coarse


def compute_losses(logits_fine, logits_coarse, y_fine, lut=PLAN_LUT, lambda_coarse=0.2):
    """The plan's formula, with the 0/0 of an all-uncertain batch guarded by clamp_min(1)."""
    valid = (y_fine != IGNORE_INDEX).to(logits_fine.dtype)
    denom = valid.sum().clamp_min(1.0)
    ce = F.cross_entropy(logits_fine, y_fine, ignore_index=IGNORE_INDEX, reduction="none")
    loss_fine = (ce * valid).sum() / denom
    y_coarse = make_coarse_targets(y_fine, lut.to(logits_coarse.dtype))
    bce = F.binary_cross_entropy_with_logits(logits_coarse, y_coarse, reduction="none")
    loss_coarse = (bce.mean(dim=1) * valid).sum() / denom
    return loss_fine + lambda_coarse * loss_coarse, loss_fine, loss_coarse


# ------------------------------------------------------------------------------------------ voxel-wise
def slices_of(t):
    """``[B, C, D, H, W] -> [B*D, C, H, W]`` (labels ``[B, D, H, W] -> [B*D, H, W]``): every z slice a 2D sample.

    The plan's terms are sums over voxels divided by the number of valid voxels, so they are the same sums
    over the slices of a 3D batch: applying the 2D formula to the slices is applying it voxel-wise.
    """
    if t.dim() == 5:
        return t.movedim(2, 1).flatten(0, 1)
    assert t.dim() == 4, "a 3D batch: logits [B, C, D, H, W] or labels [B, D, H, W]"
    return t.flatten(0, 1)


def compute_losses_voxelwise(logits_fine, logits_coarse, y_fine, lut=PLAN_LUT, lambda_coarse=0.2):
    """The plan's compute_losses on a 3D batch ``[B, C, D, H, W]``, every voxel counted as a pixel."""
    return compute_losses(slices_of(logits_fine), slices_of(logits_coarse), slices_of(y_fine), lut, lambda_coarse)
