"""Segmentation metrics from int64 confusion counts; uncertain pixels are never counted.

Counts are summed over ranks once (``all_reduce``), and every rate (IoU, Dice, accuracy,
consistency) is derived afterwards from the global sums, never averaged over ranks.

Every update takes 2D (``[B, H, W]`` labels, ``[B, K, H, W]`` probabilities) or 3D (``[B, D, H, W]``,
``[B, K, D, H, W]``) batches alike: ``S`` in a name stands for the spatial axes, and the group axis is
moved last with ``movedim`` before pixels are gathered, so a voxel counts exactly as a pixel does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from hierseg.labels import IGNORE_INDEX, SET_ID_OFFSET, LabelSpace, set_coarse_targets


def _all_reduce_sum(t: torch.Tensor, process_group: dist.ProcessGroup | None) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(t, group=process_group)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


class ConfusionMatrix:
    """``[C, C]`` int64 counts, rows = target, columns = prediction; target ``-1`` is skipped.

    With ``label_sets`` (bool ``[S, C]``), pixels labelled with set id ``C + i`` are counted in
    ``set_matrix[i, prediction]``. Such a pixel is a known negative for every class outside set ``i``
    (a prediction of such a class there is a false positive) and unknown for the classes inside it,
    so per-class IoU and Dice count those false positives too. Without them, a binary mask's
    "not mitochondria" pixels could never refute a mitochondria prediction and the logged IoU would
    be recall. Targets beyond the set ids are skipped.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None,
                 label_sets: torch.Tensor | None = None):  # fmt: skip
        assert num_classes > 0
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        table = label_sets if label_sets is not None else torch.zeros(0, num_classes, dtype=torch.bool)
        self.label_sets = table.to(device=device, dtype=torch.bool)
        self.set_matrix = torch.zeros(table.shape[0], num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> ConfusionMatrix:
        """Add one batch: ``pred`` and ``target`` are integer tensors of the same shape."""
        assert pred.shape == target.shape, f"pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
        c, rows = self.num_classes, self.num_classes + self.set_matrix.shape[0]
        target = target.to(self.matrix.device).long()
        keep = (target >= 0) & (target < rows)
        idx = target[keep] * c + pred.to(self.matrix.device).long()[keep]
        counts = torch.bincount(idx, minlength=rows * c).view(rows, c)
        self.matrix += counts[:c]
        self.set_matrix += counts[c:]
        return self

    def all_reduce(self, process_group: dist.ProcessGroup | None = None) -> ConfusionMatrix:
        """Sum the counts over all ranks (in place); a no-op outside ``torch.distributed``."""
        _all_reduce_sum(self.matrix, process_group)
        _all_reduce_sum(self.set_matrix, process_group)
        return self

    def reset(self) -> None:
        self.matrix.zero_()
        self.set_matrix.zero_()

    @property
    def num_valid(self) -> int:
        """Single-class pixels counted (set-labelled pixels are in ``set_matrix``)."""
        return int(self.matrix.sum())

    def _tp_fn_fp(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, sets = self.matrix.cpu(), self.set_matrix.cpu()
        tp = m.diagonal()
        set_fp = (sets * ~self.label_sets.cpu()).sum(0)  # set pixels predicted as a class outside the set
        return tp, m.sum(1) - tp, m.sum(0) - tp + set_fp

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64); NaN for a class with no positive pixel and no false positive ("no data")."""
        tp, fn, fp = self._tp_fn_fp()
        return _safe_div(tp, tp + fn + fp)

    def dice(self) -> torch.Tensor:
        """Per-class Dice (float64); NaN for a class with no positive pixel and no false positive."""
        tp, fn, fp = self._tp_fn_fp()
        return _safe_div(2 * tp, 2 * tp + fn + fp)

    def support(self) -> torch.Tensor:
        """Labelled pixels per class (int64)."""
        return self.matrix.cpu().sum(1)

    def miou(self) -> float:
        """Mean IoU over classes that are not "no data" (NaN when every class is)."""
        iou = self.iou()
        iou = iou[~iou.isnan()]
        return float(iou.mean()) if iou.numel() else math.nan

    def accuracy(self) -> float:
        """Share of single-class valid pixels predicted correctly (NaN when there is none)."""
        total = self.matrix.sum()
        return float(self.matrix.trace()) / float(total) if int(total) > 0 else math.nan

    def set_counts(self) -> torch.Tensor:
        """Per label set ``[S, 2]``: pixels whose prediction lies inside the set, and all its pixels."""
        sets = self.set_matrix.cpu()
        return torch.stack([(sets * self.label_sets.cpu()).sum(1), sets.sum(1)], 1)

    def set_accuracy(self) -> torch.Tensor:
        """Per set (float64): share of its pixels predicted inside it; NaN for a set with no pixels."""
        c = self.set_counts()
        return _safe_div(c[:, 0], c[:, 1])

    def label_iou(self, space: LabelSpace) -> tuple[torch.Tensor, torch.Tensor]:
        """IoU in the label space of the data, and each value's labelled pixels.

        For each label-map value ``v`` (a fine class or a set), a pixel labelled ``L`` (a class or a set) is a
        positive of ``v`` when ``L`` lies inside ``v``, a known negative when ``L`` and ``v`` share no class,
        and unknown otherwise. True positive = a positive predicted inside ``v``; false negative = a positive
        predicted outside; false positive = a known negative predicted inside ``v``. Within one label map the
        values are disjoint, so the positives are the pixels labelled ``v`` and every other labelled pixel is
        a negative: for a binary mask this is the foreground IoU a user computes by hand. Why the general rule:
        the pooled metrics of a multi-source run score values of several maps that overlap (srf_tem's
        ``axon`` lies inside vnc_sstem's ``neuron_part``), and a ``neuron_part`` pixel predicted axon says
        nothing about axon; counting it as a false positive made the pooled ``val/label/miou`` of a joint
        run (its default ``best_metric``) half what the per-source figures were.
        """
        full = torch.cat([self.matrix, self.set_matrix]).cpu()  # [R, C] rows: stored label id
        c = self.num_classes
        row_members = torch.cat([torch.eye(c, dtype=torch.bool), self.label_sets.cpu()])  # [R, C]
        members = space.members_table()  # [V, C]
        pred_inside = (full[:, None, :] * members[None]).sum(-1)  # [R, V]
        inside = ~(row_members[:, None, :] & ~members[None]).any(-1)  # [R, V]: label lies inside the value
        disjoint = ~(row_members[:, None, :] & members[None]).any(-1)  # [R, V]: no class in common
        tp = (pred_inside * inside).sum(0)
        support = (full.sum(1)[:, None] * inside).sum(0)
        fp = (pred_inside * disjoint).sum(0)
        return _safe_div(tp, support + fp), support


class GroupConfusion:
    """Binary confusion per coarse group: int64 ``[K, 2, 2]`` (target bit, predicted bit).

    With ``label_sets`` (bool ``[S, 12]``), a pixel labelled with set ``i`` (id ``12 + i``) counts
    for group ``k`` when the set decides it (inside -> target 1, disjoint -> target 0) and is
    skipped for the groups it straddles.
    """

    def __init__(
        self,
        lut: torch.Tensor,
        threshold: float = 0.5,
        device: torch.device | str | None = None,
        label_sets: torch.Tensor | None = None,
    ):
        self.lut = lut.to(device=device, dtype=torch.float32)
        self.num_groups = lut.shape[1]
        self.threshold = threshold
        self.counts = torch.zeros(self.num_groups, 2, 2, dtype=torch.int64, device=device)
        self.target = self.lut.long()  # [12 + S, K] target bit per stored label
        self.known = torch.ones_like(self.target, dtype=torch.bool)
        if label_sets is not None and len(label_sets):
            inside, known = set_coarse_targets(label_sets.to(self.lut.device), self.lut)
            self.target = torch.cat([self.target, inside.long()])
            self.known = torch.cat([self.known, known])

    def update(self, prob_BKS: torch.Tensor, y_fine_BS: torch.Tensor) -> GroupConfusion:
        """Add one batch of coarse probabilities against LUT targets derived from the fine label."""
        y = y_fine_BS.to(self.counts.device).long()
        keep = (y >= 0) & (y < self.target.shape[0])
        target_NK = self.target[y[keep]]
        pred_NK = (prob_BKS.to(self.counts.device).movedim(1, -1)[keep] > self.threshold).long()
        k = torch.arange(self.num_groups, device=self.counts.device)
        idx = k * 4 + target_NK * 2 + pred_NK  # [N, K]
        if self.target.shape[0] > self.lut.shape[0]:
            idx = idx[self.known[y[keep]]]
        self.counts += torch.bincount(idx.reshape(-1), minlength=self.num_groups * 4).view(-1, 2, 2)
        return self

    def all_reduce(self, process_group: dist.ProcessGroup | None = None) -> GroupConfusion:
        _all_reduce_sum(self.counts, process_group)
        return self

    def iou(self) -> torch.Tensor:
        """Per-group IoU of the positive bit; NaN for a group absent from target and prediction."""
        c = self.counts.cpu()
        tp, fn, fp = c[:, 1, 1], c[:, 1, 0], c[:, 0, 1]
        return _safe_div(tp, tp + fn + fp)

    def dice(self) -> torch.Tensor:
        c = self.counts.cpu()
        tp, fn, fp = c[:, 1, 1], c[:, 1, 0], c[:, 0, 1]
        return _safe_div(2 * tp, 2 * tp + fn + fp)

    def accuracy(self) -> torch.Tensor:
        """Per-group bit accuracy over valid pixels."""
        c = self.counts.cpu()
        return _safe_div(c[:, 0, 0] + c[:, 1, 1], c.sum((1, 2)))


class HierarchyConsistency:
    """Share of valid pixels whose fine argmax lies inside the coarse groups predicted positive.

    A pixel is consistent when every group containing its predicted fine class is predicted
    positive (for a partition, as in the default hierarchy: its one group is positive).
    """

    def __init__(self, lut: torch.Tensor, threshold: float = 0.5, device: torch.device | str | None = None):
        self.lut = lut.to(device=device, dtype=torch.bool)
        self.threshold = threshold
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # consistent, total

    def update(self, pred_fine_BS: torch.Tensor, prob_BKS: torch.Tensor, y_fine_BS: torch.Tensor) -> None:
        y = y_fine_BS.to(self.counts.device)
        keep = y != IGNORE_INDEX
        need_NK = self.lut[pred_fine_BS.to(self.counts.device).long()[keep]]
        pos_NK = prob_BKS.to(self.counts.device).movedim(1, -1)[keep] > self.threshold
        ok = (~need_NK | pos_NK).all(dim=1)
        self.counts += torch.stack([ok.sum(), torch.tensor(ok.numel(), device=ok.device)])

    def all_reduce(self, process_group: dist.ProcessGroup | None = None) -> HierarchyConsistency:
        _all_reduce_sum(self.counts, process_group)
        return self

    def rate(self) -> float:
        ok, total = (int(v) for v in self.counts.cpu())
        return ok / total if total else math.nan


class EvalMetrics:
    """Fine confusion (with label-set rows), per-level group confusion and consistency; reduced in one collective."""

    def __init__(
        self,
        num_fine: int,
        luts: Sequence[torch.Tensor],
        device: torch.device | str | None = None,
        label_sets: torch.Tensor | None = None,
        set_names: Sequence[str] = (),
    ):
        table = label_sets if label_sets is not None else torch.zeros(0, num_fine, dtype=torch.bool)
        if len(set_names) not in (0, table.shape[0]):
            raise ValueError(f"set_names has {len(set_names)} names for {table.shape[0]} label sets")
        self.fine = ConfusionMatrix(num_fine, device=device, label_sets=table)
        self.coarse = [GroupConfusion(lut, device=device, label_sets=label_sets) for lut in luts]
        self.consistency = [HierarchyConsistency(lut, device=device) for lut in luts]
        self.set_names = tuple(set_names) or tuple(f"set{SET_ID_OFFSET + i}" for i in range(table.shape[0]))

    @torch.no_grad()
    def update(self, pred_fine: torch.Tensor, coarse_probs: Sequence[torch.Tensor], y_fine: torch.Tensor) -> None:
        """One batch of decided fine labels ``[B, *S]`` and coarse probabilities ``[B, K, *S]`` per level (2D or 3D)."""
        self.fine.update(pred_fine, y_fine)
        for gc, hc, prob in zip(self.coarse, self.consistency, coarse_probs, strict=True):
            gc.update(prob, y_fine)
            hc.update(pred_fine, prob, y_fine)

    def _tensors(self) -> list[torch.Tensor]:
        return [
            self.fine.matrix,
            self.fine.set_matrix,
            *(g.counts for g in self.coarse),
            *(h.counts for h in self.consistency),
        ]

    def all_reduce(self, process_group: dist.ProcessGroup | None = None) -> EvalMetrics:
        """Sum every count over ranks with a single collective."""
        all_reduce_metrics([self], process_group)
        return self

    @classmethod
    def summed(cls, parts: Sequence[EvalMetrics]) -> EvalMetrics:
        """The counts of ``parts`` (one per data source, same classes, levels and set table) added up.

        Every rate is then derived from the summed counts, so "all sources together" is exactly the
        metric of one evaluation over every source's pixels, never an average of per-source rates.
        """
        if not parts:
            raise ValueError("EvalMetrics.summed needs at least one part")
        total = copy.deepcopy(parts[0])
        for t_total, *t_parts in zip(total._tensors(), *(p._tensors() for p in parts[1:]), strict=True):
            for t in t_parts:
                t_total += t
        return total


def all_reduce_metrics(parts: Sequence[EvalMetrics], process_group: dist.ProcessGroup | None = None) -> None:
    """Sum the counts of several :class:`EvalMetrics` (one per source) over ranks in one collective.

    One flat int64 buffer keeps the collective count independent of the number of sources, and every
    rank calls it with the same parts (the spec's validation sources), so it is symmetric.
    """
    tensors = [t for m in parts for t in m._tensors()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _all_reduce_sum(flat, process_group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
