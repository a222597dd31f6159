"""Scoring a model: training's validation and ``hierseg evaluate`` are one code path.

Each labelled slice goes through the same sliding window and decoding as ``hierseg predict``
(windows of the training patch size, 1/8 overlap, the model's default decoding), so the logged
figures are the ones a user gets by predicting those slices and scoring them by hand. Training runs
it on its share of the validation split and all-reduces the counts once; ``hierseg evaluate`` runs
it on any labelled shards or volume with a registered model. Uncertain pixels are never scored; a
class with no labelled pixel and no false positive reads "no data". A 3D block (a 3D model's
validation, or a labelled volume given to ``hierseg evaluate``) is scored in non-overlapping windows of the
training patch size with the same decoding, so each voxel counts once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hierseg.labels import FINE_CLASSES, NUM_FINE_CLASSES, Hierarchy, LabelSets, LabelSpace, LabelValue
from hierseg.metrics import EvalMetrics
from hierseg.serve.infer import (
    NO_COARSE,
    PredictError,
    PredictOptions,
    Predictor,
    autocast_for,
    block_windows,
    decide,
    predict_probs,
    window_probs,
)


@dataclass
class EvalSample:
    """A few validation slices with predictions, for the side-by-side plot."""

    image_BHW: torch.Tensor
    label_BHW: torch.Tensor
    pred_BHW: torch.Tensor
    coarse_prob_BKHW: torch.Tensor


def identity_label_space() -> LabelSpace:
    """Every fine class as its own value: the label space of data with no recorded label map."""
    return LabelSpace(tuple(LabelValue(n, i, (i,), i) for i, n in enumerate(FINE_CLASSES)))


@torch.no_grad()
def run_eval(
    model: torch.nn.Module,
    batches,
    hierarchy: Hierarchy,
    device: torch.device,
    options: PredictOptions,
    label_sets: LabelSets | None = None,
    label_space: LabelSpace | None = None,
    num_samples: int = 4,
) -> tuple[EvalMetrics, EvalSample | None]:
    """Predict every slice of this rank's share; counts are all-reduced once by the caller."""
    parts, sample = run_eval_sources(
        model, batches, hierarchy, device, [(options, label_space)], label_sets, num_samples
    )
    return parts[0], sample


@torch.no_grad()
def run_eval_sources(
    model: torch.nn.Module,
    batches,
    hierarchy: Hierarchy,
    device: torch.device,
    per_source: Sequence[tuple[PredictOptions, LabelSpace | None]],
    label_sets: LabelSets | None = None,
    num_samples: int = 4,
) -> tuple[list[EvalMetrics], EvalSample | None]:
    """One :class:`EvalMetrics` per source; a batch is ``(image, label)`` or ``(image, label, source)``.

    Each source's slices are decoded as that source's labels ask (its own label space), because its
    scores answer its annotation's question; the caller reduces all parts in one collective.
    """
    sets = label_sets or LabelSets()
    luts = hierarchy.luts()
    parts = [
        EvalMetrics(NUM_FINE_CLASSES, luts, device=device, label_sets=sets.table(), set_names=sets.names)
        for _ in per_source
    ]
    shown: list[tuple[torch.Tensor, ...]] = []
    was_training = model.training
    model.eval()
    for image_1CS, label_1S, *tag in batches:
        k = int(tag[0]) if tag else 0
        options, space = per_source[k]
        for box, pred_S, coarse in _decided(model, image_1CS[0], device, options, space, hierarchy):
            label_S = label_1S[0][box].long()  # the loader's int16; the metrics index with int64
            parts[k].update(pred_S[None], [c[None] for c in coarse], label_S[None])
            if len(shown) < num_samples:
                shown.append(_plot_section(image_1CS[0][(slice(None), *box)], label_S, pred_S, coarse[0]))
    model.train(was_training)
    return parts, _sample(shown)


def _decided(
    model: torch.nn.Module, image_CS: torch.Tensor, device: torch.device, options: PredictOptions,
    space: LabelSpace | None, hierarchy: Hierarchy,
) -> Iterator[tuple[tuple[slice, ...], torch.Tensor, tuple[torch.Tensor, ...]]]:  # fmt: skip
    """``(box, fine labels [*s], coarse probabilities [K, *s] per level)`` of one validation sample.

    A 2D slice goes whole through ``hierseg predict``'s sliding window (one box: all of it); a 3D block
    window by window (:func:`_block_probs`).
    """
    if image_CS.dim() == 3:
        items: Any = [((slice(None), slice(None)), predict_probs(model, image_CS.to(device), options))]
    else:
        items = _block_probs(model, image_CS, device, options)
    lut = hierarchy.lut()
    for box, probs in items:
        pred_S = torch.from_numpy(decide(probs, lut, options, space)["fine_labels"]).long()
        yield box, pred_S, torch.split(probs[NUM_FINE_CLASSES:], hierarchy.num_groups)


