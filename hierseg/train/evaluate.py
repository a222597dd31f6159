"""Evaluation: the whole validation split, exactly once across ranks, one all-reduce of counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hierseg.labels import FINE_CLASSES, NUM_FINE_CLASSES, Hierarchy, LabelSets
from hierseg.metrics import EvalMetrics


@dataclass
class EvalSample:
    """A few validation patches with predictions, for the side-by-side plot."""

    image_BHW: torch.Tensor
    label_BHW: torch.Tensor
    pred_BHW: torch.Tensor
    coarse_prob_BKHW: torch.Tensor


@torch.no_grad()
def run_eval(
    model: torch.nn.Module,
    batches,
    luts: list[torch.Tensor],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    num_samples: int = 4,
    label_sets: LabelSets | None = None,
) -> tuple[EvalMetrics, EvalSample | None]:
    """Forward every batch of this rank's share; counts are all-reduced once by the caller."""
    sets = label_sets or LabelSets()
    metrics = EvalMetrics(NUM_FINE_CLASSES, luts, device=device, label_sets=sets.table(), set_names=sets.names)
    sample = None
    was_training = model.training
    model.eval()
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits_fine, logits_coarse = model(images)
        metrics.update(logits_fine.float(), [lc.float() for lc in logits_coarse], labels)
        if sample is None:
            n = min(num_samples, images.shape[0])
            sample = EvalSample(
                images[:n, 0].float().cpu(),
                labels[:n].cpu(),
                logits_fine[:n].argmax(1).cpu(),
                torch.sigmoid(logits_coarse[0][:n].float()).cpu(),
            )
    model.train(was_training)
    return metrics, sample


def summarize(metrics: EvalMetrics, hierarchy: Hierarchy) -> dict[str, float]:
    """MLflow keys: ``val/num_valid``, ``val/fine/miou``, ``val/fine/iou/<class>``, ``val/<level>/iou/<group>``.

    Classes with no pixels in target or prediction (soma) are left out rather than logged as 0.
    ``val/num_valid`` counts single-class pixels (the fine confusion matrix), matching the manifest's
    ``class_histogram``; set-labelled pixels add ``val/set_accuracy/<set>`` and ``val/num_set_pixels``.
    """
    out: dict[str, float] = {
        "val/num_valid": float(metrics.fine.num_valid),
        "val/fine/miou": metrics.fine.miou(),
        "val/fine/accuracy": metrics.fine.accuracy(),
    }
    for name, iou, dice in zip(FINE_CLASSES, metrics.fine.iou().tolist(), metrics.fine.dice().tolist(), strict=True):
        if not math.isnan(iou):
            out[f"val/fine/iou/{name}"] = iou
            out[f"val/fine/dice/{name}"] = dice
    for level, gc, hc in zip(hierarchy.levels, metrics.coarse, metrics.consistency, strict=True):
        ious = gc.iou()
        for name, iou in zip(level.group_names, ious.tolist(), strict=True):
            if not math.isnan(iou):
                out[f"val/{level.name}/iou/{name}"] = iou
        valid = ious[~ious.isnan()]
        out[f"val/{level.name}/miou"] = float(valid.mean()) if valid.numel() else math.nan
        out[f"val/{level.name}/consistency"] = hc.rate()
    out.update(_set_summary(metrics))
    return out


def _set_summary(metrics: EvalMetrics) -> dict[str, float]:
    """Per-set accuracy (prediction inside the set) for the sets that have pixels."""
    if not metrics.set_names:
        return {}
    out = {"val/num_set_pixels": float(metrics.sets.counts[:, 1].sum())}
    for name, acc in zip(metrics.set_names, metrics.sets.accuracy().tolist(), strict=True):
        if not math.isnan(acc):
            out[f"val/set_accuracy/{name}"] = acc
    return out
