"""Partial labels that pay off, on real data (issue 11, item 4): one joint model vs one model per source.

    python bench/partial_labels.py [--seeds 0] [--steps 300] [--batch 8] [--patch 256]
        [--base-channels 8] [--depth 4] [--set KEY=VALUE ...] [--out DIR]

Part (a) of the issue, binary mitochondria with a ``{not: [mitochondria]}`` set vs a bare 2-class
loop, is ``python bench/realdata.py --datasets vnc`` (the same split and scorer as below; figures in
bench/README.md). This file is part (b): three sources, each supervised at the level it was annotated,

- ``srf``      srf_tem, 7 training mice: axon, myelin; everything else uncertain (split by mouse as
               bench/realdata.py; the 3 other mice are held out);
- ``vnc_sets`` vnc_sstem sections 0..6 with ``examples/label_maps/vnc_sstem_sets.yaml``: mitochondria,
               ``[glia, extracellular space]``, ``neuron_part`` (a neurite of unknown type);
- ``vnc_mito`` vnc_sstem sections 7..13 as a binary mask: mitochondria vs ``{not: [mitochondria]}``;

(section 15 is both vnc sources' validation slab, sections 16..19 are held out), trained

- one model per source, ``steps`` steps each, and
- one joint model on all three (equal sampling weights, or ``--weights``) for ``3 x steps`` steps (or
  ``--joint-batch``: fewer, larger steps), so with equal weights each source gets about as many training
  patches in the joint run as in its own;

all through hierseg's CLIs (``make_shards``, ``train`` on Ray with 2 workers, ``predict``). Every model is
scored on the held-out data of every source it was trained on, in that source's label space:
``hierseg predict --label-map <the source's map>`` decodes into the source's values, and one scorer
here (not hierseg's) counts per value, over the pixels the source labels (uncertain never scored),
IoU of "predicted that value" vs "labelled that value". Printed per source and value: the joint model,
the source's own model, and the difference (target: joint >= own - 0.01 on every value).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import realdata as rd  # noqa: E402  (the same data access, CLI runner and Ray environment)

EXPERIMENT = "bench-partial-labels"
VNC_SETS_TRAIN, VNC_MITO_TRAIN, VNC_VAL, VNC_HELD_OUT = (0, 7), (7, 14), (15, 16), (16, 20)


@dataclass(frozen=True)
class Source:
    name: str
    label_map: Path
    scored: dict[str, tuple[int, tuple[int, ...]]]  # value name -> (code predict writes, source values labelling it)
    valid: tuple[int, ...] | None  # source values scored (None: every pixel)


def _iou(tp: int, fp: int, fn: int) -> float:
    return tp / (tp + fp + fn) if tp + fp + fn else math.nan


def score(src: Source, predicted: np.ndarray, labels: list[np.ndarray]) -> dict[str, float]:
    """Per value: IoU of "predicted that value" vs "labelled that value" over the source's labelled pixels, pooled."""
    out = {}
    for name, (code, values) in src.scored.items():
        tp = fp = fn = 0
        for pred, label in zip(predicted, labels, strict=True):
            valid = np.isin(label, src.valid) if src.valid is not None else np.ones(label.shape, bool)
            p, t = (pred == code) & valid, np.isin(label, values) & valid
            tp, fp, fn = tp + int((p & t).sum()), fp + int((p & ~t).sum()), fn + int((~p & t).sum())
        out[name] = _iou(tp, fp, fn)
    return out


