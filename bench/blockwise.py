"""Blockwise prediction on Ray (``hierseg predict --ray``) vs single-process ``predict``, side by side (issue 13).

On a synthetic uint8 zarr volume, CPU, every side through the real CLI in its own process (and its own private
local Ray): single-process ``predict`` (one torch thread, as each worker), blockwise on 1 and on 2 Ray
workers. Printed: outputs identical to single-process (labels bit-identical, probabilities to 1e-5); voxels/s
of each (wall, and the block phase the driver reports); the throughput ratio 2 workers / 1 worker (target >=
1.6x), next to its ceiling on the machine at that time (the same forward passes in 2 bare processes vs 1: on
shared cores other work decides what a second worker can add); each worker's peak RSS (VmHWM of the
``ray::BlockWorker`` processes) at two volume sizes (flat in volume size); Ctrl-C (SIGINT to the driver's
process group, as a terminal sends it) mid-run, then a rerun, during which one worker is SIGKILLed: the rerun
completes, recomputes only the unfinished blocks (counted) and its output is identical. The fault run writes
OME-Zarr (``.ome.zarr``), the others plain zarr.

The model is a tiny untrained U-Net checkpoint the bench writes (its speed is not the point).

    python bench/blockwise.py --quick              # 8 x 1024 x 1024, blocks 2,512,512: ~5-10 min on 2 cores
    python bench/blockwise.py                      # 32 x 2048 x 2048, blocks 4,1024,1024 (issue 13's size)
    python bench/blockwise.py --size 16,2048,2048 --out /tmp/bw   # keep the work folder
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hierseg.serve.blockwise import DONE_ARRAY, BlockGrid, parse_shape  # noqa: E402
from tests.train_utils import descendant_pids, untrained_checkpoint  # noqa: E402

SUMMARY = re.compile(r"(\d+) of (\d+) blocks predicted \((\d+) were done\) in ([\d.]+) s")
WORKER = "ray::BlockWorker"


@dataclass
class Run:
    """One CLI run: exit code, wall seconds, the driver's summary, each worker's peak RSS (MiB, by pid)."""

    name: str
    rc: int = -1
    wall: float = 0.0
    computed: int = 0
    blocks: int = 0
    block_seconds: float = 0.0
    rss_mib: dict[int, float] = field(default_factory=dict)
    left_behind: int = 0
    log: str = ""

    def row(self, voxels: int) -> dict[str, Any]:
        """The figures reported for this run (voxels/s over the wall and over the driver's block phase)."""
        rss = sorted(round(v) for v in self.rss_mib.values())
        return {"rc": self.rc, "wall_s": round(self.wall, 1), "voxels_per_s_wall": round(voxels / self.wall),
                "block_phase_s": self.block_seconds, "computed": self.computed, "blocks": self.blocks,
                "voxels_per_s_blocks": round(voxels / self.block_seconds) if self.block_seconds else None,
                "worker_peak_rss_mib": rss}  # fmt: skip


# ------------------------------------------------------------------------------------------ setup
def make_volume(path: Path, shape: tuple[int, int, int]) -> None:
    """A uint8 zarr volume, written slice by slice: smooth blobs (so the model sees structure) plus noise."""
    import zarr

    z, h, w = shape
    arr = zarr.create_array(store=str(path), shape=shape, dtype="uint8", chunks=(1, min(h, 512), min(w, 512)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(z):
        rng = np.random.default_rng(i)
        blobs = np.sin(yy / (37 + i) + rng.uniform(0, 6)) * np.cos(xx / (53 - i % 7) + rng.uniform(0, 6))
        arr[i] = np.clip(128 + 60 * blobs + rng.normal(0, 20, (h, w)) + 2 * i, 0, 255).astype(np.uint8)


def predict_cmd(model: Path, vol: Path, out: Path, opts: argparse.Namespace, *extra: str) -> list[str]:
    tiling = ["--tile", str(opts.tile), "--overlap", str(opts.overlap), "--batch", str(opts.batch)]
    return [sys.executable, "-m", "hierseg.cli", "predict", "--model", str(model), "--input", str(vol),
            "--output", str(out), *tiling, "--device", "cpu", "--quiet", *extra]  # fmt: skip


def blockwise_flags(opts: argparse.Namespace, workers: int) -> list[str]:
    halo = f"{opts.overlap},{opts.overlap}"
    return ["--ray", "--block", opts.block, "--halo", halo, "--ray-workers", str(workers)]


def env_for_run() -> tuple[dict[str, str], str]:
    """One torch thread (the workers' count: identity needs it), a private Ray temp folder, this checkout."""
    env = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="raybw", dir="/tmp")  # short: Ray's socket paths have a length limit
    env.update(OMP_NUM_THREADS="1", RAY_TMPDIR=tmp, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return env, tmp


# ------------------------------------------------------------------------------------------- runs
def done_blocks(store: Path) -> int:
    """Blocks marked done (a chunk file of ``block_done`` exists only once set)."""
    folder = store / DONE_ARRAY
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json") if folder.is_dir() else 0


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default action. A bench started in the background of a
    non-interactive shell (``nohup ... &``) inherits SIGINT *ignored*, exec keeps that, and Python then installs
    no KeyboardInterrupt handler: the Ctrl-C phase's SIGINT would be dropped and the run go on to the end
    (measured once, 2026-12-02: exit 0 with every block done)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(name: str, cmd: list[str], hook: Any = None, timeout: float = 7200) -> Run:
    """Run ``cmd`` in its own session; poll its workers' peak RSS, calling ``hook(proc)`` at every poll."""
    env, tmp = env_for_run()
    run = Run(name)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)  # fmt: skip
        try:
            while proc.poll() is None and time.perf_counter() - start < timeout:
                for pid in descendant_pids(WORKER, proc.pid):
                    rss = _peak_rss_mib(pid)
                    if rss is not None:
                        run.rss_mib[pid] = max(rss, run.rss_mib.get(pid, 0.0))
                if hook is not None:
                    hook(proc)
                time.sleep(0.25)
            run.rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        finally:
            run.left_behind = _end_session(proc)
            shutil.rmtree(tmp, ignore_errors=True)
        run.wall = time.perf_counter() - start
        log.seek(0)
        run.log = log.read()
    found = SUMMARY.search(run.log)
    if found:
        run.computed, run.blocks, run.block_seconds = int(found[1]), int(found[2]), float(found[4])
    return run


def _end_session(proc: subprocess.Popen) -> int:
    """End what the run left in its own session (only processes this bench started); returns how many there were
    (after a Ctrl-C: did the driver take its Ray down?)."""
    if proc.poll() is None:
        proc.kill()
    left = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            left += int(stat.read_text().rsplit(")", 1)[1].split()[4]) == proc.pid  # field 6: the session id
        except (OSError, IndexError, ValueError):
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return left


def interrupt_after(store: Path, blocks: int) -> Any:
    """A hook that sends Ctrl-C (SIGINT to the process group, as a terminal does) once ``blocks`` blocks are
    done; ``hook.sent`` holds when."""

    def hook(proc: subprocess.Popen) -> None:
        if not hook.sent and done_blocks(store) >= blocks:
            os.killpg(proc.pid, signal.SIGINT)
            hook.sent.append(time.perf_counter())

    hook.sent = []  # type: ignore[attr-defined]
    return hook


def kill_worker_after(store: Path, blocks: int, killed: list[int]) -> Any:
    """A hook that SIGKILLs one busy worker once ``blocks`` blocks are done."""

    def hook(proc: subprocess.Popen) -> None:
        busy = descendant_pids(f"{WORKER}.predict_block", proc.pid) if not killed else []
        if busy and done_blocks(store) >= blocks:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])

    return hook


