"""2D vs 2.5D vs 3D on a real serial-section stack, side by side (issue 12's benchmark).

    python bench/dims.py [--quick] [--seeds 0,1] [--steps N] [--batch B] [--patch P] [--zpatch Z] [--xy3d Q]
        [--base-channels C] [--depth D] [--variants 2d,2.5d,3d] [--set KEY=VALUE ...] [--out DIR] [--reuse]

vnc_sstem as binary mitochondria (source 191 vs every other value, a ``{not: [mitochondria]}`` label set,
as bench/realdata.py): train on sections 0..13, validation slab 15 (evaluated once, at the end, so it
never picks a checkpoint), held out and scored: the whole sections 16..19. Three variants, each through
hierseg's CLIs as a user runs them (``make_shards --stack``, ``train --launcher ray`` on 2 workers,
``predict`` on sections 15..19 as one stack, scored on 16..19: a lab predicts the whole stack, so section 16
has its neighbour below as every other section has; only section 15's image is read, as z context, never its
labels):

- ``2d``   slices, patches ``P x P``;
- ``2.5d`` slices with +-1 neighbouring section as extra channels (``make_shards --context 1``,
           ``model.in_channels 3``), patches ``P x P``;
- ``3d``   a 3D U-Net planned from the voxel size (50 x 4.6 x 4.6 nm: pooling in xy only until the voxel
           is about isotropic), patches ``Z x Q x Q`` (``--xy3d``, default ``P``).

Equal work: every variant trains on the same number of voxels, ``steps x batch x P x P``; the 3D one
keeps the step count and takes ``batch x P^2 / (Z x Q^2)`` blocks per step (``batch / Z`` with ``Q = P``;
a smaller ``Q`` gives the 3D model more, smaller blocks: more positions per step at the same voxels).
One scorer, here and independent of hierseg: IoU of "predicted mitochondria" (``fine_labels`` = 10) vs
"labelled 191" over every pixel of the held-out sections pooled, and the worst section's IoU; mean and
per-seed values per variant, and the training voxels/s of each (steady state: the first logging window left out),
measured in this run.
Target (issue 12): 3D at least as good as the better of 2D and 2.5D.

Outputs: ``results.json`` and ``logs/`` in the work folder (``--out``, or a temporary folder that is
removed at the end except for those two).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import realdata as rd  # noqa: E402  (the same data access, CLI runner, progress parsing and Ray environment)

EXPERIMENT = "bench-dims"
VOXEL_NM = (50.0, 4.6, 4.6)  # vnc_sstem: ~50 nm sections, 4.6 nm pixels (../shared/data/README.md)
MITO_SOURCE, MITO_FINE = 191, 10
NUM_CONTEXT = 1  # predicted below the held-out sections as z context, not scored (section 15, the val slab)
VARIANTS = ("2d", "2.5d", "3d")
QUICK = {"seeds": "0", "steps": 30, "batch": 8, "patch": 128, "zpatch": 4, "base_channels": 8, "depth": 3}
DEFAULT = {"seeds": "0,1", "steps": 300, "batch": 8, "patch": 256, "zpatch": 4, "base_channels": 8, "depth": 4}


@dataclass(frozen=True)
class Config:
    seeds: list[int]
    steps: int
    batch: int
    patch: int
    zpatch: int
    xy3d: int
    base_channels: int
    depth: int
    variants: list[str]
    sets: list[str]
    reuse: bool


def write_label_map(work: Path) -> Path:
    path = work / "vnc_binary_mito.yaml"
    not_mito = {v: {"not": ["mitochondria"]} for v in rd.VNC_OTHER_VALUES}
    body = {"description": "vnc_sstem as binary mitochondria (bench/dims.py)",
            "mapping": {MITO_SOURCE: "mitochondria", **not_mito}, "unmapped": "error"}  # fmt: skip
    path.write_text(yaml.safe_dump(body))
    return path


def build_shards(variant: str, work: Path, env: dict[str, str], label_map: Path) -> Path:
    root, out = rd.DATA / "vnc_sstem", work / "shards" / variant
    slabs = f"train={rd.VNC_TRAIN[0]}:{rd.VNC_TRAIN[1]},val={rd.VNC_VAL[0]}:{rd.VNC_VAL[1]}"
    cmd = [sys.executable, str(ROOT / "jobs" / "make_shards.py"), "--out", str(out), "--overwrite", "--stack",
           "--images", str(root / "raw"), "--labels", str(root / "labels"), "--label-map", str(label_map),
           "--slabs", slabs]  # fmt: skip
    if variant == "2.5d":
        cmd += ["--context", "1"]
    if variant == "3d":
        cmd += ["--dims", "3", "--voxel-size", ",".join(str(v) for v in VOXEL_NM)]
    rd.run_cli(f"make_shards_{variant}", cmd, work, env)
    return out


def batch_of(variant: str, cfg: Config) -> int:
    """Samples per step; a 3D block holds ``zpatch x xy3d^2`` voxels, so the 3D variant takes as many blocks
    as give the 2D step's ``batch x patch^2`` voxels."""
    return cfg.batch * cfg.patch**2 // patch_voxels(variant, cfg) if variant == "3d" else cfg.batch