def write_maps(work: Path, srf_map: Path) -> dict[str, Source]:
    mito_map = work / "vnc_binary_mito.yaml"
    not_mito = {v: {"not": ["mitochondria"]} for v in rd.VNC_OTHER_VALUES}
    mito_map.write_text(yaml.safe_dump({"mapping": {191: "mitochondria", **not_mito}, "unmapped": "error"}))
    maps = ROOT / "examples" / "label_maps"
    sets = {"mitochondria": (191, (191,)), "glia or ECS": (159, (159,)), "neurite": (255, (255,))}
    return {
        "srf": Source("srf", srf_map, {"axon": (3, (3,)), "myelin": (6, (6,))}, (3, 6)),
        "vnc_sets": Source("vnc_sets", maps / "vnc_sstem_sets.yaml", sets, (191, 159, 255)),
        # predict writes a set's smallest source value (0) for "not mitochondria"
        "vnc_mito": Source(
            "vnc_mito", mito_map, {"mitochondria": (191, (191,)), "not mitochondria": (0, rd.VNC_OTHER_VALUES)}, None
        ),
    }


def build_shards(sources: dict[str, Source], work: Path, env: dict) -> dict[str, Path]:
    out = {"srf": rd.build_shards(rd.DATASETS["srf"], work, env, sources["srf"].label_map)}
    vnc = rd.DATA / "vnc_sstem"
    for key, (lo, hi) in (("vnc_sets", VNC_SETS_TRAIN), ("vnc_mito", VNC_MITO_TRAIN)):
        folder = work / "shards" / key
        cmd = [sys.executable, str(ROOT / "jobs" / "make_shards.py"), "--stack", "--images", str(vnc / "raw"),
               "--labels", str(vnc / "labels"), "--label-map", str(sources[key].label_map), "--out", str(folder),
               "--slabs", f"train={lo}:{hi},val={VNC_VAL[0]}:{VNC_VAL[1]}", "--overwrite"]  # fmt: skip
        rd.run_cli(f"make_shards_{key}", cmd, work, env)
        out[key] = folder
    return out


def held_out(work: Path, shards: Path) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """Per source: the folder ``predict`` reads (links, in name order) and the labels in that order."""
    srf_ds, vnc_ds = rd.DATASETS["srf"], rd.DATASETS["vnc"]
    _, srf_held = rd.split_pairs(srf_ds, rd.list_pairs(srf_ds), shards)
    vnc_held = [p for p in rd.list_pairs(vnc_ds) if VNC_HELD_OUT[0] <= int(p.group) < VNC_HELD_OUT[1]]
    out = {}
    for key, pairs in (("srf", srf_held), ("vnc", vnc_held)):
        pairs = sorted(pairs, key=lambda p: p.name)
        out[key] = (rd.link_held_out(pairs, work / "heldout" / key), [rd.read_image(p.label) for p in pairs])
    return {"srf": out["srf"], "vnc_sets": out["vnc"], "vnc_mito": out["vnc"]}