def _block_probs(model: torch.nn.Module, image_CDHW: torch.Tensor, device: torch.device, options: PredictOptions):
    """``(box, probabilities [12 + sum K, d, h, w])`` of each window of a 3D block (:func:`block_windows`, no
    overlap): every voxel is scored once, and memory stays one window's probabilities however large the block."""
    if options.window is None:
        raise ValueError("scoring a 3D block needs PredictOptions.window (the 3D training patch size [z, y, x])")
    autocast = autocast_for(options, device)
    for box in block_windows(tuple(image_CDHW.shape[1:]), options.window):
        x_BCS = image_CDHW[(slice(None), *box)][None].to(device)
        yield box, window_probs(model, x_BCS, autocast, options.tta, options.source)[0].cpu()


def _plot_section(image_CS: torch.Tensor, label_S: torch.Tensor, pred_S: torch.Tensor, coarse_KS: torch.Tensor):
    """What the samples figure shows of a sample: a 2D slice itself, the middle section of a 3D window."""
    if label_S.dim() == 3:
        mid = label_S.shape[0] // 2
        return image_CS[0, mid].float(), label_S[mid], pred_S[mid], coarse_KS[:, mid]
    return image_CS[0].float(), label_S, pred_S, coarse_KS


def _sample(shown: list[tuple[torch.Tensor, ...]]) -> EvalSample | None:
    """Stack the first slices for the plot, cut to their common size (slices may differ in size)."""
    if not shown:
        return None
    h = min(s[0].shape[-2] for s in shown)
    w = min(s[0].shape[-1] for s in shown)
    parts = [torch.stack([s[i][..., :h, :w] for s in shown]) for i in range(4)]
    return EvalSample(*parts)


