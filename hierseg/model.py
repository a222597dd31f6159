"""U-Net backbone, 2D or 3D, with a 12-way fine head and one sigmoid head per hierarchy level.

Tensor names: ``S`` stands for the spatial axes, ``(H, W)`` in 2D and ``(D, H, W)`` in 3D.

One network serves both: the blocks are the same, only the layer classes and the per-stage kernels and
pooling strides (a :class:`UNetPlan`) depend on the dimension. In 2D the plan is the classic one (3x3
kernels, 2x2 pooling at every stage). In 3D it follows nnU-Net's rule for anisotropic data: an axis is
pooled, and convolved across with a 3-wide kernel, only while its spacing at that stage is less than twice
the finest one. Serial-section EM (z 50 nm, xy 4.6 nm) therefore pools in xy only with (1, 3, 3) kernels
until the voxel is roughly isotropic, then in all three axes with 3x3x3 kernels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hierseg.labels import NUM_FINE_CLASSES, Hierarchy
from hierseg.spec import ModelSpec

ANISOTROPY_LIMIT = 2.0
"""nnU-Net's threshold: an axis whose spacing is this many times the finest (or more) is not pooled yet."""
AXIS_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}
INPUT_SHAPES = {2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class UNetPlan:
    """Kernel sizes of the ``depth + 1`` encoder stages (the last is the bottleneck) and the ``depth``
    pooling strides between them; the decoder mirrors them."""

    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]

    @property
    def dims(self) -> int:
        return len(self.kernels[0])

    def divisor(self) -> tuple[int, ...]:
        """Per axis, the product of the pooling strides: a side pools without padding when it is a multiple."""
        return tuple(math.prod(stride[axis] for stride in self.strides) for axis in range(self.dims))


def plan_unet(depth: int, dims: int = 2, voxel_size: Sequence[float] | None = None) -> UNetPlan:
    """Kernels and strides for ``depth`` poolings of data with this voxel size (``[z, y, x]`` in 3D).

    ``voxel_size=None`` means isotropic voxels, which gives the classic plan (3-wide kernels, stride 2 on
    every axis at every stage); 2D always takes it (a 2D model sees no z).
    """
    spacing = [1.0] * dims if voxel_size is None or dims == 2 else [float(s) for s in voxel_size]
    if len(spacing) != dims or min(spacing) <= 0:
        raise ValueError(f"voxel size {list(spacing)}: need {dims} positive numbers [z, y, x] (nm)")
    kernel = [1] * dims
    kernels, strides = [], []
    for stage in range(depth + 1):
        fine_enough = [s / min(spacing) < ANISOTROPY_LIMIT for s in spacing]  # per axis
        # A kernel never narrows again at a deeper stage (nnU-Net keeps a 3 once an axis has one).
        kernel = [3 if k == 3 or fine else 1 for k, fine in zip(kernel, fine_enough, strict=True)]
        kernels.append(tuple(kernel))
        if stage < depth:
            stride = tuple(2 if fine else 1 for fine in fine_enough)
            strides.append(stride)
            spacing = [s * f for s, f in zip(spacing, stride, strict=True)]
    return UNetPlan(kernels=tuple(kernels), strides=tuple(strides))