def write_spec(name: str, keys: list[str], shards: dict[str, Path], cfg: argparse.Namespace, steps: int,
               work: Path, batch: int) -> Path:  # fmt: skip
    """realdata.py's recipe; one source as plain paths, several as named lists with equal weights."""
    if len(keys) == 1:
        train, val = str(shards[keys[0]] / "train"), str(shards[keys[0]] / "val")
    else:
        train = [{"name": k, "shards": str(shards[k] / "train"), "weight": cfg.weights.get(k, 1.0)} for k in keys]
        val = [{"name": k, "shards": str(shards[k] / "val")} for k in keys]
    spec = {
        "data": {"train": train, "val": val, "batch_size": batch, "patch_size": cfg.patch, "num_workers": 1},
        "model": {"base_channels": cfg.base_channels, "depth": cfg.depth, "norm": "batch"},
        "optim": {"lr": 2e-3, "warmup_steps": max(1, min(50, steps // 10))},
        "run": {"name": name, "num_workers": 2, "max_steps": steps, "eval_every": steps,
                "log_every": max(5, min(20, steps // 8)), "storage_path": str(work / "runs"), "resume": False},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": EXPERIMENT, "log_model": False},
    }  # fmt: skip
    path = work / f"spec_{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def train_and_score(name: str, keys: list[str], ctx: dict, steps: int, seed: int,
                    batch: int | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    work, env, cfg, sources = ctx["work"], ctx["env"], ctx["cfg"], ctx["sources"]
    run = f"{name}_s{seed}"
    for own in (work / "runs" / run, work / "pred" / run):
        shutil.rmtree(own, ignore_errors=True)
    spec = write_spec(name, keys, ctx["shards"], cfg, steps, work, batch or cfg.batch)
    per_source = cfg.source_norm and len(keys) > 1
    per_source_layers = ["model.norm=source_batch", *(["model.source_prior=true"] if cfg.source_prior else [])]
    extra = [*cfg.set, *(per_source_layers if per_source else [])]
    t0 = time.perf_counter()
    rd.run_cli(f"train_{run}", [sys.executable, str(ROOT / "jobs" / "train.py"), "--spec", str(spec), "--launcher",
                                "ray", "--set", f"run.seed={seed}", "--set", f"run.name={run}",
                                *[a for kv in extra for a in ("--set", kv)]], work, env)  # fmt: skip
    print(f"[bench] {run}: trained {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    import tifffile

    scores = {}
    for key in keys:
        folder, labels = ctx["held"][key]
        pred = work / "pred" / run / key
        rd.run_cli(f"predict_{run}_{key}", [sys.executable, str(ROOT / "jobs" / "predict.py"), "--model",
                   str(work / "runs" / run / "best"), "--input", str(folder), "--output", str(pred),
                   "--label-map", str(sources[key].label_map), "--quiet",
                   *(["--source", key] if per_source else [])], work, env)  # fmt: skip
        values = np.asarray(tifffile.imread(pred / "label_values.tif"))
        scores[key] = score(sources[key], values[None] if values.ndim == 2 else values, labels)
    return scores


def _weights(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item]
        weights = {k: float(w) for k, w in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give SOURCE=WEIGHT pairs, e.g. vnc_mito=1.5") from None
    if not all(w > 0 for w in weights.values()):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: every weight must be > 0")
    return weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=300, help="per single-source model (the joint one: 3x)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--base-channels", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--out", type=Path, help="work folder to keep (default: a temporary folder)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="spec override for every model, own and joint (e.g. model.norm=group); repeatable",
    )
    ap.add_argument("--joint", default="srf,vnc_sets,vnc_mito",
                    help="the joint model's sources (it trains len x --steps steps); e.g. vnc_sets,vnc_mito "
                         "asks whether one modality alone trains a joint model as good as each own one")  # fmt: skip
    ap.add_argument(
        "--joint-batch",
        type=int,
        default=None,
        help="the joint model's batch (default --batch); its steps keep the own models' patches in all",
    )
    ap.add_argument("--source-norm", action="store_true",
                    help="the joint model normalises each source with its own batch statistics "
                         "(model.norm=source_batch; predict --source); the own models keep batch norm")  # fmt: skip
    ap.add_argument("--source-prior", action="store_true",
                    help="with --source-norm: the joint model also learns a logit bias per source "
                         "(model.source_prior=true)")  # fmt: skip
    ap.add_argument("--weights", type=_weights, default={}, metavar="SOURCE=W,...",
                    help="the joint model's sampling weights (default 1 each), e.g. srf=0.75,vnc_sets=0.75,"
                         "vnc_mito=1.5: the same patches in all, shared differently")  # fmt: skip
    ap.add_argument("--own-from", type=Path, metavar="RESULTS_JSON",
                    help="take the own models' scores from an earlier run's results.json (same settings) "
                         "instead of training them again")  # fmt: skip
    ap.add_argument("--srf-map", type=Path, default=ROOT / "examples" / "label_maps" / "srf_tem.yaml",
                    help="srf_tem's label map (examples/label_maps/srf_tem_axoplasm.yaml: axon label 3 as the set "
                         "[axon, mitochondria], as the tracers drew it)")  # fmt: skip
    cfg = ap.parse_args(argv)
    if cfg.source_prior and not cfg.source_norm:
        ap.error("--source-prior needs --source-norm (a bias per source is learned only with per-source statistics)")
    stray = sorted(set(cfg.weights) - set(cfg.joint.split(",")))
    if stray:
        ap.error(f"--weights names {stray}, which --joint {cfg.joint} does not train")
    if not (rd.DATA / "srf_tem").is_dir() or not (rd.DATA / "vnc_sstem").is_dir():
        print(f"bench/partial_labels.py: skipped: {rd.DATA}/srf_tem or vnc_sstem is absent")
        return 0
    work = (cfg.out or Path(tempfile.mkdtemp(prefix="hierseg-bench-partial-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = rd.ray_env()
    sources = write_maps(work, cfg.srf_map.resolve())
    results: dict = {
        "config": vars(cfg) | {"out": str(cfg.out), "own_from": str(cfg.own_from), "srf_map": str(cfg.srf_map)},
        "seeds": {},
    }
    try:
        shards = build_shards(sources, work, env)
        ctx = {"work": work, "env": env, "cfg": cfg, "sources": sources, "shards": shards,
               "held": held_out(work, shards["srf"])}  # fmt: skip
        joint_keys = [k for k in cfg.joint.split(",") if k]
        unknown = sorted(set(joint_keys) - set(sources))
        if unknown or not joint_keys:
            raise rd.BenchError(f"--joint {cfg.joint}: unknown source(s) {unknown}; known: {', '.join(sources)}")
        earlier = json.loads(cfg.own_from.read_text())["seeds"] if cfg.own_from else {}
        for seed in [int(s) for s in cfg.seeds.split(",")]:
            own = {k: (earlier[str(seed)]["own"][k] if earlier else train_and_score(k, [k], ctx, cfg.steps, seed)[k])
                   for k in joint_keys}  # fmt: skip
            joint = train_and_score("joint", joint_keys, ctx, joint_steps(cfg), seed, cfg.joint_batch)
            results["seeds"][seed] = {"own": own, "joint": joint}
            (work / "results.json").write_text(json.dumps(rd._finite(results), indent=1) + "\n")
        report(results, cfg)
    except rd.BenchError as e:
        print(f"bench/partial_labels.py: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    print(f"\nfigures: {work / 'results.json'}")
    return 0


def joint_steps(cfg: argparse.Namespace) -> int:
    """The joint model's steps: as many patches as all own models together (``len x steps x batch``)."""
    patches = len(cfg.joint.split(",")) * cfg.steps * cfg.batch
    if patches % (cfg.joint_batch or cfg.batch):
        raise rd.BenchError(f"--joint-batch {cfg.joint_batch} does not divide the own models' {patches} patches")
    return patches // (cfg.joint_batch or cfg.batch)


def report(results: dict, cfg: argparse.Namespace) -> None:
    seeds = results["seeds"]
    joint_batch = cfg.joint_batch or cfg.batch
    weights = f", weights {cfg.weights}" if cfg.weights else ""
    print(f"\njoint ({cfg.joint}{weights}: {joint_steps(cfg)} steps of {joint_batch}) vs each source's own model "
          f"({cfg.steps} steps), batch {cfg.batch} of {cfg.patch} px, U-Net base {cfg.base_channels} depth "
          f"{cfg.depth}, seeds {','.join(map(str, seeds))}; IoU on held-out data in the source's label "
          "space")  # fmt: skip
    print(f"{'source':<10}{'value':<18}{'joint':>7}{'own':>7}{'diff':>8}   per seed (joint/own)")
    first = next(iter(seeds.values()))
    for key, values in first["own"].items():
        for value in values:
            j = [s["joint"][key][value] for s in seeds.values()]
            o = [s["own"][key][value] for s in seeds.values()]
            per = " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(j, o, strict=True))
            print(f"{key:<10}{value:<18}{np.mean(j):>7.3f}{np.mean(o):>7.3f}{np.mean(j) - np.mean(o):>+8.3f}   {per}")


if __name__ == "__main__":
    sys.exit(main())
