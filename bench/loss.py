"""Forward+backward time and peak memory of hierarchical_loss vs the plan's code vs plain masked CE.

Same inputs (16x12x256x256 by default), variants interleaved round by round so machine drift hits
all of them alike; prints medians and ratios. Peak memory: CUDA allocator peak on GPU; on CPU the
growth of peak RSS of a fresh child process per variant.

    python bench/loss.py [--batch 16] [--size 256] [--rounds 7] [--device cpu|cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hierseg.labels import IGNORE_INDEX, Hierarchy
from hierseg.losses import hierarchical_loss
from tests.plan_reference import compute_losses

LUT = Hierarchy.default().lut()


def plain_ce(lf, lc, y):
    return F.cross_entropy(lf, y, ignore_index=IGNORE_INDEX)


_LUTS: dict[torch.device, torch.Tensor] = {}


def lut_on(device):
    """The LUT moved once per device, as the training loop does (not a copy per call)."""
    return _LUTS.setdefault(device, LUT.to(device))


def hierseg_loss(lf, lc, y):
    return hierarchical_loss(lf, lc, y, lut_on(lf.device)).loss


def plan_loss(lf, lc, y):
    return compute_losses(lf, lc, y, lut=lut_on(lf.device))[0]


VARIANTS = {"hierarchical_loss": hierseg_loss, "plan compute_losses": plan_loss, "plain masked CE": plain_ce}


def make_inputs(batch, size, device, bf16):
    g = torch.Generator().manual_seed(0)
    lf = torch.randn(batch, 12, size, size, generator=g)
    lc = torch.randn(batch, 5, size, size, generator=g)
    y = torch.randint(0, 12, (batch, size, size), generator=g)
    y[torch.rand(batch, size, size, generator=g) < 0.16] = IGNORE_INDEX  # srf_tem's uncertain share
    dtype = torch.bfloat16 if bf16 else torch.float32
    return [t.to(device) for t in (lf.to(dtype), lc.to(dtype), y)]


def step(fn, lf, lc, y):
    a, b = lf.detach().requires_grad_(True), lc.detach().requires_grad_(True)
    loss = fn(a, b, y)
    loss.backward()
    return loss


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_all(args):
    lf, lc, y = make_inputs(args.batch, args.size, args.device, args.bf16)
    times = {name: [] for name in VARIANTS}
    for fn in VARIANTS.values():  # warm-up
        step(fn, lf, lc, y)
    for _ in range(args.rounds):
        for name, fn in VARIANTS.items():
            sync(args.device)
            t0 = time.perf_counter()
            step(fn, lf, lc, y)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_child(name, args, queue):
    torch.set_num_threads(args.threads)
    lf, lc, y = make_inputs(args.batch, args.size, "cpu", args.bf16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) so input creation does not count
    base = _status_kib("VmRSS")
    step(VARIANTS[name], lf, lc, y)
    queue.put((_status_kib("VmHWM") - base) / 1024)


def peak_memory_mib(args):
    out = {}
    if args.device == "cuda":
        lf, lc, y = make_inputs(args.batch, args.size, "cuda", args.bf16)
        for name, fn in VARIANTS.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn, lf, lc, y)
            torch.cuda.synchronize()
            out[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return out
    ctx = mp.get_context("spawn")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for name in VARIANTS:
        q = ctx.Queue()
        p = ctx.Process(target=_peak_child, args=(name, args, q))
        p.start()
        out[name] = q.get()
        p.join()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 logits (loss accumulates in fp32)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"loss fwd+bwd, {args.batch}x12x{args.size}x{args.size}, device={args.device}, "
        f"dtype={'bf16' if args.bf16 else 'fp32'}, threads={args.threads}, median of {args.rounds} rounds"
    )
    times, peaks = time_all(args), peak_memory_mib(args)
    ref_t, ref_m = times["plain masked CE"], peaks["plain masked CE"]
    print(f"{'variant':<22}{'ms':>10}{'x plain CE':>12}{'peak MiB':>11}{'x plain CE':>12}")
    for name in VARIANTS:
        print(
            f"{name:<22}{times[name] * 1e3:>10.1f}{times[name] / ref_t:>12.2f}{peaks[name]:>11.0f}"
            f"{peaks[name] / max(ref_m, 1e-9):>12.2f}"
        )
    print(
        f"hierarchical_loss vs plan: {times['hierarchical_loss'] / times['plan compute_losses']:.2f}x time, "
        f"{peaks['hierarchical_loss'] / max(peaks['plan compute_losses'], 1e-9):.2f}x memory"
    )


if __name__ == "__main__":
    main()
