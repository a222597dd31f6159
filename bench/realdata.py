"""Real-data quality side by side: hierseg through its own CLIs vs a bare PyTorch loop (issue 14, item 4).

    python bench/realdata.py [--quick] [--datasets srf,vnc] [--seeds 0,1,2] [--steps N] [--batch B]
        [--patch P] [--base-channels C] [--depth D] [--hierseg-set KEY=VALUE ...] [--predict-arg=FLAG ...]
        [--rescore] [--out DIR]

What it measures, per data set, per class and per seed, on the same split and the same work:

- hierseg as a user runs it: ``jobs/make_shards.py`` (whole slices), ``jobs/train.py`` on Ray with 2
  workers (gloo, batch norm, SQLite MLflow store in the work dir), ``jobs/predict.py`` on the held-out
  images (hierseg's own sliding window); the checkpoint used is ``<storage>/<run>/best``.
- a bare single-process PyTorch loop (``bench/_bare_loop.py``, imports nothing from hierseg): U-Net of
  the same width and depth with batch norm, AdamW 2e-3 + cosine, a random crop with rot90/flips per
  sample, per-image z-score, plain cross-entropy over the task's classes, 2 threads; whole-image
  prediction.
- Equal work: both sides train ``steps x batch`` patches of ``patch`` px, with the same seeds.
- One scorer (here, not hierseg's): per-class IoU over the valid pixels of all held-out images pooled,
  and the worst held-out image's IoU; mean, per-seed values and spread (max - min) over seeds; the
  difference hierseg - bare; training patches/s of each side (steady state: the first logging window
  left out on both sides) and their ratio, measured in this run, never across runs.

Data (read from ../shared/data, never copied; the bench exits 0 with a message when it is absent):

- srf_tem: 21 TEM images of 10 mice, labels 3 = axon, 6 = myelin, 255 = uncertain (never scored).
  make-shards splits by mouse (``--group-regex 'sub-[^_]+' --val-frac 0.1 --test-frac 0.2 --seed 0``):
  7 mice train, 3 mice (val + test) are held out; the bare loop reads the same split back from the
  training manifest's ``split_config.groups``. hierseg evaluates its val mouse only at the end, so the
  held-out images never choose its checkpoint.
- vnc_sstem: 20 sections; binary mitochondria (source 191 vs every other value, a ``{not: [...]}`` label
  set for hierseg). Train on sections 0..13, hierseg's val slab is 15, held out (scored) 16..19.

Full mode (defaults): both data sets, 3 seeds, 537 steps x batch 8 of 256 px (4,296 patches), U-Net
base 16 / depth 4: several hours on 2 cores. ``--quick``: srf_tem, seed 0, 40 steps x 8 of 128 px,
base 8 / depth 3, about 5 minutes. Work goes to a temporary folder (kept: ``results.json`` and
``logs/``; the bulky shards, runs and predictions are removed) or to ``--out DIR`` (all kept).

Prediction ablations: ``--predict-arg=--tta`` (repeatable) passes flags to hierseg's ``predict``;
``--rescore --out DIR`` reuses the runs an earlier bench left in ``DIR`` (same data sets, seeds and
sizes), trains nothing, predicts and scores them again into ``DIR/rescore.json`` (patches/s from the
earlier training logs; the bare loop, deterministic, retrains unless ``--sides hierseg``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # for _bare_loop also when this file is imported, not run
import _bare_loop as bare  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
EXPERIMENT = "bench-realdata"
WINDOW = re.compile(r"\[hierseg\] step (\d+)/\d+ .*?\| ([\d.]+) patches/s")
VNC_TRAIN, VNC_VAL, VNC_HELD_OUT = (0, 14), (15, 16), (16, 20)  # half-open section ranges
# 10 mice: round(0.1 * 10) = 1 val + round(0.2 * 10) = 2 test mice held out, 7 train; seed fixed so
# every seed of both sides sees the same split
SRF_SPLIT = ["--group-regex", "sub-[^_]+", "--val-frac", "0.1", "--test-frac", "0.2", "--seed", "0"]
# every vnc source value but 191; the map keeps ``unmapped: error`` so a value not listed fails loudly
VNC_OTHER_VALUES = (0, 32, 64, 96, 128, 159, 223, 255)


class BenchError(RuntimeError):
    """A step of the bench failed; the message names the command and its log."""


@dataclass(frozen=True)
class DataSet:
    key: str
    folder: str
    title: str
    classes: tuple[tuple[str, int, int, int], ...]  # (name, source value, hierseg fine index, bare index)
    ignore_value: int | None  # source value neither side learns from nor is scored on
    rest: int  # bare target of every source value not in ``classes``: ignored (srf) or the "not" class (vnc)
    num_bare: int
    example_spec: str | None = None  # examples/specs/ file whose data.augment hierseg trains with (its recipe)


DATASETS = {
    "srf": DataSet(
        "srf", "srf_tem", "srf_tem", (("axon", 3, 3, 0), ("myelin", 6, 6, 1)), 255, bare.IGNORE, 2, "srf_tem.yaml"
    ),
    "vnc": DataSet("vnc", "vnc_sstem", "vnc_sstem (binary mitochondria)", (("mitochondria", 191, 10, 1),), None, 0, 2),
}
FULL = {
    "datasets": "srf,vnc",
    "seeds": "0,1,2",
    "steps": 537,
    "batch": 8,
    "patch": 256,
    "base_channels": 16,
    "depth": 4,
}
QUICK = {"datasets": "srf", "seeds": "0", "steps": 40, "batch": 8, "patch": 128, "base_channels": 8, "depth": 3}


@dataclass
class Config:
    datasets: list[str]
    seeds: list[int]
    steps: int
    batch: int
    patch: int
    base_channels: int
    depth: int
    quick: bool
    hierseg_set: list[str] = field(default_factory=list)
    predict_args: list[str] = field(default_factory=list)  # extra flags of hierseg's predict (e.g. --tta)
    rescore: bool = False  # reuse an earlier bench's trained runs in --out: predict and score only
    sides: tuple[str, ...] = ("hierseg", "bare")  # an ablation may rerun hierseg alone


@dataclass
class Pair:
    name: str  # file name the held-out input link gets (predict reads a folder sorted by name)
    image: Path
    label: Path
    group: str  # srf: the mouse; vnc: the section index


# ------------------------------------------------------------------------------------------ data
def read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def list_pairs(ds: DataSet) -> list[Pair]:
    root = DATA / ds.folder
    if ds.key == "srf":
        mouse = re.compile(SRF_SPLIT[1])
        images = sorted((root / "images").glob("*.png"))
        return [Pair(p.name, p, root / "labels" / p.name, mouse.search(p.name).group(0)) for p in images]
    raw = sorted((root / "raw").glob("*.tif"), key=lambda p: int(p.stem))
    return [Pair(p.name, p, root / "labels" / f"labels{int(p.stem):08d}.png", p.stem) for p in raw]


def split_pairs(ds: DataSet, pairs: list[Pair], shards: Path) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): srf from the training manifest's groups, so both sides train on the same mice."""
    if ds.key == "vnc":
        return (
            [p for p in pairs if VNC_TRAIN[0] <= int(p.group) < VNC_TRAIN[1]],
            [p for p in pairs if VNC_HELD_OUT[0] <= int(p.group) < VNC_HELD_OUT[1]],
        )
    manifest = json.loads((shards / "train" / "manifest.json").read_text())
    groups = manifest["split_config"]["groups"]
    train_groups = set(groups["train"])
    held_groups = set(groups.get("val", [])) | set(groups.get("test", []))
    if train_groups & held_groups or {p.group for p in pairs} != train_groups | held_groups:
        raise BenchError(f"manifest split_config.groups does not partition the mice: {groups}")
    return [p for p in pairs if p.group in train_groups], [p for p in pairs if p.group in held_groups]


