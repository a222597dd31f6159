"""``hierseg evaluate``: per-class IoU / Dice of a model on labelled shards or a labelled volume.

Why a separate command: training logs validation metrics of its own checkpoints, but picking a
registered model for a new data set needs the same numbers on that data, through the same
inference path users run (tiling, blending, hierarchy-consistent labels). Uncertain pixels are
never scored; a class with no pixels in target or prediction (soma, today) reads "no data".
``--raw`` scores the plain fine argmax, as training's validation does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hierseg.infer import PredictError, PredictOptions, load_model, predict_image
from hierseg.labels import FINE_CLASSES, NUM_FINE_CLASSES, Hierarchy, LabelSets
from hierseg.metrics import ConfusionMatrix, GroupConfusion


def shard_samples(url: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(image [C,H,W] float32 in [0,1], label [H,W] int64)`` of every sample of the shards at ``url``."""
    from hierseg.data.loader import decode_sample, iter_raw_samples, resolve_shards

    for shard in resolve_shards(url):
        for raw in iter_raw_samples(shard):
            try:
                image, label = decode_sample(raw)
            except ValueError as e:
                raise ValueError(f"bad sample {raw.get('__key__')!r} in shard {shard}: {e}") from None
            yield image.numpy(), label.numpy()


def volume_samples(image: str, labels: str, label_map: str | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Slices of a labelled volume; label values go through the label map (default: identity, 255 uncertain)."""
    from hierseg.data.io import read_array
    from hierseg.data.labelmap import LabelMap
    from hierseg.stackio import open_input

    stack = open_input(image)
    lab = read_array(labels)
    lab = lab[None] if lab.ndim == 2 else lab
    if lab.shape != (len(stack), *stack.shape[-2:]):
        raise ValueError(f"--labels {labels} has shape {lab.shape} but --image {image} is {stack.shape}")
    lmap = LabelMap.from_yaml(label_map) if label_map else LabelMap.default()
    for z in range(len(stack)):
        mapped, _ = lmap.apply(lab[z], where=f"{labels} slice {z}")
        yield stack[z], mapped


def score(
    model: torch.nn.Module,
    hierarchy: Hierarchy,
    samples: Any,
    opts: PredictOptions,
    label_sets: LabelSets | None = None,
) -> dict[str, Any]:
    """Confusion counts over all samples, then the per-class report.

    Partial-label (set) pixels count in the coarse table for the groups their set decides.
    """
    fine = ConfusionMatrix(NUM_FINE_CLASSES)
    level = hierarchy.levels[0]
    table = label_sets.table() if label_sets is not None and len(label_sets) else None
    groups = GroupConfusion(level.lut(), label_sets=table)
    for image, label in samples:
        out = predict_image(model, image, hierarchy=hierarchy, options=opts)
        y = torch.from_numpy(np.asarray(label, dtype=np.int64))
        fine.update(torch.from_numpy(out["fine_labels"].astype(np.int64)), y)
        groups.update(torch.from_numpy(out["coarse_prob"].astype(np.float32))[None], y[None])
    return report(fine, groups, level.name, level.group_names)


def _row(iou: float, dice: float, pixels: int) -> dict[str, Any]:
    if math.isnan(iou):
        return {"iou": None, "dice": None, "pixels": pixels, "note": "no data"}
    return {"iou": iou, "dice": dice, "pixels": pixels}


def report(fine: ConfusionMatrix, groups: GroupConfusion, level: str, names: tuple[str, ...]) -> dict[str, Any]:
    """JSON-ready report: fine per class and coarse per group; NaN classes become ``"no data"``."""
    support = fine.matrix.sum(1).tolist()
    g_support = groups.counts[:, 1, :].sum(1).tolist()
    g_iou = groups.iou()
    g_valid = g_iou[~g_iou.isnan()]
    return {
        "num_valid": fine.num_valid,
        "fine": {
            "miou": fine.miou(),
            "accuracy": fine.accuracy(),
            "classes": {
                n: _row(i, d, s)
                for n, i, d, s in zip(FINE_CLASSES, fine.iou().tolist(), fine.dice().tolist(), support, strict=True)
            },
        },
        "coarse": {
            "level": level,
            "miou": float(g_valid.mean()) if g_valid.numel() else math.nan,
            "groups": {
                n: _row(i, d, s) for n, i, d, s in zip(names, g_iou.tolist(), groups.dice().tolist(), g_support)
            },
        },
    }


def format_table(rep: dict[str, Any]) -> str:
    """Human-readable table of the report."""
    lines = [f"valid pixels: {rep['num_valid']}", "", f"{'fine class':<22}{'IoU':>8}{'Dice':>8}{'pixels':>12}"]

    def rows(items: dict[str, dict[str, Any]]) -> list[str]:
        out = []
        for name, r in items.items():
            if r["iou"] is None:
                out.append(f"{name:<22}{'no data':>16}{r['pixels']:>12}")
            else:
                out.append(f"{name:<22}{r['iou']:>8.4f}{r['dice']:>8.4f}{r['pixels']:>12}")
        return out

    lines += rows(rep["fine"]["classes"])
    lines += [f"{'mean IoU':<22}{rep['fine']['miou']:>8.4f}", f"{'accuracy':<22}{rep['fine']['accuracy']:>8.4f}", ""]
    lines += [f"{'coarse group (' + rep['coarse']['level'] + ')':<22}{'IoU':>8}{'Dice':>8}{'pixels':>12}"]
    lines += rows(rep["coarse"]["groups"])
    lines += [f"{'mean IoU':<22}{rep['coarse']['miou']:>8.4f}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hierseg evaluate", description="Per-class IoU/Dice of a model.")
    ap.add_argument("--model", required=True, help="models:/NAME@alias | models:/NAME/VERSION | runs:/ID/model | ckpt")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI)")
    ap.add_argument("--shards", help="shard folder or glob (as data.val)")
    ap.add_argument("--image", help="labelled volume or image (any predict --input)")
    ap.add_argument("--labels", help="label volume matching --image")
    ap.add_argument("--label-map", help="YAML label map for --labels (default: identity 0..11, 255 uncertain)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--raw", action="store_true", help="score the plain fine argmax (as training's validation)")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    return ap.parse_args(argv)


def _label_sets(args: argparse.Namespace) -> LabelSets | None:
    """The set table of the labels being scored: the shards' manifest, or the label map's."""
    from hierseg.data.labelmap import LabelMap, manifest_label_sets
    from hierseg.data.loader import read_manifest

    if args.shards:
        return manifest_label_sets(read_manifest(args.shards), f"manifest of {args.shards}")
    return LabelMap.from_yaml(args.label_map).sets if args.label_map else None


def main(argv: list[str] | None = None) -> int:
    from hierseg.registry import RegistryError

    args = parse_args(argv)
    try:
        if bool(args.shards) == bool(args.image) or bool(args.image) != bool(args.labels):
            raise PredictError("give either --shards, or --image with --labels (and optionally --label-map)")
        model, spec = load_model(args.model, args.tracking_uri)
        opts = PredictOptions(args.tile, args.overlap, args.batch, coarse_threshold=2.0 if args.raw else 0.5)
        samples = shard_samples(args.shards) if args.shards else volume_samples(args.image, args.labels, args.label_map)
        rep = score(model, spec.hierarchy.build(), samples, opts, _label_sets(args))
    except (RegistryError, ValueError, ConnectionError) as e:
        print(f"hierseg evaluate: {e}", file=sys.stderr)
        return 2
    rep["model"] = args.model
    print(json.dumps(rep, indent=1) if args.format == "json" else format_table(rep))
    return 0