def summarize(metrics: EvalMetrics, hierarchy: Hierarchy, label_space: LabelSpace | None = None) -> dict[str, float]:
    """MLflow keys: ``val/num_valid``, ``val/fine/...``, ``val/<level>/...``, ``val/label/...``, set accuracy.

    "No data" classes (no labelled pixel and no false positive, e.g. soma) are left out rather than
    logged as 0. ``val/num_valid`` counts single-class pixels, matching the manifest's ``class_histogram``.
    ``val/label/miou`` averages the label-space IoU over the values that have labelled pixels, so
    classes the data never labels cannot rank a checkpoint (it is the default ``run.best_metric``).
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
    out.update(_label_summary(metrics, label_space or identity_label_space()))
    out.update(_set_summary(metrics))
    return out


def summarize_sources(
    parts: Mapping[str, EvalMetrics], hierarchy: Hierarchy, spaces: Mapping[str, LabelSpace | None],
    together: EvalMetrics, together_space: LabelSpace | None,
) -> dict[str, float]:  # fmt: skip
    """The usual ``val/...`` keys for all sources together, and the same keys per source as ``val/<source>/...``.

    ``together`` is the parts' summed counts (:meth:`EvalMetrics.summed`), so ``val/num_valid`` is the
    sum over sources and every together rate comes from the summed counts. Each source is scored in
    its own label space (``val/<source>/label/iou/<value>``).
    """
    out = summarize(together, hierarchy, together_space)
    for name, metrics in parts.items():
        for key, value in summarize(metrics, hierarchy, spaces.get(name)).items():
            out[f"val/{name}/{key.removeprefix('val/')}"] = value
    return out


def _label_summary(metrics: EvalMetrics, space: LabelSpace) -> dict[str, float]:
    iou, support = metrics.fine.label_iou(space)
    out = {f"val/label/iou/{v.name}": float(i) for v, i in zip(space.values, iou.tolist()) if not math.isnan(i)}
    scored = iou[(support > 0) & ~iou.isnan()]
    out["val/label/miou"] = float(scored.mean()) if scored.numel() else math.nan
    return out


def _set_summary(metrics: EvalMetrics) -> dict[str, float]:
    """Per-set accuracy (prediction inside the set) for the sets that have pixels."""
    if not metrics.set_names:
        return {}
    out = {"val/num_set_pixels": float(metrics.fine.set_counts()[:, 1].sum())}
    for name, acc in zip(metrics.set_names, metrics.fine.set_accuracy().tolist(), strict=True):
        if not math.isnan(acc):
            out[f"val/set_accuracy/{name}"] = acc
    return out


# ------------------------------------------------------------------------------------ hierseg evaluate
def shard_batches(url: str, predictor: Predictor, num_labels: int) -> Any:
    """Every stored slice of the shards at ``url``, normalised as the model was trained, one at a time."""
    from hierseg.data.loader import ValLoader, resolve_shards, shard_counts

    shards = resolve_shards(url)
    cfg = {"normalization": predictor.normalization, "num_labels": num_labels, "on_bad_sample": "stop"}
    return ValLoader(shards, shard_counts(url, shards), 0, 1, cfg, num_workers=0)


def volume_batches(image: str, labels: str, label_map: Any, predictor: Predictor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Slices of a labelled volume; label values go through the label map (default: identity, 255 uncertain)."""
    from hierseg.data.io import open_input, read_array
    from hierseg.data.normalize import normalize

    stack = open_input(image)
    try:  # a TIFF or HDF5 input stays open while slices are read: closed however the scoring ends
        lab = read_array(labels)
        lab = lab[None] if lab.ndim == 2 else lab
        if lab.shape != (len(stack), *stack.shape[-2:]):
            raise ValueError(f"--labels {labels} has shape {lab.shape} but --image {image} is {stack.shape}")
        if predictor.dims == 3:  # one block [1, C, D, H, W], scored in windows as validation scores 3D blocks
            from hierseg.serve.infer import block_input, in_channels_of

            mapped, _ = label_map.apply(lab, where=labels)
            x = block_input(np.asarray(stack[0 : len(stack)]), predictor.normalization, in_channels_of(predictor.model))
            yield x[None], torch.from_numpy(mapped)[None]
            return
        from hierseg.serve.infer import context_of, slice_input

        context = context_of(predictor.model)
        for z in range(len(stack)):
            mapped, _ = label_map.apply(lab[z], where=f"{labels} slice {z}")
            x = normalize(slice_input(stack, z, context), predictor.normalization)
            x = x[None] if x.ndim == 2 else x
            yield torch.from_numpy(x)[None], torch.from_numpy(mapped)[None]
    finally:
        stack.close()


def report(summary: dict[str, float], metrics: EvalMetrics, hierarchy: Hierarchy, space: LabelSpace) -> dict:
    """JSON-ready report: fine classes, first-level coarse groups, label-space values; NaN -> "no data"."""

    def row(value: float, pixels: int, dice: float | None = None) -> dict[str, Any]:
        if math.isnan(value):
            return {"iou": None, "dice": None, "pixels": pixels, "note": "no data"}
        return {"iou": value, "dice": dice, "pixels": pixels}

    fine = metrics.fine
    level, gc = hierarchy.levels[0], metrics.coarse[0]
    label_iou, label_support = fine.label_iou(space)
    g_support = gc.counts[:, 1, :].sum(1).tolist()
    fine_rows = zip(FINE_CLASSES, fine.iou().tolist(), fine.dice().tolist(), fine.support().tolist())
    group_rows = zip(level.group_names, gc.iou().tolist(), gc.dice().tolist(), g_support)
    return {
        "num_valid": fine.num_valid,
        "fine": {
            "miou": fine.miou(),
            "accuracy": fine.accuracy(),
            "classes": {n: row(i, s, d) for n, i, d, s in fine_rows},
        },
        "coarse": {
            "level": level.name,
            "miou": summary[f"val/{level.name}/miou"],
            "groups": {n: row(i, s, d) for n, i, d, s in group_rows},
        },
        "label": {
            "miou": summary["val/label/miou"],
            "values": {v.name: row(i, s) for v, i, s in zip(space.values, label_iou.tolist(), label_support.tolist())},
        },
    }


