"""Segmentation metrics from int64 confusion counts; uncertain pixels are never counted.

Counts are summed over ranks once (``all_reduce``), and every rate (IoU, Dice, accuracy,
consistency) is derived afterwards from the global sums, never averaged over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from hierseg.labels import IGNORE_INDEX, SET_ID_OFFSET, set_coarse_targets


def _all_reduce_sum(t: torch.Tensor, process_group: dist.ProcessGroup | None) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(t, group=process_group)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


class ConfusionMatrix:
    """``[C, C]`` int64 counts, rows = target, columns = prediction; target ``-1`` is skipped.

    Targets outside ``0..C-1`` (for example partial-label set ids) are skipped as well.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None):
        assert num_classes > 0
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> ConfusionMatrix:
        """Add one batch: ``pred`` and ``target`` are integer tensors of the same shape."""
        assert pred.shape == target.shape, f"pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
        c = self.num_classes
        target = target.to(self.matrix.device).long()
        keep = (target >= 0) & (target < c)
        idx = target[keep] * c + pred.to(self.matrix.device).long()[keep]
        self.matrix += torch.bincount(idx, minlength=c * c).view(c, c)
        return self

    def all_reduce(self, process_group: dist.ProcessGroup | None = None) -> ConfusionMatrix:
        """Sum the counts over all ranks (in place); a no-op outside ``torch.distributed``."""
        _all_reduce_sum(self.matrix, process_group)
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    @property
    def num_valid(self) -> int:
        return int(self.matrix.sum())

    def _tp_support(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.matrix.cpu()
        tp = m.diagonal()
        return tp, m.sum(1), m.sum(0)

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64); NaN for a class absent from both target and prediction."""
        tp, rows, cols = self._tp_support()
        return _safe_div(tp, rows + cols - tp)

    def dice(self) -> torch.Tensor:
        """Per-class Dice (float64); NaN for a class absent from both target and prediction."""
        tp, rows, cols = self._tp_support()
        return _safe_div(2 * tp, rows + cols)

    def miou(self) -> float:
        """Mean IoU over classes that occur in target or prediction (NaN when none does)."""
        iou = self.iou()
        iou = iou[~iou.isnan()]
        return float(iou.mean()) if iou.numel() else math.nan

    def accuracy(self) -> float:
        """Share of valid pixels predicted correctly (NaN when there is none)."""
        total = self.matrix.sum()
        return float(self.matrix.trace()) / float(total) if int(total) > 0 else math.nan


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

    def update(self, prob_BKHW: torch.Tensor, y_fine_BHW: torch.Tensor) -> GroupConfusion:
        """Add one batch of coarse probabilities against LUT targets derived from the fine label."""
        y = y_fine_BHW.to(self.counts.device).long()
        keep = (y >= 0) & (y < self.target.shape[0])
        target_NK = self.target[y[keep]]
        pred_NK = (prob_BKHW.to(self.counts.device).permute(0, 2, 3, 1)[keep] > self.threshold).long()
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

    def update(self, pred_fine_BHW: torch.Tensor, prob_BKHW: torch.Tensor, y_fine_BHW: torch.Tensor) -> None:
        y = y_fine_BHW.to(self.counts.device)
        keep = y != IGNORE_INDEX
        need_NK = self.lut[pred_fine_BHW.to(self.counts.device).long()[keep]]
        pos_NK = prob_BKHW.to(self.counts.device).permute(0, 2, 3, 1)[keep] > self.threshold
        ok = (~need_NK | pos_NK).all(dim=1)
        self.counts += torch.stack([ok.sum(), torch.tensor(ok.numel(), device=ok.device)])

    def all_reduce(self, process_group: dist.ProcessGroup | None = None) -> HierarchyConsistency:
        _all_reduce_sum(self.counts, process_group)
        return self

    def rate(self) -> float:
        ok, total = (int(v) for v in self.counts.cpu())
        return ok / total if total else math.nan


class SetAccuracy:
    """Per label set: pixels whose predicted fine class lies inside the set, and all its pixels.

    Set-labelled pixels have no single true class, so they stay out of the fine confusion matrix;
    this is the one fine-level question they can answer.
    """

    def __init__(self, label_sets: torch.Tensor, device: torch.device | str | None = None):
        self.table = label_sets.to(device=device, dtype=torch.bool)
        self.counts = torch.zeros(self.table.shape[0], 2, dtype=torch.int64, device=device)  # inside, total

    def update(self, pred_fine_BHW: torch.Tensor, y_fine_BHW: torch.Tensor) -> None:
        num_sets = self.table.shape[0]
        if num_sets == 0:
            return
        y = y_fine_BHW.to(self.counts.device).long()
        keep = (y >= SET_ID_OFFSET) & (y < SET_ID_OFFSET + num_sets)
        set_id = y[keep] - SET_ID_OFFSET
        hit = self.table[set_id, pred_fine_BHW.to(self.counts.device).long()[keep]]
        self.counts[:, 0] += torch.bincount(set_id[hit], minlength=num_sets)
        self.counts[:, 1] += torch.bincount(set_id, minlength=num_sets)

    def accuracy(self) -> torch.Tensor:
        """Per set (float64); NaN for a set with no pixels."""
        c = self.counts.cpu()
        return _safe_div(c[:, 0], c[:, 1])


class EvalMetrics:
    """Fine confusion, per-level group confusion, consistency and set accuracy; reduced in one collective."""

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
        self.fine = ConfusionMatrix(num_fine, device=device)
        self.coarse = [GroupConfusion(lut, device=device, label_sets=label_sets) for lut in luts]
        self.consistency = [HierarchyConsistency(lut, device=device) for lut in luts]
        self.sets = SetAccuracy(table, device=device)
        self.set_names = tuple(set_names) or tuple(f"set{SET_ID_OFFSET + i}" for i in range(table.shape[0]))

    @torch.no_grad()
    def update(self, logits_fine: torch.Tensor, logits_coarse: Sequence[torch.Tensor], y_fine: torch.Tensor) -> None:
        pred = logits_fine.argmax(dim=1)
        self.fine.update(pred, y_fine)
        self.sets.update(pred, y_fine)
        for gc, hc, lc in zip(self.coarse, self.consistency, logits_coarse, strict=True):
            prob = torch.sigmoid(lc.float())
            gc.update(prob, y_fine)
            hc.update(pred, prob, y_fine)

    def _tensors(self) -> list[torch.Tensor]:
        return [
            self.fine.matrix,
            *(g.counts for g in self.coarse),
            *(h.counts for h in self.consistency),
            self.sets.counts,
        ]

    def all_reduce(self, process_group: dist.ProcessGroup | None = None) -> EvalMetrics:
        """Sum every count over ranks with a single collective."""
        tensors = self._tensors()
        flat = torch.cat([t.reshape(-1) for t in tensors])
        _all_reduce_sum(flat, process_group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return self
