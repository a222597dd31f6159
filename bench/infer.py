"""Inference throughput: ``hierseg.serve.infer.predict_volume`` vs a bare loop of the same model over the same tiles.

Why side by side: tiling, blending and the hierarchy decision must cost little next to the forward
passes (target: within 15% of the bare loop). Also peak RSS of streamed prediction (npy memmap in,
zarr out) for two stack depths, in fresh subprocesses: it should not grow with the stack.

    python bench/infer.py [--depth 20] [--size 1024] [--tile 256] [--overlap 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hierseg.labels import Hierarchy
from hierseg.model import UNet
from hierseg.serve.infer import PredictOptions, Predictor, predict_volume, tile_starts


def bare_loop(model: UNet, vol: np.ndarray, opts: PredictOptions) -> float:
    """Forward passes only, same tiles and batch size; returns seconds."""
    t0 = time.perf_counter()
    _, h, w = vol.shape
    th, tw = min(opts.tile, h), min(opts.tile, w)
    boxes = [(y, x) for y in tile_starts(h, th, opts.overlap) for x in tile_starts(w, tw, opts.overlap)]
    with torch.no_grad():
        for z in range(len(vol)):
            x = vol[z].astype(np.float64)
            img = torch.from_numpy(((x - x.mean()) / x.std()).astype(np.float32))[None]  # the default z-score
            for i in range(0, len(boxes), opts.batch):
                tiles = torch.stack([img[:, y : y + th, x : x + tw] for y, x in boxes[i : i + opts.batch]])
                model(tiles)
    return time.perf_counter() - t0


def _child(args: argparse.Namespace) -> None:
    """Subprocess: stream a ``--mem-depth`` stack from a memmap into zarr; print peak RSS (MiB)."""
    import resource

    from hierseg.serve.stackio import open_input, open_output

    torch.manual_seed(0)
    model = UNet(base_channels=args.channels, depth=args.unet_depth).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(args.mem_depth, args.size, args.size))
        for z in range(args.mem_depth):
            mm[z] = np.random.default_rng(z).integers(0, 256, (args.size, args.size), dtype=np.uint8)
        mm.flush()
        del mm
        src = open_input(str(path))
        with open_output(f"{tmp}/out.zarr", src.shape, 5) as sink:
            for z, out in enumerate(predict_volume(Predictor(model), src, options=_opts(args))):
                sink.write(z, out)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _opts(args: argparse.Namespace) -> PredictOptions:
    return PredictOptions(tile=args.tile, overlap=args.overlap, batch=args.batch, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=20, help="slices in the throughput stack")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=8, help="U-Net base channels (quickstart: 16)")
    ap.add_argument("--unet-depth", type=int, default=2)
    ap.add_argument("--mem-depths", default="2,8", help="stack depths for the peak-memory runs")
    ap.add_argument("--mem-depth", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_depth:
        return _child(args)
    torch.manual_seed(0)
    model = UNet(base_channels=args.channels, depth=args.unet_depth).eval()
    vol = np.random.default_rng(0).integers(0, 256, (args.depth, args.size, args.size), dtype=np.uint8)
    voxels = vol.size
    with torch.no_grad():  # warm-up: first-call allocations would otherwise count against whoever runs first
        model(torch.zeros(args.batch, 1, args.tile, args.tile))
    bare = bare_loop(model, vol, _opts(args))
    t0 = time.perf_counter()
    for _ in predict_volume(Predictor(model, Hierarchy.default()), vol, _opts(args)):
        pass
    ours = time.perf_counter() - t0
    print(f"stack {vol.shape} uint8, tile {args.tile} overlap {args.overlap} batch {args.batch}, "
          f"UNet base {args.channels} depth {args.unet_depth}, {torch.get_num_threads()} threads, CPU")  # fmt: skip
    print(f"bare loop      : {voxels / bare / 1e6:8.3f} Mvoxel/s ({bare:.1f} s)")
    print(f"predict_volume : {voxels / ours / 1e6:8.3f} Mvoxel/s ({ours:.1f} s)")
    print(f"ratio predict/bare throughput: {bare / ours:.3f} (target >= 0.85)")
    for d in (int(x) for x in args.mem_depths.split(",")):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mem-depth", str(d)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rss = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        stack_mib = d * args.size * args.size / 2**20
        print(f"streamed npy->zarr, {d:3d} slices ({stack_mib:7.1f} MiB uint8 input): peak RSS {rss:7.1f} MiB")


if __name__ == "__main__":
    main()