# ---------------------------------------------------------------------------------------- compare
def same_outputs(got: Path, want: Path) -> str:
    """``identical``, or what differs; slice by slice, so a big volume's outputs never load whole."""
    import zarr

    from hierseg.serve.stackio import zarr_output_arrays

    a, b = (zarr_output_arrays(zarr.open_group(str(p), mode="r")) for p in (got, want))
    if set(a) != set(b):
        return f"arrays differ: {sorted(a)} vs {sorted(b)}"
    for name in sorted(b):
        for z in range(b[name].shape[-3]):
            x = np.asarray(a[name][:, z] if name == "coarse_prob" else a[name][z])
            y = np.asarray(b[name][:, z] if name == "coarse_prob" else b[name][z])
            if x.dtype.kind == "f" and np.abs(x.astype(np.float32) - y.astype(np.float32)).max() > 1e-5:
                return f"{name} slice {z}: max |diff| {np.abs(x.astype(np.float32) - y.astype(np.float32)).max():g}"
            if x.dtype.kind != "f" and not np.array_equal(x, y):
                return f"{name} slice {z}: {(x != y).sum()} voxels differ"
    return "identical"


# -------------------------------------------------------------------------------------- scenarios
CEILING_CHILD = """
import sys, time, torch
from hierseg.serve.infer import load_predictor
torch.set_num_threads(1)
model, x = load_predictor(sys.argv[1]).model, torch.randn(8, 1, 256, 256)
with torch.no_grad():
    model(x)
    start = time.perf_counter()
    for _ in range(int(sys.argv[2])):
        model(x)
print(time.perf_counter() - start)
"""