def format_table(rep: dict[str, Any]) -> str:
    """Human-readable table of the report."""

    def rows(title: str, items: dict[str, dict[str, Any]], miou: float) -> list[str]:
        out = [f"{title:<26}{'IoU':>8}{'Dice':>8}{'pixels':>12}"]
        for name, r in items.items():
            if r["iou"] is None:
                out.append(f"{name:<26}{'no data':>16}{r['pixels']:>12}")
            else:
                dice = "" if r["dice"] is None else f"{r['dice']:.4f}"
                out.append(f"{name:<26}{r['iou']:>8.4f}{dice:>8}{r['pixels']:>12}")
        return [*out, f"{'mean IoU':<26}{miou:>8.4f}", ""]

    lines = [f"valid pixels: {rep['num_valid']}", ""]
    lines += rows("label-map value", rep["label"]["values"], rep["label"]["miou"])
    lines += rows("fine class", rep["fine"]["classes"], rep["fine"]["miou"])
    lines += [f"{'accuracy':<26}{rep['fine']['accuracy']:>8.4f}", ""]
    lines += rows(f"coarse group ({rep['coarse']['level']})", rep["coarse"]["groups"], rep["coarse"]["miou"])
    return "\n".join(lines).rstrip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from hierseg.serve.infer import add_tiling_args

    ap = argparse.ArgumentParser(prog="hierseg evaluate", description="Per-class IoU/Dice of a model.")
    ap.add_argument("--model", required=True, help="models:/NAME@alias | models:/NAME/VERSION | runs:/ID/model | ckpt")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI)")
    ap.add_argument("--shards", help="shard folder or glob (as data.val)")
    ap.add_argument("--image", help="labelled volume or image (any predict --input)")
    ap.add_argument("--labels", help="label volume matching --image")
    ap.add_argument("--label-map", help="YAML label map for --labels (default: identity 0..11, 255 uncertain)")
    add_tiling_args(ap)
    ap.add_argument("--raw", action="store_true", help="no coarse restriction of the fine argmax")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    return ap.parse_args(argv)


def _labels_of(args: argparse.Namespace, predictor: Predictor) -> tuple[LabelSets, LabelSpace, Any]:
    """The set table and label space of the labels being scored: the shards' manifest, or the label map's."""
    from hierseg.data.labelmap import LabelMap, manifest_label_sets
    from hierseg.data.loader import read_manifest

    if args.shards:
        manifest = read_manifest(args.shards) or {}
        sets = manifest_label_sets(manifest, f"manifest of {args.shards}") or LabelSets()
        record, lmap = manifest.get("label_map"), None
    else:
        lmap = LabelMap.from_yaml(args.label_map) if args.label_map else LabelMap.default()
        sets, record = lmap.sets, lmap.to_manifest()
    trained = predictor.label_space.values if predictor.label_space else None
    space = LabelSpace.from_label_map(record, sets) if record else identity_label_space()
    if trained is not None and record and tuple(v.name for v in trained) != space.names:
        print(f"hierseg evaluate: note: the labels use the values {list(space.names)}, the model was trained on "
              f"{[v.name for v in trained]}; scores are in the labels' values", file=sys.stderr)  # fmt: skip
    return sets, space, lmap


def main(argv: list[str] | None = None) -> int:
    from hierseg.registry import RegistryError
    from hierseg.serve.infer import default_options, load_predictor

    args = parse_args(argv)
    try:
        if bool(args.shards) == bool(args.image) or bool(args.image) != bool(args.labels):
            raise PredictError("give either --shards, or --image with --labels (and optionally --label-map)")
        predictor = load_predictor(args.model, args.tracking_uri)
        sets, space, lmap = _labels_of(args, predictor)
        opts = default_options(predictor, tile=args.tile, overlap=args.overlap, batch=args.batch,
                               decode=args.decode, coarse_threshold=NO_COARSE if args.raw else None,
                               tta=args.tta, source=args.source)  # fmt: skip
        num_labels = NUM_FINE_CLASSES + len(sets)
        batches = (shard_batches(args.shards, predictor, num_labels) if args.shards
                   else volume_batches(args.image, args.labels, lmap, predictor))  # fmt: skip
        hierarchy = predictor.hierarchy
        metrics, _ = run_eval(predictor.model, batches, hierarchy, torch.device("cpu"), opts, sets, space)
        rep = report(summarize(metrics, hierarchy, space), metrics, hierarchy, space)
    except (RegistryError, ValueError, ConnectionError) as e:
        print(f"hierseg evaluate: {e}", file=sys.stderr)
        return 2
    rep["model"] = args.model
    print(json.dumps(rep, indent=1) if args.format == "json" else format_table(rep))
    return 0
