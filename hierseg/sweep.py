"""``hierseg sweep``: expand a sweep file into numbered trials, then run them locally or as a Slurm array.

A sweep file (YAML, read with ``safe_load`` semantics and duplicate keys rejected)::

    name: lambda-seeds             # optional; the sweep id (default: the file name without .yaml)
    grid:                          # cartesian product, last key varies fastest
      loss.lambda_coarse: [0, 0.1, 0.2, 0.5]
      run.seed: [0, 1]
    list:                          # optional explicit override sets, one per entry
      - {model.base_channels: 16}
      - {model.base_channels: 32, optim.lr: 0.002}

With both ``grid`` and ``list``, every list entry is combined with every grid point (list-major order);
with one of them, that one alone gives the trials. Keys are the same dotted paths ``--set`` takes.

Why validate everything first: a sweep is often submitted to a queue where a bad trial would fail hours
later. Every trial's resolved spec is validated before a single file is written or a job submitted.
Each trial gets ``tracking.tags`` ``{sweep: <id>, trial: <n>}`` (so ``promote`` can pick the best across
the sweep) and ``run.name`` suffixed with the sweep id and trial number (so trials never share checkpoints).
A trial that finished writes ``trial_XXX/DONE``; re-running or re-submitting the sweep skips it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hierseg.spec import JobSpec, SpecError, apply_overrides, parse_yaml, validate_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
ARRAY_TEMPLATE = REPO_ROOT / "deploy" / "slurm" / "array.sbatch.tmpl"
_SWEEP_KEYS = ("name", "grid", "list")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepError(ValueError):
    """A sweep that cannot be expanded, validated, written or submitted; the message says how to fix it."""


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its number, the overrides that define it and its validated spec."""

    index: int
    overrides: dict[str, Any]
    spec: JobSpec

    @property
    def dirname(self) -> str:
        return f"trial_{self.index:03d}"


@dataclass
class Sweep:
    """An expanded, validated sweep: the id names its MLflow tag, Slurm job name and default folder."""

    sweep_id: str
    source: Path
    base: Path
    trials: list[Trial] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ expansion
def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SweepError(f"{what} not found: {path} (check the path)")
    text = path.read_text()
    if not text.strip():
        raise SweepError(f"{what} {path} is empty")
    return parse_yaml(text, str(path))


def _grid_points(grid: Any, source: Path) -> list[dict[str, Any]]:
    """Cartesian product of ``key -> [values]``; an empty value list would silently drop every trial."""
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{source}: 'grid' must be a non-empty mapping of key.path -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"{source}: grid.{key} must be a non-empty list of values, for example {key}: [0, 0.1] "
                f"(got {values!r}); to fix one value for every trial use --set {key}=VALUE"
            )
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _list_entries(entries: Any, source: Path) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not entries:
        raise SweepError(f"{source}: 'list' must be a non-empty list of mappings key.path -> value")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SweepError(f"{source}: list[{i}] must be a mapping key.path -> value (got {entry!r})")
    return [dict(e) for e in entries]


def expand(raw: Any, source: Path) -> list[dict[str, Any]]:
    """Turn a parsed sweep file into one override dict per trial, in trial order."""
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: the top level must be a mapping with 'grid' and/or 'list'")
    unknown = [k for k in raw if k not in _SWEEP_KEYS]
    if unknown:
        names = ", ".join(map(str, unknown))
        raise SweepError(f"{source}: unknown top-level key(s) {names}; allowed: name, grid, list")
    if raw.get("grid") is None and raw.get("list") is None:
        raise SweepError(f"{source}: empty sweep: give a 'grid' of key.path -> [values] and/or a 'list' of overrides")
    points = _grid_points(raw["grid"], source) if raw.get("grid") is not None else [{}]
    entries = _list_entries(raw["list"], source) if raw.get("list") is not None else [{}]
    trials = []
    for i, entry in enumerate(entries):
        clash = sorted(set(entry) & set(points[0]))
        if clash:
            raise SweepError(f"{source}: list[{i}] sets {', '.join(clash)}, which the grid also sweeps; keep it in one")
        trials += [{**entry, **point} for point in points]
    return trials


def sweep_id_of(raw: dict[str, Any], source: Path) -> str:
    name = str(raw.get("name") or source.stem)
    if not _ID_RE.match(name):
        raise SweepError(f"{source}: name {name!r} must use only letters, digits, '.', '_' and '-' (it names folders)")
    return name