def parallel_ceiling(model: Path, steps: int) -> float:
    """What 2 one-thread processes get done / what 1 gets, on this machine now: the ceiling of the 2/1 ratio.

    Why: on shared cores the other work, not hierseg, decides how much a second worker can add; the same
    forward passes in 1 and then 2 bare processes (no Ray) measure what the CPUs give this bench.
    """
    env, tmp = env_for_run()
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-c", CEILING_CHILD, str(model), str(steps)]

    def seconds(n: int) -> list[float]:
        procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [float(p.communicate()[0].split()[-1]) for p in procs]

    one, two = seconds(1), seconds(2)
    return round((2 * steps / max(two)) / (steps / one[0]), 2)


def speed(work: Path, model: Path, vol: Path, opts: argparse.Namespace, voxels: int) -> dict[str, Any]:
    """Single-process predict, then blockwise on 1 and 2 workers, each compared with single-process."""
    single = run_cli("single", predict_cmd(model, vol, work / "single.zarr", opts))
    if single.rc != 0:
        raise SystemExit(f"single-process predict failed:\n{single.log[-3000:]}")
    rows: dict[str, Any] = {"single-process predict": single.row(voxels)}
    for workers in (1, 2):
        out = work / f"bw{workers}.zarr"
        run = run_cli(f"bw{workers}", predict_cmd(model, vol, out, opts, *blockwise_flags(opts, workers)))
        row = run.row(voxels)
        row["output"] = same_outputs(out, work / "single.zarr") if run.rc == 0 else run.log[-2000:]
        rows[f"blockwise {workers} worker{'s' * (workers > 1)}"] = row
        shutil.rmtree(out, ignore_errors=True)
    return rows


