"""Loader throughput: full pipeline (tar read + decode + normalise + random crop + augment + batch) vs raw tar reads.

The full pipeline runs with the spec's default augmentation and with a heavy one (elastic 0.3, blur 0.3).

Both run through a torch DataLoader with 0, 1 and 2 worker processes, side by side in one run, on
synthetic whole-image shards built in a temporary folder: by default 1024^2 slices and 256^2 crops,
the layout of the real data (make-shards stores whole slices: vnc_sstem 1024^2, srf_tem 600^2; the
spec's patch is 256). Prints patches/s (raw: stored samples read per second; full: random crops per
second, one per stored sample read), patches/s per process doing the work, and the ratio full/raw.
``python bench/loader.py [--patches N] [--patch-size P] [--image-size N]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hierseg.data.loader import build_train_loader, iter_raw_samples, resolve_shards
from hierseg.data.synth import write_synthetic_split
from hierseg.spec import AugmentSpec, DataSpec


class RawTars(IterableDataset):
    """Endless raw tar reading (no decode), shards split over workers: the I/O floor of the pipeline."""

    def __init__(self, shards: list[str], batch_size: int):
        super().__init__()
        self.shards, self.batch_size = shards, batch_size

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shards[wid::nw] or self.shards
        batch = 0
        for url in itertools.cycle(mine):
            for sample in iter_raw_samples(url):
                batch += len(sample["image.npy"]) > 0
                if batch == self.batch_size:
                    yield batch
                    batch = 0


def rate(batches, num_batches: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)  # start-up (worker spawn, first shard) is not throughput
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=4000, help="patches timed per configuration (768 was ~1 s: noise)")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=1024, help="side of each stored slice")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        write_synthetic_split(folder, 24, args.image_size, seed=0)
        shards = resolve_shards(str(folder))
        num_batches = max(1, args.patches // args.batch_size)
        # the spec's default augmentation, and a heavy one with the costly elastic warp and blur
        augments = {"default": AugmentSpec(), "heavy": AugmentSpec(elastic=0.3, blur=0.3)}
        print(
            f"{len(shards)} shards of {args.image_size}^2 slices, patches {args.patch_size}^2, "
            f"batch {args.batch_size}, "
            f"{num_batches * args.batch_size} patches timed, torch threads {torch.get_num_threads()}"
        )
        print(f"{'augment':>7} | {'workers':>7} | {'raw tar p/s':>11} | {'full p/s':>9} | {'full p/s/proc':>13} | "
              f"{'full/raw':>8}")  # fmt: skip
        for nw in (0, 1, 2):
            raw = DataLoader(RawTars(shards, args.batch_size), batch_size=None, num_workers=nw)
            raw_rate = rate(raw, num_batches, args.batch_size)
            for name, aug in augments.items():
                data = DataSpec(train=str(folder), val=str(folder), batch_size=args.batch_size, num_workers=nw,
                                augment=aug, patch_size=args.patch_size)  # fmt: skip
                full = build_train_loader(data, rank=0, world_size=1, batch_size=args.batch_size, seed=0,
                                          normalization={"mode": "zscore"}, num_labels=12)  # fmt: skip
                full_rate = rate(full, num_batches, args.batch_size)
                procs, ratio = max(1, nw), full_rate / raw_rate
                print(f"{name:>7} | {nw:>7} | {raw_rate:>11.0f} | {full_rate:>9.0f} | {full_rate / procs:>13.0f} | "
                      f"{ratio:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
