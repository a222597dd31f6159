"""Partial labels on real data: vnc_sstem trained with label sets vs with those pixels made uncertain.

The Drosophila VNC stack labels 191 = mitochondria, 159 = "glia or extracellular space" and
255 = "neurite, type unknown". Without label sets the last two can only become uncertain, which
leaves mitochondria as the only class with a label. With label sets they become
``{glia, extracellular space}`` and ``neuron_part``: the network learns where mitochondria are *not*.

Both variants use the same shards geometry (128 px patches of sections 0..13), the same model,
seed and number of steps, through the real local launcher. The score is the mitochondria IoU on the
held-out sections 16..19 against the source labels (191 vs everything else, every pixel), computed
from full-section predictions of the final checkpoint, so both variants are scored identically.

    python bench/partial_labels.py [--steps 150] [--out DIR (default: a temporary folder)]

Measured (2 shared CPU cores, 150 steps, batch 4, U-Net base 8 / depth 3, seed 0, ~9 min wall):
label_sets mito IoU 0.181 (precision 0.191, recall 0.778) vs uncertain 0.103 (precision 0.103,
recall 0.999: with mitochondria the only labelled class it predicts mitochondria everywhere), 1.75x.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hierseg.data.io import read_array  # noqa: E402
from hierseg.data.shards import main as make_shards  # noqa: E402
from hierseg.infer import Predictor, default_options  # noqa: E402
from hierseg.labels import FINE_CLASSES  # noqa: E402
from hierseg.spec import validate_spec  # noqa: E402
from hierseg.train.checkpoint import DiskCheckpoints, load_state  # noqa: E402
from hierseg.train.checkpointer import run_dir  # noqa: E402
from hierseg.train.launch import absolutize, run_in_process  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "vnc_sstem"
MITO_VALUE, MITO = 191, FINE_CLASSES.index("mitochondria")
TRAIN, HELD_OUT = (0, 14), (16, 20)
UNCERTAIN_MAP = """description: vnc_sstem with the set-labelled values made uncertain (bench baseline)
mapping: {191: mitochondria, 159: uncertain, 255: uncertain, 0: uncertain, 32: uncertain, 64: uncertain,
          96: uncertain, 128: uncertain, 223: uncertain}
"""


def build(out: Path, label_map: Path) -> Path:
    """Shards of the training slab (and a small val slab the loop evaluates) with one label map."""
    argv = ["--stack", "--images", str(DATA / "raw"), "--labels", str(DATA / "labels"), "--label-map", str(label_map)]
    argv += ["--out", str(out), "--slabs", f"train={TRAIN[0]}:{TRAIN[1]},val=15:16"]
    argv += ["--overwrite"]
    if make_shards(argv) != 0:
        raise SystemExit(f"make-shards failed for {label_map}")
    return out


def train(shards: Path, out: Path, name: str, steps: int, seed: int) -> dict:
    """Train through the real local launcher; returns the final checkpoint's state."""
    raw = {
        "data": {
            "train": str(shards / "train"),
            "val": str(shards / "val"),
            "batch_size": 4,
            "num_workers": 0,
            "patch_size": 128,
        },
        "model": {"base_channels": 8, "depth": 3},
        "optim": {"lr": 0.003, "warmup_steps": 20},
        "run": {"name": name, "num_workers": 1, "max_steps": steps, "log_every": 25, "seed": seed},
        "tracking": {
            "uri": f"sqlite:///{out}/mlflow_{name}.db",
            "experiment": "bench-partial-labels",
            "log_model": False,
        },
    }
    raw["run"]["storage_path"] = str(out / "runs")
    raw["run"]["resume"] = False
    spec = absolutize(validate_spec(raw))
    shutil.rmtree(run_dir(spec), ignore_errors=True)
    run_in_process(spec, "local")
    latest = DiskCheckpoints(run_dir(spec), 2, spec.run.best_metric, spec.run.best_mode).latest()
    return load_state(latest)


@torch.no_grad()
def mito_iou(state: dict) -> dict[str, float]:
    """Mitochondria IoU (and precision/recall) over every pixel of the held-out sections."""
    predictor = Predictor.from_state(state)
    opts = default_options(predictor)  # hierseg predict's defaults: its windows and its decoding
    raw = read_array(str(DATA / "raw"))
    labels = read_array(str(DATA / "labels"))
    tp = fp = fn = 0
    for z in range(*HELD_OUT):
        pred = predictor.predict(raw[z], opts)["fine_labels"] == MITO
        truth = labels[z] == MITO_VALUE
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth).sum())
    return {
        "mito_iou": tp / max(1, tp + fp + fn),
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
    }


def run_variant(name: str, label_map: Path, out: Path, steps: int, seed: int) -> dict:
    """One variant end to end (shards, training, held-out score); runs in its own process."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    shards = build(out / f"shards_{name}", label_map)
    manifest = json.loads((shards / "train" / "manifest.json").read_text())
    state = train(shards, out, f"bench_{name}", steps, seed)
    return mito_iou(state) | {
        "train_patches": manifest["num_samples"],
        "mito_pixels": manifest["class_histogram"][MITO],
        "set_pixels": sum(manifest.get("set_histogram", [])),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="working folder (default: a new temporary folder)")
    args = p.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent")
        return
    out = (args.out or Path(tempfile.mkdtemp(prefix="hierseg-bench-partial-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "uncertain.yaml").write_text(UNCERTAIN_MAP)
    variants = {
        "label_sets": ROOT / "examples" / "label_maps" / "vnc_sstem_sets.yaml",
        "uncertain": out / "uncertain.yaml",
    }
    # The two variants are independent: one process each (one thread each) uses both cores.
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        futures = {n: pool.submit(run_variant, n, m, out, args.steps, args.seed) for n, m in variants.items()}
        results = {n: f.result() for n, f in futures.items()}
    print(f"\nvnc_sstem, {args.steps} steps, seed {args.seed}, held-out sections {HELD_OUT[0]}..{HELD_OUT[1] - 1}")
    print(f"{'variant':<12} {'mito IoU':>9} {'precision':>9} {'recall':>7} {'patches':>8} {'set px':>9} {'s':>6}")
    for name, r in results.items():
        print(
            f"{name:<12} {r['mito_iou']:9.3f} {r['precision']:9.3f} {r['recall']:7.3f} "
            f"{r['train_patches']:8d} {r['set_pixels']:9d} {r['seconds']:6.0f}"
        )
    base = results["uncertain"]["mito_iou"]
    ratio = results["label_sets"]["mito_iou"] / base if base > 0 else float("inf")
    print(f"mito IoU ratio label_sets / uncertain: {ratio:.2f}x")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