def faults(work: Path, model: Path, vol: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Ctrl-C the driver a third of the way, rerun with a worker SIGKILLed mid-run; into OME-Zarr."""
    out = work / "fault.ome.zarr"
    cmd = predict_cmd(model, vol, out, opts, *blockwise_flags(opts, 2))
    total = len(BlockGrid(opts.shape, parse_shape(opts.block, "--block")).blocks())
    hook = interrupt_after(out, max(1, total // 3))
    first = run_cli("ctrl-c", cmd, hook=hook)
    exit_s = time.perf_counter() - hook.sent[0] if hook.sent else None
    done = done_blocks(out)
    killed: list[int] = []
    second = run_cli("rerun", cmd, hook=kill_worker_after(out, done + 1, killed))
    return {
        "ctrl_c": {"rc": first.rc, "done_when_stopped": done, "blocks": total, "exit_s": exit_s and round(exit_s, 1),
                   "processes_left_behind": first.left_behind},
        "rerun": {"rc": second.rc, "recomputed": second.computed, "unfinished_before": total - done,
                  "only_unfinished": second.computed == total - done, "worker_killed": bool(killed),
                  "output": same_outputs(out, work / "single.zarr") if second.rc == 0 else second.log[-2000:]},
    }  # fmt: skip


def small_rss(work: Path, model: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Blockwise on 2 workers over a smaller volume, same blocks: the workers' peak RSS at a second size."""
    vol = work / "small.zarr"
    make_volume(vol, opts.small_shape)
    run = run_cli("small", predict_cmd(model, vol, work / "small_out.zarr", opts, *blockwise_flags(opts, 2)))
    row = run.row(int(np.prod(opts.small_shape)))
    shutil.rmtree(work / "small_out.zarr", ignore_errors=True)
    return {"shape": list(opts.small_shape), **row}


# ------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 x 1024 x 1024, blocks 2,512,512")
    ap.add_argument("--size", default="32,2048,2048", metavar="Z,Y,X", help="the volume")
    ap.add_argument("--small-size", default=None, metavar="Z,Y,X",
                    help="second size for peak RSS (default: a quarter of the slices, >= one block)")  # fmt: skip
    ap.add_argument("--block", default="4,1024,1024", metavar="Z,Y,X")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32, help="also the halo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--base-channels", type=int, default=4, help="the tiny U-Net's width")
    ap.add_argument("--ceiling-steps", type=int, default=10, help="forward passes of the 2-process ceiling check")
    ap.add_argument("--out", type=Path, default=None, help="work folder, kept (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.block = "8,1024,1024", "2,512,512"
    args.shape = parse_shape(args.size, "--size")
    # Why fewer slices of the same size by default: a block's context is cut at the volume's edges, so a
    # volume with smaller slices has smaller edge blocks, and its lower peak would not be the volume's doing.
    z, y, x = args.shape
    small = args.small_size or f"{max(parse_shape(args.block, '--block')[0], z // 4)},{y},{x}"
    args.small_shape = parse_shape(small, "--small-size")
    return args


def report(results: dict[str, Any]) -> None:
    print(f"\nvolume {results['shape']} uint8, blocks {results['block']}, tile {results['tile']}: "
          f"{results['voxels']:,} voxels")  # fmt: skip
    head = f"{'side':<24}{'wall s':>8}{'vox/s wall':>12}{'blocks s':>10}{'vox/s blocks':>14}"
    print(f"{head}  worker peak RSS MiB  output")
    for name, r in results["speed"].items():
        vb = f"{r['voxels_per_s_blocks']:,}" if r["voxels_per_s_blocks"] else "-"
        print(f"{name:<24}{r['wall_s']:>8}{r['voxels_per_s_wall']:>12,}{r['block_phase_s'] or '-':>10}{vb:>14}  "
              f"{r['worker_peak_rss_mib'] or '-'!s:<19}  {r.get('output', '(reference)')}")  # fmt: skip
    print(f"ratio 2 workers / 1 worker: {results['ratio_blocks']:.2f}x over the block phase (target >= 1.6x), "
          f"{results['ratio_wall']:.2f}x over the wall; ceiling on this machine now (2 bare one-thread processes / "
          f"1): {results['ceiling_before']}x before, {results['ceiling_after']}x after; {results['cpus']} CPUs, "
          f"load average {results['load_average_at_start']:.1f} at the start")  # fmt: skip
    s = results["small"]
    print(f"worker peak RSS: {s['worker_peak_rss_mib']} MiB at {s['shape']}, "
          f"{results['speed']['blockwise 2 workers']['worker_peak_rss_mib']} MiB at {results['shape']}")  # fmt: skip
    c, r = results["faults"]["ctrl_c"], results["faults"]["rerun"]
    print(f"Ctrl-C after {c['done_when_stopped']} of {c['blocks']} blocks: exit {c['rc']} in {c['exit_s']} s, "
          f"{c['processes_left_behind']} processes left behind; rerun (a worker SIGKILLed: {r['worker_killed']}): "
          f"exit {r['rc']}, recomputed {r['recomputed']} blocks of {r['unfinished_before']} unfinished, output "
          f"{r['output']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty; give a new or empty folder")
    work = args.out or Path(tempfile.mkdtemp(prefix="hierseg-bench-blockwise-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        model = untrained_checkpoint(work / "model", 0, base_channels=args.base_channels, depth=2)
        vol = work / "vol.zarr"
        make_volume(vol, args.shape)
        voxels = int(np.prod(args.shape))
        results.update(shape=list(args.shape), block=args.block, tile=args.tile, voxels=voxels, cpus=os.cpu_count(),
                       load_average_at_start=os.getloadavg()[0])  # fmt: skip
        results["ceiling_before"] = parallel_ceiling(model, args.ceiling_steps)
        results["speed"] = speed(work, model, vol, args, voxels)
        results["ceiling_after"] = parallel_ceiling(model, args.ceiling_steps)
        one, two = results["speed"]["blockwise 1 worker"], results["speed"]["blockwise 2 workers"]
        results["ratio_blocks"] = two["voxels_per_s_blocks"] / one["voxels_per_s_blocks"]
        results["ratio_wall"] = two["voxels_per_s_wall"] / one["voxels_per_s_wall"]
        results["small"] = small_rss(work, model, args)
        results["faults"] = faults(work, model, vol, args)
        results["bench_wall_s"] = round(time.perf_counter() - start, 1)
        results["load_average_at_end"] = os.getloadavg()[0]  # other work on the machine competes for its CPUs
        report(results)
        print(f"bench wall time {results['bench_wall_s']} s")
        (work / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results) if args.out is None else f"results: {work / 'results.json'}")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(r.get("output", "identical") == "identical" for r in results["speed"].values())
    interrupted = results["faults"]["ctrl_c"]["rc"] == 130  # otherwise the Ctrl-C phase tested nothing
    return 0 if ok and interrupted and results["faults"]["rerun"]["output"] == "identical" else 1


if __name__ == "__main__":
    sys.exit(main())