def bare_target(ds: DataSet, label: np.ndarray) -> np.ndarray:
    """Source labels -> the bare loop's class indices (``bare.IGNORE`` where it must not learn)."""
    target = np.full(label.shape, ds.rest, dtype=np.int64)
    for _, value, _, index in ds.classes:
        target[label == value] = index
    if ds.ignore_value is not None:
        target[label == ds.ignore_value] = bare.IGNORE
    return target


# --------------------------------------------------------------------------------------- scorer
def _iou(tp: int, fp: int, fn: int) -> float:
    return tp / (tp + fp + fn) if tp + fp + fn else math.nan


def score(ds: DataSet, masks: list[dict[str, np.ndarray]], labels: list[np.ndarray]) -> dict:
    """Per-class IoU over the valid pixels of all images pooled, plus each image's IoU and the worst.

    ``masks[i][class]`` is where a side predicted the class in image ``i``; uncertain pixels (srf 255)
    are neither positives nor negatives, so a side is never rewarded or penalised for them.
    """
    totals = {c[0]: np.zeros(3, dtype=np.int64) for c in ds.classes}
    per_image: dict[str, list[float]] = {c[0]: [] for c in ds.classes}
    for mask, label in zip(masks, labels, strict=True):
        valid = label != ds.ignore_value if ds.ignore_value is not None else np.ones(label.shape, bool)
        for name, value, _, _ in ds.classes:
            pred, truth = mask[name] & valid, (label == value) & valid
            counts = np.array([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()])
            totals[name] += counts
            per_image[name].append(_iou(*(int(n) for n in counts)))
    return {
        "iou": {c: _iou(*(int(n) for n in t)) for c, t in totals.items()},
        "worst": {c: float(np.nanmin(v)) if not all(map(math.isnan, v)) else math.nan for c, v in per_image.items()},
        "per_image": per_image,
    }