def sizes_that_work(plan: UNetPlan, patch_size: Sequence[int]) -> list[list[int]]:
    """Per axis, the patch sides the planned pooling divides that lie nearest ``patch_size`` (at most 4, ascending).

    A side must be a multiple of :meth:`UNetPlan.divisor` on its axis: the network pads other sizes, which a
    training crop should not pay for (padded voxels carry no labels and cost as much as real ones).
    """
    out = []
    for size, div in zip(patch_size, plan.divisor(), strict=True):
        below = max(1, size // div)
        out.append([div * k for k in range(max(1, below - 1), below + 3)])
    return out


def check_patch_size(plan: UNetPlan, patch_size: Sequence[int], field: str = "data.patch_size") -> None:
    """Raise ``ValueError`` naming ``field``, each axis the pooling cannot divide, and the sides that work."""
    names = AXIS_NAMES[plan.dims]
    bad = [
        f"{names[a]} {size} is not a multiple of {div} (the network pools {names[a]} by {div}); "
        f"{names[a]} sizes that work: {', '.join(map(str, near))}, ... (any multiple of {div})"
        for a, (size, div, near) in enumerate(zip(patch_size, plan.divisor(), sizes_that_work(plan, patch_size)))
        if size % div
    ]
    if bad:
        raise ValueError(f"{field} {list(patch_size)}: " + "; ".join(bad))


# -------------------------------------------------------------------------------------------- layers
class _Layers(NamedTuple):
    conv: type[nn.Module]
    up: type[nn.Module]
    batch_norm: type[nn.Module]
    instance_norm: type[nn.Module]
    dropout: type[nn.Module]
    max_pool: Callable[..., torch.Tensor]


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters, same state dict) that on the CPU runs as 2D convolutions of sections
    where PyTorch's own choice is slow.

    Why: PyTorch's CPU heuristic sends a 5D input of one block (what a 3D rank trains on) whose
    ``C x D x H`` is small to its im2col fallback (``slow_conv3d``) instead of oneDNN. There, and only
    there, the same sums are computed as 2D convolutions: an in-plane kernel ``(1, k, k)`` as one 2D
    convolution of every section, a ``(kz, k, k)`` kernel as the sum of ``kz`` 2D convolutions of z-shifted
    sections (3-6x faster than the fallback; 1.4x slower than oneDNN's 3D kernel where torch picks that).
    A base-8 3D U-Net step on one 4x256x256 block: 2.6 s -> 0.53 s. GPUs (cuDNN) take ``nn.Conv3d``.
    """

    FALLBACK_SIZE = 20480
    """PyTorch's threshold on ``C x D x H`` (its ``use_mkldnn`` rule) below which a batch of one is not given oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._by_sections(x):
            return super().forward(x)
        (kz, *_), (pz, *_) = self.kernel_size, self.padding
        x = F.pad(x, (0, 0, 0, 0, pz, pz)) if pz else x
        b, c, d, h, w = x.shape
        d_out = d - kz + 1
        out_NCHW = None
        for dz in range(kz):  # out[z] = sum over dz of conv2d(x[z + dz], weight[:, :, dz])
            sections = x[:, :, dz : dz + d_out].transpose(1, 2).reshape(b * d_out, c, h, w)
            y = F.conv2d(sections, self.weight[:, :, dz], self.bias if dz == 0 else None,
                         self.stride[1:], self.padding[1:], self.dilation[1:], self.groups)  # fmt: skip
            out_NCHW = y if out_NCHW is None else out_NCHW.add_(y)
        return out_NCHW.reshape(b, d_out, *out_NCHW.shape[1:]).transpose(1, 2)

    def _by_sections(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dim() != 5 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        if (self.stride[0], self.dilation[0]) != (1, 1):
            return False
        return x.shape[0] == 1 and math.prod(x.shape[1:4]) <= self.FALLBACK_SIZE


_LAYERS = {
    2: _Layers(nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.Dropout2d, F.max_pool2d),
    3: _Layers(Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.Dropout3d, F.max_pool3d),
}


class SourceBatchNorm(nn.Module):
    """Batch norm with its own statistics and affine per data source (``model.norm: source_batch``).

    Why: one batch-norm layer over crops of two microscopes normalises each with a mixture of both, and the
    joint model of srf_tem and a vnc_sstem binary mask lost 0.45 mitochondria IoU to its own model that way,
    while group norm (no batch statistics) lost 0.06 but trained vnc_sstem worse (bench/README.md,
    partial_labels). Each sample is normalised with the layer of its source: training on the sub-batch's
    statistics, evaluation on that source's running ones. ``source`` is set by :meth:`UNet.forward` for
    each call: a ``[B]`` int64 tensor of source indices, or one int for the whole batch.
    """

    def __init__(self, channels: int, num_sources: int, dims: int = 2):
        super().__init__()
        self.norms = nn.ModuleList(_LAYERS[dims].batch_norm(channels) for _ in range(num_sources))
        self.source: torch.Tensor | int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.source
        if isinstance(source, int):
            return self.norms[source](x)
        if source is None or source.shape != (x.shape[0],):
            raise ValueError("SourceBatchNorm needs the source of every sample; call the UNet with source=")
        out, order = [], []
        for k, norm in enumerate(self.norms):
            idx = (source == k).nonzero().squeeze(1)
            if len(idx):
                out.append(norm(x.index_select(0, idx)))
                order.append(idx)
            elif norm.training:
                # DDP reduces every parameter's gradient on every rank at every step: a source absent from
                # this rank's batch still takes part, with a zero gradient (its true contribution here).
                out.append(x.new_zeros(0, *x.shape[1:]) + 0 * (norm.weight.sum() + norm.bias.sum()))
        y = torch.cat(out)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"source indices {sorted(set(source.tolist()))}: this layer has {len(self.norms)} sources")
        inverse = torch.empty_like(source)
        inverse[torch.cat(order)] = torch.arange(len(source), device=source.device)
        return y.index_select(0, inverse)


class SourcePrior(nn.Module):
    """One learned logit bias per data source on a head (``model.source_prior``), added to the shared head's.

    Why: every labelled pixel of a source is a known negative for the classes outside its label, and sources
    differ in what they contain (srf_tem labels axons and myelin, vnc_sstem has glia and no myelin). Through
    one shared head, srf_tem drives the glia logit down on every input. What helps is the start
    (:meth:`UNet.init_source_priors`: closed on the classes a source never labels); started at 0 the biases
    barely moved in 300 steps and changed nothing (bench/README.md, partial_labels).
    """

    def __init__(self, channels: int, num_sources: int):
        super().__init__()
        # One 1-D parameter per source, so the optimizer treats them as biases (no weight decay).
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(channels)) for _ in range(num_sources))

    def forward(self, logits_BCS: torch.Tensor, source: torch.Tensor | int) -> torch.Tensor:
        index_B = torch.as_tensor(source, device=logits_BCS.device).reshape(-1)  # one int: the whole batch's
        bias_BC = torch.stack(list(self.bias))[index_B]  # an absent source's row gets a zero gradient
        return logits_BCS + bias_BC.reshape(*bias_BC.shape, *[1] * (logits_BCS.dim() - 2))


