"""EM augmentations on torch tensors, one sample at a time, driven by :class:`~hierseg.spec.AugmentSpec`.

Geometric transforms apply to image and label alike; labels are resampled nearest-neighbour and
pixels pulled in from outside the patch become uncertain (-1), never a made-up class. Intensity
transforms touch only the image. Every random draw comes from a ``torch.Generator`` the caller seeds
per sample, so a sample's augmentation depends only on (seed, rank, worker, position) and resume is exact.

3D crops (image ``[C, D, H, W]``, label ``[D, H, W]``) take the same transforms in the xy plane (flips,
90-degree rotations, the elastic warp: one in-plane field for every section, blur per section) plus a
z flip. Why a z flip is meaningful: the tissue has no preferred direction along the cutting axis (which
end of the block was sectioned first says nothing about the biology), so a block read bottom-up is as
real as read top-down, and mirroring z keeps the anisotropic voxel grid unchanged. Rotations that mix z
with x or y are not used: with 5-10x coarser z they would resample sections into a grid no microscope
produces. 2D samples draw exactly what they always drew (the z flip is an extra draw, 3D only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hierseg.spec import AugmentSpec


def _rand(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def geometric(image: torch.Tensor, label: torch.Tensor, spec: AugmentSpec, gen: torch.Generator):
    """Flips, 90-degree rotations in the xy plane, a z flip (3D), and (with probability ``spec.elastic``) a small
    elastic/affine warp in plane."""
    flip_y = flip_x = flip_z = transpose = False
    if spec.flips:
        flip_x = _rand(gen) < 0.5
        flip_y = _rand(gen) < 0.5
        flip_z = label.dim() == 3 and _rand(gen) < 0.5
    if spec.rot90:
        k = int(torch.randint(0, 4, (), generator=gen))
        # rot90 by k after the flips, folded into them: rot90 (k=1) = transpose of an x flip, k=3 = transpose of
        # a y flip, k=2 = both flips; one copy per tensor instead of one per step
        if k == 1:
            transpose, flip_y, flip_x = True, not flip_x, flip_y
        elif k == 2:
            flip_y, flip_x = not flip_y, not flip_x
        elif k == 3:
            transpose, flip_y, flip_x = True, flip_x, not flip_y
    dims = [d for d, on in ((-3, flip_z), (-2, flip_y), (-1, flip_x)) if on]
    image, label = (_dihedral(t, transpose, dims) for t in (image, label))
    if spec.elastic > 0 and _rand(gen) < spec.elastic:
        image, label = warp(image, label, gen)
    return image, label


def _dihedral(x: torch.Tensor, transpose: bool, flip_dims: list[int]) -> torch.Tensor:
    """``x`` with its last two axes transposed, then flipped along ``flip_dims``, contiguous."""
    x = x.transpose(-2, -1) if transpose else x
    return (x.flip(flip_dims) if flip_dims else x).contiguous()  # a flip keeps a transposed layout


def warp(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator, strength: float = 0.03):
    """Small rotation/scale/shear plus a smooth displacement field; labels nearest, outside -> -1.

    ``image [..., H, W]`` and ``label [..., H, W]``: a 3D crop's sections all take the same in-plane field.
    """
    h, w = image.shape[-2:]
    ang = (_rand(gen) - 0.5) * math.radians(20)
    scale = 1 + (_rand(gen) - 0.5) * 0.2
    shear = (_rand(gen) - 0.5) * 0.1
    theta = torch.tensor(
        [[math.cos(ang) * scale, -math.sin(ang) + shear, 0.0], [math.sin(ang), math.cos(ang) * scale, 0.0]]
    )
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    coarse = (torch.rand((1, 2, 4, 4), generator=gen) - 0.5) * 2 * strength
    grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    image_NHW = image.reshape(-1, h, w)  # channels (and sections) share the one field
    img = F.grid_sample(image_NHW[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    shifted = (label + 1).to(torch.float32).reshape(-1, 1, h, w)  # 0 outside == -1 after the shift back
    grid_N = grid.expand(shifted.shape[0], -1, -1, -1)
    lab = F.grid_sample(shifted, grid_N, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    return img.reshape(image.shape), lab.reshape(label.shape).round().to(label.dtype) - 1


def intensity(image: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """Contrast/brightness, gamma, Gaussian noise and (with probability ``spec.blur``) a light blur.

    Every strength is relative to the patch's own intensity spread, so the same spec means the same on
    z-scored input (std ~1) as on [0, 1] input: gamma acts on the patch rescaled to its [min, max],
    brightness and noise are in units of the patch's standard deviation. (Clamping to [0, 1] before
    gamma, as an earlier version did, flattened every z-scored pixel below the mean to one value.)
    """
    scale = float(image.std()) or 1.0
    # one fresh tensor, then in-place steps in the order of the formula (so the rounding is that of the
    # formula): a 256^2 crop goes through this once per training sample
    if spec.contrast > 0:
        c = 1 + (_rand(gen) * 2 - 1) * spec.contrast
        b = (_rand(gen) * 2 - 1) * spec.contrast * scale
        mean = image.mean()
        image = (image - mean).mul_(c).add_(mean).add_(b)  # (image - mean) * c + mean + b
    if spec.gamma > 0:
        g = math.exp((_rand(gen) * 2 - 1) * spec.gamma)
        lo, hi = torch.aminmax(image)
        span = (hi - lo).clamp_min(1e-6)
        # lo + span * x ** g, the power as exp(g * log x): half the cost of pow, equal to float32 rounding
        # (log 0 = -inf -> 0, as 0 ** g)
        image = ((image - lo) / span).clamp_(0, 1).log_().mul_(g).exp_().mul_(span).add_(lo)
    if spec.blur > 0 and _rand(gen) < spec.blur:
        image = gaussian_blur(image, 0.5 + _rand(gen))
    if spec.noise > 0:
        image = image + torch.randn(image.shape, generator=gen).mul_(spec.noise * scale)
    return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable in-plane Gaussian blur of a ``[C,H,W]`` (or ``[C,D,H,W]``: per section) tensor (radius 2 sigma,
    reflected borders). Never across sections: each section is imaged, and defocused, on its own, and with a
    coarse z a blur across sections would mix different tissue."""
    radius = max(1, int(2 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(image.dtype)
    image_NHW = image.reshape(-1, *image.shape[-2:])
    c = image_NHW.shape[0]
    out = F.pad(image_NHW[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0].reshape(image.shape)


def augment(image: torch.Tensor, label: torch.Tensor, spec: AugmentSpec, gen: torch.Generator):
    """Full training augmentation of one ``[C,H,W]`` float image and ``[H,W]`` integer label (3D: ``[C,D,H,W]``
    and ``[D,H,W]``)."""
    image, label = geometric(image, label, spec, gen)
    return intensity(image, spec, gen), label