# ------------------------------------------------------------------------------ hierseg (CLIs only)
def run_cli(name: str, cmd: list[str], work: Path, env: dict[str, str]) -> str:
    """Run one hierseg command as a user would; its output goes to ``logs/<name>.log``."""
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    text = f"$ {shlex.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    log.write_text(text)
    if proc.returncode:
        tail = "\n".join(text.splitlines()[-25:])
        raise BenchError(f"{name} failed (exit {proc.returncode}); full log {log}\n{tail}")
    return proc.stdout + proc.stderr


def build_shards(ds: DataSet, work: Path, env: dict[str, str], srf_map: Path | None = None) -> Path:
    """``srf_map``: srf_tem's label map (default examples/label_maps/srf_tem.yaml)."""
    root, out = DATA / ds.folder, work / "shards" / ds.key
    cmd = [sys.executable, str(ROOT / "jobs" / "make_shards.py"), "--out", str(out), "--overwrite"]
    if ds.key == "srf":
        cmd += ["--images", str(root / "images"), "--labels", str(root / "labels")]
        cmd += ["--label-map", str(srf_map or ROOT / "examples" / "label_maps" / "srf_tem.yaml"), *SRF_SPLIT]
    else:
        label_map = work / "vnc_binary_mito.yaml"
        not_mito = {v: {"not": ["mitochondria"]} for v in VNC_OTHER_VALUES}
        label_map.write_text(
            yaml.safe_dump(
                {
                    "description": "vnc_sstem as binary mitochondria (bench/realdata.py)",
                    "mapping": {191: "mitochondria", **not_mito},
                    "unmapped": "error",
                }
            )
        )
        slabs = f"train={VNC_TRAIN[0]}:{VNC_TRAIN[1]},val={VNC_VAL[0]}:{VNC_VAL[1]}"
        cmd += ["--stack", "--images", str(root / "raw"), "--labels", str(root / "labels")]
        cmd += ["--label-map", str(label_map), "--slabs", slabs]
    run_cli(f"make_shards_{ds.key}", cmd, work, env)
    return out