# ----------------------------------------------------------------------------------------- validation
def _as_override(key: str, value: Any) -> str:
    """``key=value`` with the value as JSON, which ``apply_overrides`` parses back exactly (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def _resolve_trial(base: dict[str, Any], overrides: dict[str, Any], index: int, sweep_id: str) -> JobSpec:
    raw = apply_overrides(copy.deepcopy(base), [_as_override(k, v) for k, v in overrides.items()])
    run = raw.setdefault("run", {})
    tracking = raw.setdefault("tracking", {})
    if isinstance(run, dict):
        run["name"] = f"{run.get('name', 'hierseg')}-{sweep_id}-t{index:03d}"
    if isinstance(tracking, dict):
        if tracking.get("run_name"):
            tracking["run_name"] = f"{tracking['run_name']}-{sweep_id}-t{index:03d}"
        tags = tracking.get("tags") if isinstance(tracking.get("tags"), dict) else {}
        tracking["tags"] = {**tags, "sweep": sweep_id, "trial": str(index)}
    return validate_spec(raw)


def build_sweep(base_path: Path, sweep_path: Path, extra: Sequence[str] = ()) -> Sweep:
    """Expand and validate every trial; raise :class:`SweepError` listing each bad field once."""
    raw_sweep = _read_yaml(sweep_path, "sweep file")
    per_trial = expand(raw_sweep, sweep_path)
    sweep_id = sweep_id_of(raw_sweep, sweep_path)
    base = _read_yaml(base_path, "base spec")
    if not isinstance(base, dict):
        validate_spec(base, str(base_path))  # raises the spec module's message for a non-mapping
    base = apply_overrides(base, extra)
    sweep = Sweep(sweep_id, sweep_path, base_path)
    problems: dict[str, list[int]] = {}
    for i, overrides in enumerate(per_trial):
        try:
            sweep.trials.append(Trial(i, overrides, _resolve_trial(base, overrides, i, sweep_id)))
        except SpecError as e:
            for err in e.errors:
                problems.setdefault(err, []).append(i)
    if problems:
        lines = [f"  - {err} (trial{'s' if len(ix) > 1 else ''} {_ranges(ix)})" for err, ix in problems.items()]
        raise SweepError(
            f"sweep {sweep_path} over base spec {base_path}: {len(per_trial)} trials, nothing written or submitted; "
            "fix these fields (a key in the sweep file or --set, or the base spec):\n" + "\n".join(lines)
        )
    return sweep


def _ranges(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8`` (the syntax of ``sbatch --array``)."""
    out: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(indices)), key=lambda p: p[1] - p[0]):
        run = [v for _, v in group]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


# -------------------------------------------------------------------------------------------- writing
def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written spec or index."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_done(out: Path, trial: Trial) -> bool:
    return (out / trial.dirname / "DONE").exists()


def _check_reuse(out: Path, sweep: Sweep) -> None:
    """A finished trial may only be skipped if it trained the same spec; otherwise refuse, keep its results."""
    for trial in sweep.trials:
        spec_file = out / trial.dirname / "spec.yaml"
        if is_done(out, trial) and spec_file.is_file() and spec_file.read_text() != trial.spec.to_yaml():
            raise SweepError(
                f"{out / trial.dirname} finished with a different spec than this sweep now gives; "
                "nothing was changed. Use a new --out folder (or a new sweep name), or delete that trial folder"
            )


def write_sweep(out: Path, sweep: Sweep) -> Path:
    """Write ``trial_XXX/spec.yaml`` for every trial and the ``sweep.json`` index; return the index path."""
    _check_reuse(out, sweep)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    trials = []
    for t in sweep.trials:
        (out / t.dirname).mkdir(exist_ok=True)
        _write_atomic(out / t.dirname / "spec.yaml", t.spec.to_yaml())
        trials.append({"index": t.index, "dir": t.dirname, "run_name": t.spec.run.name, "overrides": t.overrides})
    index = {
        "sweep": sweep.sweep_id,
        "sweep_file": str(sweep.source.resolve()),
        "base_spec": str(sweep.base.resolve()),
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mlflow_tags": {"sweep": sweep.sweep_id},
        "num_trials": len(trials),
        "trials": trials,
    }
    previous = out / "sweep.json"
    if previous.is_file():  # keep the history of submissions across re-runs of the same sweep
        index["submissions"] = json.loads(previous.read_text()).get("submissions", [])
    _write_atomic(previous, json.dumps(index, indent=2) + "\n")
    return previous