ABSENT_LOGIT = -10.0
"""A source prior's start for a class the source never labels: softmax and sigmoid ~5e-5, so that source's
pixels send almost no gradient into the class."""


def _norm(kind: str, channels: int, dims: int = 2, num_sources: int = 1) -> nn.Module:
    if kind == "batch":
        return _LAYERS[dims].batch_norm(channels)
    if kind == "source_batch":
        return SourceBatchNorm(channels, num_sources, dims)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "instance":
        return _LAYERS[dims].instance_norm(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two convolutions of ``kernel`` (3x3 in 2D), each followed by normalisation and SiLU; sizes are kept."""

    def __init__(self, cin: int, cout: int, norm: str, kernel: tuple[int, ...] = (3, 3), num_sources: int = 1):
        bias = norm == "none"
        conv, dims, padding = _LAYERS[len(kernel)].conv, len(kernel), tuple(k // 2 for k in kernel)
        super().__init__(
            conv(cin, cout, kernel, padding=padding, bias=bias),
            _norm(norm, cout, dims, num_sources),
            nn.SiLU(inplace=True),
            conv(cout, cout, kernel, padding=padding, bias=bias),
            _norm(norm, cout, dims, num_sources),
            nn.SiLU(inplace=True),
        )


# ------------------------------------------------------------------------------------------- network
class UNet(nn.Module):
    """U-Net whose heads share one decoder: ``forward(x) -> (logits_fine, [logits_coarse per level])``.

    ``dims`` 2 takes ``[B, C, H, W]``, ``dims`` 3 takes ``[B, C, D, H, W]`` with the plan of ``voxel_size``
    (``[z, y, x]``; see :func:`plan_unet`). Inputs of any size work: they are padded (reflect) to a multiple
    of the pooling on each axis and the logits are cropped back, so tiled inference and odd sizes need no
    special casing.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        depth: int = 4,
        norm: str = "group",
        dropout: float = 0.0,
        coarse_groups: tuple[int, ...] = (5,),
        num_fine: int = NUM_FINE_CLASSES,
        dims: int = 2,
        voxel_size: Sequence[float] | None = None,
        source_names: Sequence[str] = (),
        source_prior: bool = False,
    ):
        super().__init__()
        plan = plan_unet(depth, dims, voxel_size)
        layers, k, s = _LAYERS[dims], plan.kernels, plan.strides
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth, self.plan = depth, plan
        # The data sources a source_batch model keeps statistics for (index = position); empty otherwise.
        self.source_names = tuple(source_names) if norm == "source_batch" else ()
        n = max(1, len(self.source_names))
        # Construction order is part of the contract: with a fixed seed it decides the initial weights.
        self.stem = ConvBlock(in_channels, widths[0], norm, k[0], n)
        self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1], norm, k[i + 1], n) for i in range(depth))
        self.up = nn.ModuleList(layers.up(widths[i + 1], widths[i], s[i], stride=s[i]) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], norm, k[i], n) for i in reversed(range(depth)))
        self.dropout = layers.dropout(dropout) if dropout > 0 else nn.Identity()
        self.fine_head = layers.conv(widths[0], num_fine, 1)
        self.coarse_heads = nn.ModuleList(layers.conv(widths[0], g, 1) for g in coarse_groups)
        self._source_norms = [m for m in self.modules() if isinstance(m, SourceBatchNorm)]
        # Zero-initialised (no random draw), so the seeded initial weights are those without it.
        self.priors = (
            nn.ModuleList(SourcePrior(c, n) for c in (num_fine, *coarse_groups))
            if source_prior and self.source_names
            else None
        )

    @torch.no_grad()
    def init_source_priors(self, labelled: Sequence[Sequence[int]], luts: Sequence[torch.Tensor]) -> None:
        """Start each source's prior (``model.source_prior``) at 0 for the classes its labels contain
        (``labelled[k]``, fine indices) and at :data:`ABSENT_LOGIT` for the others; a coarse group starts at 0
        when one of its classes is labelled. ``luts``: the hierarchy's ``[12, K]`` membership tables.

        Why: learning "srf_tem has no glia" through the bias alone takes many steps (Adam moves a bias about
        ``lr`` a step), and until then every srf_tem pixel pushes the shared weights against glia.
        """
        for k, classes in enumerate(labelled):
            named_C = torch.zeros(self.fine_head.out_channels, dtype=torch.bool)
            named_C[list(classes)] = True
            for prior, named in zip(self.priors, [named_C, *(lut[named_C].sum(0) > 0 for lut in luts)], strict=True):
                prior.bias[k].copy_(torch.where(named, 0.0, ABSENT_LOGIT))

    def forward(
        self, x_BCS: torch.Tensor, source: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``source``: the data source of each sample (``[B]`` indices into :attr:`source_names`) or of the whole
        batch (one int); a ``source_batch`` model needs it, any other ignores it."""
        if self._source_norms:
            if source is None:
                raise ValueError(
                    "this model normalises each data source with its own statistics (model.norm: source_batch); "
                    f"give the source of the input, one of {', '.join(self.source_names)} (predict --source NAME)"
                )
            for norm in self._source_norms:
                norm.source = source
        size_S = tuple(x_BCS.shape[2:])
        if len(size_S) != self.plan.dims:
            dims = self.plan.dims
            raise ValueError(f"a {dims}D U-Net takes {INPUT_SHAPES[dims]}, got {tuple(x_BCS.shape)}")
        pad_S = [(-size) % m for size, m in zip(size_S, self.plan.divisor(), strict=True)]
        if any(pad_S):
            mode = "reflect" if all(p < size for p, size in zip(pad_S, size_S, strict=True)) else "replicate"
            # F.pad takes (before, after) pairs starting from the last axis.
            x_BCS = F.pad(x_BCS, [v for p in reversed(pad_S) for v in (0, p)], mode=mode)
        max_pool = _LAYERS[self.plan.dims].max_pool
        skips = [self.stem(x_BCS)]
        for block, stride in zip(self.down, self.plan.strides, strict=True):
            skips.append(block(max_pool(skips[-1], stride)))
        feat = skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            feat = merge(torch.cat([up(feat), skips.pop()], dim=1))
        feat = self.dropout(feat)[(..., *(slice(0, size) for size in size_S))]
        fine, coarse = self.fine_head(feat), [head(feat) for head in self.coarse_heads]
        if self.priors is not None:
            fine, *coarse = (prior(logits, source) for prior, logits in zip(self.priors, [fine, *coarse], strict=True))
        return fine, coarse


def build_model(
    spec: ModelSpec, hierarchy: Hierarchy, voxel_size: Sequence[float] | None = None, source_names: Sequence[str] = ()
) -> UNet:
    """The network of a model spec: 2D, or 3D planned for ``voxel_size`` (default: ``spec.voxel_size``).

    ``source_names``: the run's data sources (``data.source_names()``), for ``norm: source_batch``.

    ``voxel_size`` overrides the spec's; training resolves the data's own (the manifest's) into the spec
    before any rank builds (:func:`hierseg.train.launch.resolve_voxel_size`). Without either, a 3D network
    is planned for isotropic voxels, with a warning.
    """
    voxel_size = voxel_size if voxel_size is not None else spec.voxel_size
    if spec.dims == 3 and voxel_size is None:
        warnings.warn(
            "model.voxel_size is not set and the training shards record none: planning the 3D network for "
            "isotropic voxels (set it to the data's [z, y, x] in nm, or build the shards with --voxel-size)",
            stacklevel=2,
        )
    return UNet(
        in_channels=spec.in_channels,
        base_channels=spec.base_channels,
        depth=spec.depth,
        norm=spec.norm,
        dropout=spec.dropout,
        coarse_groups=tuple(hierarchy.num_groups),
        dims=spec.dims,
        voxel_size=voxel_size,
        source_names=source_names,
        source_prior=spec.source_prior,
    )


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