def patch_voxels(variant: str, cfg: Config) -> int:
    return cfg.zpatch * cfg.xy3d**2 if variant == "3d" else cfg.patch * cfg.patch


def write_spec(variant: str, cfg: Config, shards: Path, work: Path) -> Path:
    model = {"base_channels": cfg.base_channels, "depth": cfg.depth, "norm": "batch"}
    patch: int | list[int] = cfg.patch
    if variant == "2.5d":
        model["in_channels"] = 3
    if variant == "3d":
        model["dims"] = 3
        patch = [cfg.zpatch, cfg.xy3d, cfg.xy3d]
    spec = {
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "batch_size": batch_of(variant, cfg),
                 "patch_size": patch, "num_workers": 1},
        "model": model,
        "optim": {"lr": 2e-3, "warmup_steps": max(1, min(50, cfg.steps // 10))},
        "run": {"max_steps": cfg.steps, "eval_every": cfg.steps, "log_every": max(5, min(20, cfg.steps // 8)),
                "storage_path": str(work / "runs"), "resume": False, "num_workers": 2},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": EXPERIMENT, "log_model": False},
    }  # fmt: skip
    path = work / f"spec_{variant}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def held_out(work: Path) -> tuple[Path, np.ndarray]:
    """Links to the predicted stack (context section 15, then the held-out 16..19, in name order) and the
    held-out sections' source labels ``[Z, H, W]``; the first ``NUM_CONTEXT`` predicted sections are not scored."""
    low, high = rd.VNC_HELD_OUT[0] - NUM_CONTEXT, rd.VNC_HELD_OUT[1]
    pairs = sorted((p for p in rd.list_pairs(rd.DATASETS["vnc"]) if low <= int(p.group) < high), key=lambda p: p.name)
    folder = rd.link_held_out(pairs, work / "heldout")
    return folder, np.stack([rd.read_image(p.label) for p in pairs[NUM_CONTEXT:]])


def score(mito_ZHW: np.ndarray, labels_ZHW: np.ndarray) -> dict:
    """IoU of predicted vs labelled mitochondria over every held-out pixel, and per section."""
    truth = labels_ZHW == MITO_SOURCE

    def iou(p: np.ndarray, t: np.ndarray) -> float:
        union = int((p | t).sum())
        return int((p & t).sum()) / union if union else math.nan

    per_section = [iou(p, t) for p, t in zip(mito_ZHW, truth, strict=True)]
    return {"iou": iou(mito_ZHW, truth), "worst": float(np.nanmin(per_section)), "per_section": per_section}


def run_variant(variant: str, cfg: Config, seed: int, ctx: dict) -> dict:
    work, env = ctx["work"], ctx["env"]
    name = f"{variant.replace('.', '')}_s{seed}"
    shutil.rmtree(work / "pred" / name, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--spec", str(ctx["specs"][variant]),
           "--launcher", "ray", "--set", f"run.seed={seed}", "--set", f"run.name={name}"]  # fmt: skip
    cmd += [arg for kv in cfg.sets for arg in ("--set", kv)]
    train_log = work / "logs" / f"train_{name}.log"
    if cfg.reuse and train_log.is_file() and (work / "runs" / name / "best").exists():
        log = train_log.read_text()  # --reuse: re-predict and re-score a model this work folder trained
    else:
        for own in (work / "runs" / name, work / "pred" / name):
            shutil.rmtree(own, ignore_errors=True)
        log = rd.run_cli(f"train_{name}", cmd, work, env)
    pred = work / "pred" / name
    rd.run_cli(f"predict_{name}", [sys.executable, str(ROOT / "jobs" / "predict.py"), "--model",
               str(work / "runs" / name / "best"), "--input", str(ctx["held"]), "--output", str(pred),
               "--quiet"], work, env)  # fmt: skip
    import tifffile

    fine_ZHW = np.asarray(tifffile.imread(pred / "fine_labels.tif")).reshape(-1, *ctx["labels"].shape[1:])
    result = score(fine_ZHW[NUM_CONTEXT:] == MITO_FINE, ctx["labels"])
    result["voxels_per_s"] = rd.hierseg_rate(log, work, name) * patch_voxels(variant, cfg)
    print(f"[bench] {name}: mitochondria IoU {result['iou']:.3f} (worst section {result['worst']:.3f}), "
          f"{result['voxels_per_s']:,.0f} training voxels/s", flush=True)  # fmt: skip
    return result


def report(results: dict, cfg: Config) -> None:
    print(f"\nvnc_sstem binary mitochondria, held-out sections 16-19; {cfg.steps} steps, "
          f"{cfg.steps * cfg.batch * cfg.patch**2:,} training voxels per run, U-Net base {cfg.base_channels} "
          f"depth {cfg.depth}, seeds {','.join(map(str, cfg.seeds))}")  # fmt: skip
    print(f"{'variant':<8}{'patch':>14}{'IoU':>8}{'worst':>8}{'voxels/s':>12}   per seed")
    for v in cfg.variants:
        runs = [results["seeds"][str(s)][v] for s in cfg.seeds]
        patch = f"{cfg.zpatch}x{cfg.xy3d}x{cfg.xy3d}" if v == "3d" else f"{cfg.patch}x{cfg.patch}"
        per = " ".join(f"{r['iou']:.3f}" for r in runs)
        print(f"{v:<8}{patch:>14}{np.mean([r['iou'] for r in runs]):>8.3f}{np.mean([r['worst'] for r in runs]):>8.3f}"
              f"{np.mean([r['voxels_per_s'] for r in runs]):>12,.0f}   {per}")  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[Config, Path | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seed 0, 30 steps of 128 px, base 8 depth 3")
    for key in DEFAULT:
        ap.add_argument(f"--{key.replace('_', '-')}", type=str if key == "seeds" else int)
    ap.add_argument("--xy3d", type=int, help="xy side of the 3D variant's blocks (default: --patch)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for every variant's train.py (ablations), repeatable")  # fmt: skip
    ap.add_argument("--out", type=Path, help="work folder to keep (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true",
                    help="a model this --out folder already trained (runs/NAME/best and its train log) is "
                         "predicted and scored again, not retrained")  # fmt: skip
    a = ap.parse_args(argv)
    base = QUICK if a.quick else DEFAULT
    values = {k: getattr(a, k) if getattr(a, k) is not None else base[k] for k in DEFAULT}
    variants = [v for v in a.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        ap.error(f"--variants {a.variants}: choose from {','.join(VARIANTS)}")
    values["xy3d"] = a.xy3d or values["patch"]
    step, block = values["batch"] * values["patch"] ** 2, values["zpatch"] * values["xy3d"] ** 2
    if step % block or step // block < 2 or step // block % 2:
        ap.error(f"3D blocks of {values['zpatch']}x{values['xy3d']}^2 voxels must fit a step's batch x patch^2 = "
                 f"{step:,} voxels an even number of times, at least twice (blocks for 2 ranks)")  # fmt: skip
    seeds = [int(s) for s in str(values.pop("seeds")).split(",")]
    return Config(seeds=seeds, variants=variants, sets=a.sets, reuse=a.reuse, **values), a.out


def main(argv: list[str] | None = None) -> int:
    cfg, out = parse_args(argv)
    if not (rd.DATA / "vnc_sstem").is_dir():
        print(f"bench/dims.py: skipped: {rd.DATA}/vnc_sstem is absent")
        return 0
    work = (out or Path(tempfile.mkdtemp(prefix="hierseg-bench-dims-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = rd.ray_env()
    results: dict = {"config": vars(cfg), "seeds": {}}
    try:
        label_map = write_label_map(work)
        shards = {v: build_shards(v, work, env, label_map) for v in cfg.variants}
        held, labels = held_out(work)
        ctx = {"work": work, "env": env, "held": held, "labels": labels,
               "specs": {v: write_spec(v, cfg, shards[v], work) for v in cfg.variants}}  # fmt: skip
        for seed in cfg.seeds:
            results["seeds"][str(seed)] = {}
            for v in cfg.variants:
                results["seeds"][str(seed)][v] = run_variant(v, cfg, seed, ctx)
                (work / "results.json").write_text(json.dumps(rd._finite(results), indent=1) + "\n")
        report(results, cfg)
    except rd.BenchError as e:
        print(f"bench/dims.py: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        if out is None:
            rd.drop_bulk(work)
    print(f"\nfigures: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