# ---------------------------------------------------------------------------------------------- slurm
@dataclass(frozen=True)
class SlurmOptions:
    """Resources of one array task; ``None`` means derive from the spec (see :func:`_resources`)."""

    throttle: int | None = None
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    gpus: int | None = None
    mem: str | None = None


def train_script() -> Path:
    """The training CLI the trials run; ``HIERSEG_TRAIN_SCRIPT`` swaps it (tests use a stand-in)."""
    return Path(os.environ.get("HIERSEG_TRAIN_SCRIPT") or REPO_ROOT / "jobs" / "train.py").resolve()


def trial_command(spec_file: str, launcher: str, nproc: int, python: str, script: str) -> list[str]:
    """The command that trains one trial: one process (``local``) or ``torchrun --standalone``."""
    if launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                script, "--spec", spec_file, "--launcher", "torchrun"]  # fmt: skip
    return [python, script, "--spec", spec_file, "--launcher", "local"]


def _resources(spec: JobSpec, launcher: str, opts: SlurmOptions) -> tuple[int, int]:
    """CPUs and GPUs per array task: one rank (``local``) or ``run.num_workers`` ranks (``torchrun``)."""
    ranks = spec.run.num_workers if launcher == "torchrun" else 1
    cpus = opts.cpus_per_task or ranks * (spec.data.num_workers + 1)
    gpus = opts.gpus if opts.gpus is not None else (ranks if spec.run.use_gpu else 0)
    return cpus, gpus


def render_array_script(out: Path, sweep: Sweep, todo: list[Trial], launcher: str, opts: SlurmOptions) -> str:
    """Fill deploy/slurm/array.sbatch.tmpl (the single source of the array script) for the unfinished trials."""
    if not ARRAY_TEMPLATE.is_file():
        raise SweepError(f"Slurm template not found: {ARRAY_TEMPLATE}; run hierseg sweep from a hierseg checkout")
    first = sweep.trials[0].spec
    cpus, gpus = _resources(first, launcher, opts)
    extra = [f"#SBATCH --{k}={v}" for k, v in (("partition", opts.partition), ("time", opts.time)) if v]
    extra += [f"#SBATCH --gpus-per-task={gpus}"] if gpus else []
    extra += [f"#SBATCH --mem={opts.mem}"] if opts.mem else []
    array = _ranges(t.index for t in todo) + (f"%{opts.throttle}" if opts.throttle else "")
    cmd = trial_command('"$dir/spec.yaml"', launcher, first.run.num_workers, '"$python"', '"$train"')
    values = {
        "SWEEP_ID": sweep.sweep_id,
        "ARRAY": array,
        "SWEEP_DIR": shlex.quote(str(out.resolve())),
        "CPUS": str(cpus),
        "SBATCH_EXTRA": "\n".join(extra),
        "PYTHON": shlex.quote(sys.executable),
        "TRAIN_SCRIPT": shlex.quote(str(train_script())),
        "WORKDIR": shlex.quote(str(Path.cwd())),
        "TRAIN_CMD": " ".join(cmd),
    }
    text = ARRAY_TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