def write_spec(ds: DataSet, cfg: Config, shards: Path, work: Path) -> Path:
    """The job spec from scratch; seed, run name and worker count come as ``--set`` on the command line."""
    spec = {
        "data": {
            "train": str(shards / "train"),
            "val": str(shards / "val"),
            "batch_size": cfg.batch,
            "patch_size": cfg.patch,
            "num_workers": 1,
        },
        "model": {"base_channels": cfg.base_channels, "depth": cfg.depth, "norm": "batch"},
        # lr as the bare loop; warm-up shortened so that a quick run is not all warm-up
        "optim": {"lr": 2e-3, "warmup_steps": max(1, min(50, cfg.steps // 10))},
        "run": {
            "max_steps": cfg.steps,
            "eval_every": cfg.steps,
            "log_every": log_every(cfg),
            "storage_path": str(work / "runs"),
            "resume": False,
        },
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": EXPERIMENT, "log_model": False},
    }
    if ds.example_spec:  # the augmentation a user of the example spec trains with
        example = yaml.safe_load((ROOT / "examples" / "specs" / ds.example_spec).read_text())
        spec["data"]["augment"] = example["data"]["augment"]
    path = work / f"spec_{ds.key}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def log_every(cfg: Config) -> int:
    return max(5, min(20, cfg.steps // 8))


def hierseg_rate(log: str, work: Path, run_name: str) -> float:
    """Steady patches/s: progress windows after the first, as total patches / total step time."""
    windows = dict((int(s), float(r)) for s, r in WINDOW.findall(log))  # Ray may echo a line twice
    rates = [r for _, r in sorted(windows.items())]
    if not rates:  # progress lines not on the console: read what the run logged to MLflow
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
        history = client.get_metric_history(runs[0].info.run_id, "train/patches_per_s") if runs else []
        rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    if not rates:
        raise BenchError(f"no patches/s for run {run_name}: neither progress lines nor MLflow history")
    rates = rates[1:] or rates
    return len(rates) / sum(1 / r for r in rates)  # equal patches per window: the harmonic mean


def run_hierseg(ds: DataSet, cfg: Config, spec: Path, seed: int, work: Path, env: dict, held_dir: Path) -> dict:
    name = f"{ds.key}_s{seed}"
    if cfg.rescore:
        log, train_s = _earlier_training(work, name)
    else:
        for own in (work / "runs" / name, work / "pred" / name):  # the bench's own outputs of an earlier run
            shutil.rmtree(own, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--spec", str(spec), "--launcher", "ray"]
        for kv in ["run.num_workers=2", f"run.seed={seed}", f"run.name={name}", *cfg.hierseg_set]:
            cmd += ["--set", kv]
        t0 = time.perf_counter()
        log = run_cli(f"train_{name}", cmd, work, env)
        train_s = time.perf_counter() - t0
    pred_dir = work / "pred" / name
    cmd = [sys.executable, str(ROOT / "jobs" / "predict.py"), "--model", str(work / "runs" / name / "best")]
    cmd += ["--input", str(held_dir), "--output", str(pred_dir), "--quiet", "--overwrite", *cfg.predict_args]
    run_cli(f"predict_{name}", cmd, work, env)
    import tifffile

    fine = np.asarray(tifffile.imread(pred_dir / "fine_labels.tif"))
    fine = fine[None] if fine.ndim == 2 else fine
    return {"fine": fine, "patches_per_s": hierseg_rate(log, work, name), "wall_s": train_s}


def _earlier_training(work: Path, name: str) -> tuple[str, float]:
    """``--rescore``: the training log an earlier bench run left for ``name`` in ``work``."""
    log, best = work / "logs" / f"train_{name}.log", work / "runs" / name / "best"
    if not (log.is_file() and best.exists()):
        raise BenchError(f"--rescore: no earlier run {name} in {work} ({log} and {best} are needed); "
                         "train it first without --rescore")  # fmt: skip
    return log.read_text(), math.nan  # not trained in this run: no training time to report


# ------------------------------------------------------------------------------------------- bare
def run_bare(ds: DataSet, cfg: Config, seed: int, train_data: tuple[list, list], held_images: list) -> dict:
    bare_cfg = bare.BareConfig(cfg.steps, cfg.batch, cfg.patch, cfg.base_channels, cfg.depth, log_every=log_every(cfg))
    model, stats = bare.train(*train_data, ds.num_bare, bare_cfg, seed)
    preds = [bare.predict(model, im, cfg.depth) for im in held_images]
    return {"preds": preds, "patches_per_s": stats["patches_per_s"], "wall_s": stats["train_s"]}


# -------------------------------------------------------------------------------------- one data set
def link_held_out(held: list[Pair], folder: Path) -> Path:
    """Links (not copies) to the held-out images, the folder ``predict`` reads in name order."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for p in held:
        (folder / p.name).symlink_to(p.image)
    return folder


def run_dataset(ds: DataSet, cfg: Config, work: Path, env: dict[str, str]) -> dict:
    """Shards once, then for every seed hierseg and the bare loop on the same split; all scores."""
    t0 = time.perf_counter()
    shards = build_shards(ds, work, env)
    train, held = split_pairs(ds, list_pairs(ds), shards)
    held.sort(key=lambda p: p.name)
    held_dir = link_held_out(held, work / "heldout" / ds.key)
    spec = write_spec(ds, cfg, shards, work)
    train_data = ([read_image(p.image) for p in train], [bare_target(ds, read_image(p.label)) for p in train])
    held_images, held_labels = [read_image(p.image) for p in held], [read_image(p.label) for p in held]
    print(f"[bench] {ds.title}: shards built in {time.perf_counter() - t0:.0f} s; train {len(train)} images "
          f"({describe(train)}), held out {len(held)} ({describe(held)})", flush=True)  # fmt: skip
    sides: dict[str, list[dict]] = {side: [] for side in cfg.sides}
    for seed in cfg.seeds:
        if "hierseg" in sides:
            h = run_hierseg(ds, cfg, spec, seed, work, env, held_dir)
            if len(h["fine"]) != len(held):
                raise BenchError(f"predict wrote {len(h['fine'])} slices for {len(held)} held-out images")
            masks = [{c[0]: f == c[2] for c in ds.classes} for f in h["fine"]]
            sides["hierseg"].append(_seed_record(seed, score(ds, masks, held_labels), h))
        if "bare" in sides:
            b = run_bare(ds, cfg, seed, train_data, held_images)
            masks = [{c[0]: p == c[3] for c in ds.classes} for p in b["preds"]]
            sides["bare"].append(_seed_record(seed, score(ds, masks, held_labels), b))
        print(
            f"[bench] {ds.key} seed {seed}: " + "; ".join(_brief(side, r[-1]) for side, r in sides.items()), flush=True
        )
    split = {"train": [p.name for p in train], "held_out": [p.name for p in held]}
    return {"split": split, "seeds": sides, "summary": summarize(ds, sides)}


def _brief(side: str, record: dict) -> str:
    ious = " ".join(f"{c} {v:.3f}" for c, v in record["iou"].items())
    return f"{side} {ious} ({record['wall_s']:.0f} s training)"


def describe(pairs: list[Pair]) -> str:
    groups = sorted({p.group for p in pairs}, key=lambda g: (len(g), g))
    return ("mice " if pairs and not pairs[0].group.isdigit() else "sections ") + ", ".join(groups)


def _seed_record(seed: int, scores: dict, run: dict) -> dict:
    return {"seed": seed, **scores, "patches_per_s": run["patches_per_s"], "wall_s": run["wall_s"]}


def summarize(ds: DataSet, sides: dict[str, list[dict]]) -> dict:
    """Mean, per-seed values, spread and mean worst image per class and side; hierseg - bare; speeds."""
    out: dict = {"classes": {}}
    both = len(sides) == 2
    for name, *_ in ds.classes:
        row = {}
        for side, runs in sides.items():
            values = [r["iou"][name] for r in runs]
            row[side] = {"mean": float(np.mean(values)), "per_seed": values,
                         "spread": float(np.max(values) - np.min(values)),
                         "worst_image": float(np.mean([r["worst"][name] for r in runs]))}  # fmt: skip
        if both:
            row["diff"] = row["hierseg"]["mean"] - row["bare"]["mean"]
            row["worst_diff"] = row["hierseg"]["worst_image"] - row["bare"]["worst_image"]
        out["classes"][name] = row
    speed = {side: float(np.mean([r["patches_per_s"] for r in runs])) for side, runs in sides.items()}
    out["patches_per_s"] = speed | ({"ratio": speed["hierseg"] / speed["bare"]} if both else {})
    return out


def print_dataset(ds: DataSet, cfg: Config, result: dict) -> None:
    s, n = result["summary"], len(result["split"]["held_out"])
    print(f"\n{ds.title}: held out {n} whole images; {cfg.steps} steps x {cfg.batch} patches of {cfg.patch} px "
          f"= {cfg.steps * cfg.batch} patches per run and side; U-Net base {cfg.base_channels} depth "
          f"{cfg.depth}; seeds {','.join(map(str, cfg.seeds))}")  # fmt: skip
    print(f"{'class':<14}{'side':<9}{'mean IoU':>9}{'spread':>8}{'worst img':>10}   per seed")
    for name, row in s["classes"].items():
        for side in cfg.sides:
            r = row[side]
            seeds = " ".join(f"{v:.3f}" for v in r["per_seed"])
            print(f"{name:<14}{side:<9}{r['mean']:>9.3f}{r['spread']:>8.3f}{r['worst_image']:>10.3f}   {seeds}")
        if "diff" in row:
            print(f"{name:<14}{'diff':<9}{row['diff']:>+9.3f}{'':>8}{row['worst_diff']:>+10.3f}   (hierseg - bare)")
    v = s["patches_per_s"]
    if "ratio" not in v:
        print(f"{'patches/s':<14}" + "   ".join(f"{side} {rate:.1f}" for side, rate in v.items()))
        return
    print(f"{'patches/s':<14}hierseg {v['hierseg']:.1f} (Ray, 2 workers x 1 thread)   bare {v['bare']:.1f} "
          f"(1 process x 2 threads)   ratio {v['ratio']:.2f}x")  # fmt: skip


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="srf only, 1 seed, 40 steps of 128 px, small U-Net")
    ap.add_argument("--datasets", help=f"comma list of {','.join(DATASETS)} (default {FULL['datasets']})")
    ap.add_argument("--seeds", help=f"comma list (default {FULL['seeds']})")
    for flag in ("steps", "batch", "patch", "base_channels", "depth"):
        ap.add_argument(f"--{flag.replace('_', '-')}", type=int, help=f"default {FULL[flag]} ({QUICK[flag]} quick)")
    ap.add_argument("--hierseg-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for hierseg's train.py (ablations), repeatable")  # fmt: skip
    ap.add_argument("--predict-arg", action="append", default=[], metavar="FLAG",
                    help="extra flag for hierseg's predict, repeatable; write --predict-arg=--tta")  # fmt: skip
    ap.add_argument("--rescore", action="store_true",
                    help="with --out: reuse that folder's trained hierseg runs, predict and score only")  # fmt: skip
    ap.add_argument("--sides", default="hierseg,bare",
                    help="comma list of hierseg,bare (an ablation reruns one side; a claim needs both)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="work folder to keep (default: a temporary folder)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    pick = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in FULL}
    cfg = Config([d.strip() for d in pick.pop("datasets").split(",") if d.strip()],
                 [int(s) for s in pick.pop("seeds").split(",")], **pick, quick=args.quick,
                 hierseg_set=args.hierseg_set, predict_args=args.predict_arg, rescore=args.rescore,
                 sides=tuple(s.strip() for s in args.sides.split(",") if s.strip()))  # fmt: skip
    if unknown := set(cfg.datasets) - set(DATASETS):
        ap.error(f"unknown data set(s) {sorted(unknown)}; choose from {', '.join(DATASETS)}")
    if not cfg.sides or set(cfg.sides) - {"hierseg", "bare"}:
        ap.error(f"--sides takes hierseg and/or bare, not {args.sides!r}")
    if cfg.rescore and args.out is None:
        ap.error("--rescore needs --out: the work folder of the earlier run whose models it scores again")
    if cfg.batch % 2:
        ap.error("--batch must be even: hierseg splits it over its 2 workers")
    return cfg, args.out


def _finite(obj):
    """NaN (a class with no data in an image) as JSON null, so results.json stays strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def drop_bulk(work: Path) -> None:
    """Remove what a bench wrote into a temporary work folder but its figures and logs."""
    for bulky in ("shards", "runs", "pred", "heldout", "mlflow.db", "mlruns", "mlartifacts"):
        target = work / bulky
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def ray_env() -> dict[str, str]:
    """A fresh Ray temp folder per bench: ``ray.init()`` would otherwise join a stale local cluster."""
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env.pop("RAY_ADDRESS", None)
    return env


def main(argv: list[str] | None = None) -> int:
    cfg, out = parse_args(argv)
    if not DATA.is_dir():
        print(f"bench/realdata.py: skipped: {DATA} is absent (the real EM data sets live there)")
        return 0
    work = (out or Path(tempfile.mkdtemp(prefix="hierseg-bench-realdata-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = ray_env()
    figures = "rescore.json" if cfg.rescore else "results.json"  # a rescore keeps the earlier run's figures
    results: dict = {"config": asdict(cfg), "work": str(work), "datasets": {}}
    print(f"[bench] work folder {work}; {os.cpu_count()} cores", flush=True)
    try:
        for key in cfg.datasets:
            ds = DATASETS[key]
            if not (DATA / ds.folder).is_dir():
                print(f"[bench] {ds.title}: skipped, {DATA / ds.folder} is absent")
                continue
            results["datasets"][key] = run_dataset(ds, cfg, work, env)
            (work / figures).write_text(json.dumps(_finite(results), indent=1) + "\n")
        for key, result in results["datasets"].items():
            print_dataset(DATASETS[key], cfg, result)
    except BenchError as e:
        print(f"bench/realdata.py: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        if out is None:  # temporary work folder: keep the figures and logs, drop the bulk
            drop_bulk(work)
    print(f"\nfigures: {work / figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