def submit(script: Path) -> str:
    """``sbatch --parsable``; return the job id. Raise :class:`SweepError` with sbatch's own message."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SweepError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return proc.stdout.strip().split(";")[0]


def _record_submission(out: Path, job_id: str, indices: list[int]) -> None:
    index_file = out / "sweep.json"
    index = json.loads(index_file.read_text())
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    index.setdefault("submissions", []).append({"job_id": job_id, "trials": _ranges(indices), "at": now})
    _write_atomic(index_file, json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- local
def run_local(out: Path, todo: list[Trial], launcher: str) -> list[int]:
    """Train the unfinished trials one after another; return the indices that failed.

    A failed trial does not stop the others (a sweep is a batch of independent jobs); its DONE is not written,
    so the next run of the sweep retries exactly the failed ones.
    """
    failed = []
    for n, trial in enumerate(todo, 1):
        spec_file = out / trial.dirname / "spec.yaml"
        cmd = trial_command(str(spec_file), launcher, trial.spec.run.num_workers, sys.executable, str(train_script()))
        print(f"[sweep] trial {trial.index} ({n}/{len(todo)}): {shlex.join(cmd)}", flush=True)
        env = {**os.environ, "HIERSEG_SWEEP_TRIAL_DIR": str(out / trial.dirname)}
        if subprocess.run(cmd, env=env, check=False).returncode == 0:
            _write_atomic(out / trial.dirname / "DONE", _dt.datetime.now(_dt.timezone.utc).isoformat() + "\n")
        else:
            failed.append(trial.index)
            print(f"[sweep] trial {trial.index} failed; it will be retried when the sweep is run again", flush=True)
    return failed


# ------------------------------------------------------------------------------------------------ cli
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hierseg sweep",
        description="Expand a sweep (grid and/or list of overrides) into trials; run them locally or as a Slurm "
        "array. Without --local or --slurm it only writes the trial specs.",
    )
    p.add_argument("--spec", required=True, type=Path, help="base job spec (YAML)")
    p.add_argument("--sweep", required=True, type=Path, help="sweep file: name, grid and/or list")
    p.add_argument("--out", type=Path, help="sweep folder (default: sweeps/<sweep name>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every trial (repeatable)",
    )
    launch_help = "how each trial trains: one process, or torchrun --standalone with run.num_workers ranks"
    p.add_argument("--launcher", choices=("local", "torchrun"), default="local", help=launch_help)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="train the unfinished trials here, one after another")
    mode.add_argument("--slurm", action="store_true", help="write <out>/array.sbatch (one array task per trial)")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit it with sbatch")
    p.add_argument("--throttle", type=int, help="with --slurm: at most N trials run at once (%%N)")
    p.add_argument("--partition", help="with --slurm: Slurm partition")
    p.add_argument("--time", help="with --slurm: time limit per trial, e.g. 04:00:00")
    p.add_argument("--cpus-per-task", type=int, help="with --slurm: default ranks x (data.num_workers + 1)")
    p.add_argument("--gpus", type=int, help="with --slurm: GPUs per trial (default: ranks if run.use_gpu else 0)")
    p.add_argument("--mem", help="with --slurm: memory per trial, e.g. 16G")
    return p


def _check_args(args: argparse.Namespace) -> None:
    slurm_only = ("submit", "throttle", "partition", "time", "cpus_per_task", "gpus", "mem")
    given = [f"--{k.replace('_', '-')}" for k in slurm_only if getattr(args, k) not in (None, False)]
    if given and not args.slurm:
        raise SweepError(f"{', '.join(given)} only apply with --slurm; add --slurm or drop them")
    for name in ("throttle", "cpus_per_task", "gpus"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus" else 1):
            raise SweepError(f"--{name.replace('_', '-')} must be a positive number (got {value})")
    if args.submit and shutil.which("sbatch") is None:
        raise SweepError(
            "sbatch not found on PATH: this is not a Slurm submit host. Nothing was written. Either run this on "
            "the cluster's login node, drop --submit to only write the array script (then copy it and run "
            "`sbatch <out>/array.sbatch` there), or train the trials here one after another with: "
            f"hierseg sweep --spec {args.spec} --sweep {args.sweep} --local"
        )


def _slurm(args: argparse.Namespace, out: Path, sweep: Sweep, todo: list[Trial]) -> int:
    opts = SlurmOptions(args.throttle, args.partition, args.time, args.cpus_per_task, args.gpus, args.mem)
    script = out / "array.sbatch"
    _write_atomic(script, render_array_script(out, sweep, todo, args.launcher, opts))
    script.chmod(0o755)
    print(f"[sweep] wrote {script} ({len(todo)} array tasks)")
    if not args.submit:
        print(f"[sweep] submit it with: sbatch {script}")
        return 0
    job_id = submit(script)
    _record_submission(out, job_id, [t.index for t in todo])
    print(f"[sweep] submitted array job {job_id}; watch it with: squeue -j {job_id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``hierseg sweep``; user errors print one clear message and return 2."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        sweep = build_sweep(args.spec, args.sweep, args.overrides)
        out = args.out or Path("sweeps") / sweep.sweep_id
        write_sweep(out, sweep)
        todo = [t for t in sweep.trials if not is_done(out, t)]
        skipped = len(sweep.trials) - len(todo)
        print(f"[sweep] {sweep.sweep_id}: {len(sweep.trials)} trials in {out} ({skipped} already finished)")
        if not todo:
            print("[sweep] every trial has finished; nothing to run")
            return 0
        if args.slurm:
            return _slurm(args, out, sweep, todo)
        if args.local:
            failed = run_local(out, todo, args.launcher)
            if failed:
                print(f"[sweep] {len(failed)} trial(s) failed: {_ranges(failed)}", file=sys.stderr)
                return 1
            return 0
        print(f"[sweep] run them with --local, or as a Slurm array with --slurm [--submit]; index: {out}/sweep.json")
        return 0
    except (SweepError, SpecError) as e:
        print(f"hierseg sweep: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
