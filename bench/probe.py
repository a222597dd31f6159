"""Issue 15 probe: bad inputs and faults through hierseg's real CLIs, as a user meets them.

    nice -n 19 python bench/probe.py [--out DIR] [--only SUBSTR ...] [--list] [--no-ray]

Every case builds its files in its own folder (tiny synthetic data, tiny specs, ``--launcher local``),
runs one real command (``jobs/*.py`` or ``python -m hierseg.cli <verb>``) in that folder, and records
the exit code, wall time, whether it hit its timeout (a hang), whether the output holds a Python
traceback, whether stderr ends in one ``hierseg ...`` line (a spec error's indented field list counts
as part of that line), and whether every file that existed before (the case's inputs, the shared
fixtures, other files in the output folder, old shards, checkpoints) is still there, byte for byte.

Verdicts: ``good`` (an error exit with one hierseg line naming the culprit, or a success where success
is right), ``weak`` (no traceback, but no hierseg line or the message lacks the case's ``expect``
text), ``bad`` (traceback, hang, data loss, exit 0 where an error was due, a control that failed, or a
failed post-check). The first cases build the shared fixtures (synthetic images, shards, a trained
and registered model); they are controls too. Results go to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NICE = ["nice", "-n", "19"]
TRAIN = [PY, str(ROOT / "jobs" / "train.py")]
MAKE_SHARDS = [PY, str(ROOT / "jobs" / "make_shards.py")]
PREDICT = [PY, str(ROOT / "jobs" / "predict.py")]
CLI = [PY, "-m", "hierseg.cli"]
TRACEBACK = "Traceback (most recent call last)"
MUTABLE = ("mlflow.db", "mlflow.db-*", "*/.lock")
"""Files a failing command may legitimately rewrite (the store it logs a FAILED run to, its lock)."""
DROP = object()
"""Value in a spec section override that removes the key."""


# ---------------------------------------------------------------------------------------------- types
@dataclass
class Ctx:
    """What a case's setup works with: its folder, the shared fixtures, and what to undo afterwards."""

    dir: Path
    fx: Path
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    expect: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def p(self, rel: str) -> Path:
        return self.dir / rel

    def write(self, rel: str, text: str) -> Path:
        path = self.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def copy(self, src: Path, rel: str) -> Path:
        dest = self.p(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return dest

    def spec(
        self, sections: dict[str, Any] | None = None, *, shards: Path | None = None, name: str = "spec.yaml"
    ) -> Path:
        spec = merge(tiny_spec(shards or self.fx / "shards", self.dir), sections or {})
        return self.write(name, yaml.safe_dump(spec, sort_keys=False))

    def train(self, spec: Path, *args: str, launcher: str = "local") -> list[str]:
        return [*TRAIN, "--spec", str(spec), "--launcher", launcher, *args]

    def read_only(self, rel: str) -> Path:
        folder = self.p(rel)
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # root ignores chmod: use the immutable flag
            subprocess.run(["chattr", "+i", str(folder)], check=True)
            self.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=False))
        else:
            folder.chmod(0o555)
            self.cleanups.append(lambda: folder.chmod(0o755))
        return folder

    def ray(self) -> None:
        """A private Ray temp folder and no RAY_ADDRESS: never join or disturb another cluster."""
        tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.env["RAY_TMPDIR"] = tmp
        self.cleanups.append(lambda: shutil.rmtree(tmp, ignore_errors=True))

    def background(self, argv: list[str], until: str, timeout: float) -> None:
        """Start ``argv`` and wait for ``until`` in its output; it is SIGKILLed after the case."""
        log = self.logs / f"{self.dir.name}.background.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [*NICE, *argv],
                cwd=self.dir,
                env=case_env(self.env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.cleanups.append(lambda: stop_group(proc))
        t0 = time.monotonic()
        while until not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"background run never printed {until!r}: {log.read_text()[-800:]}")
            time.sleep(0.5)


@dataclass
class Case:
    name: str
    item: str
    """Issue 15 item number, or 'extra'."""
    setup: Callable[[Ctx], list[str]]
    """Creates the case's files; returns the command."""
    expect: tuple[str, ...] = ()
    """Text the output must hold (the culprit's name); ``{dir}``/``{fx}`` are the folders."""
    ok: bool = False
    """True for a control: exit 0 is right."""
    timeout: float = 120.0
    may_change: tuple[str, ...] = ()
    """Globs (relative to the case folder) of files the command may rewrite or delete."""
    check: Callable[[Ctx, str], str | None] | None = None
    """After the run: a problem (-> bad) or None; gets the combined output."""
    forbid: tuple[str, ...] = ()
    """Text the output must not hold (-> weak)."""
    signal_on: tuple[str, int] | None = None
    """Send this signal to the command's process group once its output holds this text."""
    fixture: bool = False
    """Builds the shared fixtures: runs in the fixture folder, before every other case."""


@dataclass
class Result:
    name: str
    item: str
    verdict: str = "bad"
    reason: str = ""
    command: str = ""
    rc: int | None = None
    wall_s: float = 0.0
    hang: bool = False
    traceback: list[str] = field(default_factory=list)
    """The exception line ending each raw traceback in the output (empty: none)."""
    named: bool = False
    last_line: str = ""
    expect: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    stderr_tail: str = ""
    stdout_tail: str = ""


# -------------------------------------------------------------------------------------------- helpers
def tiny_spec(shards: Path, work: Path) -> dict[str, Any]:
    """tests/train_utils.py ``tiny_spec`` shrunk for the probe: one local rank, two steps, no model logged."""
    return {
        "data": {
            "train": str(shards / "train"),
            "val": str(shards / "val"),
            "batch_size": 2,
            "num_workers": 0,
            "shuffle_buffer": 4,
            "patch_size": 64,
        },
        "model": {"base_channels": 8, "depth": 2},
        "optim": {"lr": 0.003, "warmup_steps": 1},
        "run": {
            "name": "t",
            "num_workers": 1,
            "max_steps": 2,
            "eval_every": 2,
            "log_every": 1,
            "storage_path": str(work / "runs"),
        },
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "experiment": "probe", "log_model": False},
    }


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a ``DROP`` value removes the key."""
    out = dict(base)
    for key, value in over.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def case_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "HIERSEG_DEBUG"}}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env | extra


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this probe started (its own child's session), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(root: Path, prefix: str = "") -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by ``prefix`` + relative path."""
    out = {}
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file() and not p.is_symlink():
            out[prefix + p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lost_files(before: dict[str, str], after: dict[str, str], may_change: Iterable[str]) -> list[str]:
    allowed = tuple(may_change) + MUTABLE
    return [
        f"{k} ({'gone' if k not in after else 'changed'})"
        for k, v in before.items()
        if after.get(k) != v and not any(fnmatch.fnmatch(k, g) for g in allowed)
    ]


def rewrite_tar(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a shard member by member; ``edit(name, data)`` returns new bytes, or None to drop it."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            new = edit(m.name, data)
            if new is not None:
                m.size = len(new)
                tar.addfile(m, io.BytesIO(new))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def edit_train_shards(ctx: Ctx, edit: Callable[[str, bytes], bytes | None]) -> Path:
    shards = ctx.copy(ctx.fx / "shards", "shards")
    for tar in sorted((shards / "train").glob("shard-*.tar")):
        rewrite_tar(tar, edit)
    return shards


def label_50(name: str, data: bytes) -> bytes:
    if not name.endswith("label.npy"):
        return data
    arr = np.load(io.BytesIO(data))
    arr[:4, :4] = 50
    return npy_bytes(arr)


def small_image(name: str, data: bytes) -> bytes:
    return npy_bytes(np.zeros((40, 40), np.uint8)) if name.endswith("image.npy") else data


def first_tar(ctx: Ctx, split: str) -> Path:
    return sorted((ctx.p("shards") / split).glob("shard-*.tar"))[0]


def fx_run(ctx: Ctx) -> Path:
    """A copy of the fixture's run folder (checkpoints 1 and 2, best/) for resume cases."""
    return ctx.copy(ctx.fx / "runs" / "t", "runs/t")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def predict_in(ctx: Ctx) -> Path:
    """Two synthetic slices as a folder of PNGs."""
    folder = ctx.p("in")
    folder.mkdir()
    for p in sorted((ctx.fx / "synth" / "images").glob("*.png"))[:2]:
        shutil.copy2(p, folder / p.name)
    return folder


def predict(ctx: Ctx, *args: str, model: str | None = None, inp: str | None = None) -> list[str]:
    model = model or str(ctx.fx / "runs" / "t" / "best")
    return [*PREDICT, "--model", model, "--input", inp or str(predict_in(ctx)), *args, "--quiet"]


def make_shards(ctx: Ctx, *args: str, images: Path | None = None, labels: Path | None = None) -> list[str]:
    images = images or ctx.fx / "synth" / "images"
    labels = labels or ctx.fx / "synth" / "labels"
    return [*MAKE_SHARDS, "--images", str(images), "--labels", str(labels), *args]


def synth_copy(ctx: Ctx) -> tuple[Path, Path]:
    src = ctx.copy(ctx.fx / "synth", "synth")
    return src / "images", src / "labels"


def with_map(ctx: Ctx, text: str) -> list[str]:
    return make_shards(ctx, "--label-map", str(ctx.write("map.yaml", text)), "--out", str(ctx.p("out")))


def exists(rel: str) -> Callable[[Ctx, str], str | None]:
    def check(ctx: Ctx, _: str) -> str | None:
        return None if ctx.p(rel).exists() else f"{rel} was not written"

    return check


def absent(rel: str) -> Callable[[Ctx, str], str | None]:
    def check(ctx: Ctx, _: str) -> str | None:
        return f"{rel} was written although the command failed" if ctx.p(rel).exists() else None

    return check


def checkpoint_written(ctx: Ctx, _: str) -> str | None:
    index = ctx.p("runs/t/checkpoints.json")
    ok = index.is_file() and json.loads(index.read_text())
    return None if ok else "no checkpoint after the signal"


# ---------------------------------------------------------------------------------------- the fixtures
def fx_synth(ctx: Ctx) -> list[str]:
    return [*CLI, "synth", "--out", str(ctx.p("synth")), "--num", "6", "--size", "96", "--seed", "0"]


def fx_shards(ctx: Ctx) -> list[str]:
    return make_shards(ctx, "--out", str(ctx.p("shards")), "--val-frac", "0.34", "--seed", "0")


def fx_train(ctx: Ctx) -> list[str]:
    spec = ctx.spec({"run": {"eval_every": 1}, "tracking": {"log_model": True, "registered_model": "probe"}})
    return ctx.train(spec)


def fx_trained(ctx: Ctx, _: str) -> str | None:
    run = ctx.p("runs/t")
    missing = [n for n in ("best/state.pt", "checkpoint_00000001", "checkpoint_00000002") if not (run / n).exists()]
    return f"missing {missing}" if missing else None


FIXTURES = [
    Case(
        "control: synth images", "extra", fx_synth, ok=True, fixture=True, check=exists("synth/images/synth_0005.png")
    ),
    Case("control: make-shards", "extra", fx_shards, ok=True, fixture=True, check=exists("shards/val/manifest.json")),
    Case("control: train local + register", "extra", fx_train, ok=True, fixture=True, timeout=300, check=fx_trained),
]


# ---------------------------------------------------------------------------------------------- spec
def spec_case(name: str, item: str, sections: dict[str, Any], expect: str, *sets: str) -> Case:
    def setup(ctx: Ctx) -> list[str]:
        return ctx.train(ctx.spec(sections), *(a for s in sets for a in ("--set", s)))

    return Case(name, item, setup, (expect,))


def text_spec_case(name: str, item: str, text: str, expect: str) -> Case:
    return Case(name, item, lambda ctx: ctx.train(ctx.write("spec.yaml", text)), (expect,))


MOVED = {
    "non_tissue": ["extracellular space"],
    "neuron_part": ["dendrite", "axon", "soma", "tear"],
    "glia": ["glia"],
    "myelin_related": ["myelin", "myelin inner tongue", "myelin outer tongue"],
    "organelle": ["nucleus", "mitochondria", "fat globule"],
}
NO_TEAR = {k: [c for c in v if c != "tear"] for k, v in MOVED.items()}

SPEC = [
    spec_case("spec: unknown top-level section, did-you-mean", "extra", {"optimm": {"lr": 0.1}}, "did you mean optim"),
    spec_case("spec: typo in a field, did-you-mean", "extra", {"data": {"bach_size": 2}}, "did you mean batch_size"),
    spec_case("spec: wrong type (batch_size 'four')", "extra", {"data": {"batch_size": "four"}}, "data.batch_size"),
    spec_case("spec: missing required run.max_steps", "extra", {"run": {"max_steps": DROP}}, "run.max_steps"),
    spec_case("spec: bad enum model.norm", "extra", {"model": {"norm": "batchnorm"}}, "model.norm"),
    spec_case("spec: negative batch via --set", "extra", {}, "data.batch_size", "data.batch_size=-4"),
    spec_case("spec: negative optim.lr", "extra", {"optim": {"lr": -0.001}}, "optim.lr"),
    spec_case("spec: empty run.name", "24", {"run": {"name": ""}}, "run.name"),
    spec_case("spec: run.name with a slash", "24", {}, "run.name", "run.name=a/b"),
    spec_case(
        "spec: batch does not divide over ranks",
        "8",
        {"data": {"batch_size": 3}, "run": {"num_workers": 2}},
        "run.num_workers",
    ),
    spec_case(
        "spec: hierarchy leaves 'tear' out",
        "extra",
        {"hierarchy": {"levels": [{"name": "coarse", "groups": NO_TEAR}]}},
        "tear",
    ),
    text_spec_case("spec: YAML syntax error", "extra", "data:\n  train: a\n   val: b\n", "line"),
    text_spec_case("spec: duplicate key", "extra", "run:\n  max_steps: 2\n  max_steps: 3\ndata: {}\n", "duplicate key"),
    Case("spec: --spec file missing", "extra", lambda ctx: ctx.train(ctx.p("nosuch.yaml")), ("nosuch.yaml",)),
    spec_case("spec: use_gpu on a machine without CUDA (local)", "21", {"run": {"use_gpu": True}}, "run.use_gpu"),
    Case("spec: --launcher typo", "extra", lambda ctx: ctx.train(ctx.spec(), launcher="rey"), ("rey",)),
]


# ------------------------------------------------------------------------------------ ray and torchrun
def ray_use_gpu(ctx: Ctx) -> list[str]:
    ctx.ray()
    return ctx.train(ctx.spec({"run": {"use_gpu": True}}), launcher="ray")


def ray_dead_address(ctx: Ctx) -> list[str]:
    ctx.ray()
    address = f"127.0.0.1:{free_port()}"
    ctx.env["RAY_ADDRESS"] = address
    ctx.expect.append(f"RAY_ADDRESS={address}")
    return ctx.train(ctx.spec(), launcher="ray")


def ray_bad_label(ctx: Ctx) -> list[str]:
    ctx.ray()
    shards = edit_train_shards(ctx, label_50)
    spec = ctx.spec({"run": {"num_workers": 2, "max_failures": 0}, "data": {"num_workers": 1}}, shards=shards)
    return ctx.train(spec, launcher="ray")


TORCHRUN_ARGS = ["--standalone", "--nproc_per_node", "2", str(ROOT / "jobs" / "train.py")]


def torchrun_world_over_batch(ctx: Ctx) -> list[str]:
    """Plain torchrun: its own ChildFailedError traceback ends the output, whatever the ranks print."""
    spec = ctx.spec({"data": {"batch_size": 1}})
    return [PY, "-m", "torch.distributed.run", *TORCHRUN_ARGS, "--spec", str(spec)]


def hierseg_torchrun_world_over_batch(ctx: Ctx) -> list[str]:
    spec = ctx.spec({"data": {"batch_size": 1}})
    return [*CLI, "torchrun", *TORCHRUN_ARGS, "--spec", str(spec)]


def hierseg_torchrun_rank_fails(ctx: Ctx) -> list[str]:
    spec = ctx.spec({"data": {"batch_size": 2}, "tracking": {"uri": "htp://127.0.0.1:1", "log_model": False}})
    return [*CLI, "torchrun", *TORCHRUN_ARGS, "--spec", str(spec)]


LAUNCHERS = [
    Case("ray: use_gpu without CUDA", "21", ray_use_gpu, ("run.use_gpu",), timeout=180),
    Case("ray: dead RAY_ADDRESS", "26", ray_dead_address, timeout=180),
    Case("ray: label value 50 in shards (2 workers)", "20", ray_bad_label, ("50", "shard-00"), timeout=300),
    Case("torchrun: world size 2 > batch 1", "8", torchrun_world_over_batch, ("data.batch_size",), timeout=240),
    Case("hierseg torchrun: world size 2 > batch 1", "8", hierseg_torchrun_world_over_batch, ("data.batch_size",)),
    Case(
        "hierseg torchrun: a rank fails (bad URI)", "8", hierseg_torchrun_rank_fails, ("failed:", "htp://127.0.0.1:1")
    ),
]


# --------------------------------------------------------------------------------------------- shards
def shards_missing(ctx: Ctx) -> list[str]:
    return ctx.train(ctx.spec({"data": {"train": str(ctx.p("nosuch/train"))}}))


def shards_empty(ctx: Ctx) -> list[str]:
    ctx.p("empty_train").mkdir()
    return ctx.train(ctx.spec({"data": {"train": str(ctx.p("empty_train"))}}))


def shards_corrupt_tar(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "shards")
    first_tar(ctx, "train").write_text("this is not a tar file\n" * 50)
    return ctx.train(ctx.spec(shards=ctx.p("shards")))


def shards_truncated_val(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "shards")
    truncate(first_tar(ctx, "val"), 0.3)
    return ctx.train(ctx.spec(shards=ctx.p("shards")))


def shards_bad_manifest(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "shards")
    ctx.write("shards/train/manifest.json", '{"format": "hierseg-shards/2", "shards": [')
    return ctx.train(ctx.spec(shards=ctx.p("shards")))


def shards_old_format(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "shards")
    path = ctx.p("shards/train/manifest.json")
    manifest = json.loads(path.read_text())
    manifest["format"] = "hierseg-shards/1"
    manifest["command"] = "hierseg make-shards --images im --labels lb --out old --patch-size 64 --stride 32"
    path.write_text(json.dumps(manifest))
    return ctx.train(ctx.spec(shards=ctx.p("shards")))


def shards_label_50(ctx: Ctx) -> list[str]:
    return ctx.train(ctx.spec({"data": {"num_workers": 2}}, shards=edit_train_shards(ctx, label_50)))


def shards_shape(ctx: Ctx) -> list[str]:
    return ctx.train(ctx.spec(shards=edit_train_shards(ctx, small_image)))


def shards_synthetic_foreign(ctx: Ctx) -> list[str]:
    ctx.write("data/train/notes.txt", "my notes\n")
    synthetic = {"num_train": 2, "num_val": 1, "image_size": 64, "seed": 0}
    return ctx.train(ctx.spec({"data": {"synthetic": synthetic}}, shards=ctx.p("data")))


def shards_glob_no_match(ctx: Ctx) -> list[str]:
    return ctx.train(ctx.spec({"data": {"val": str(ctx.p("nothing-*.tar"))}}))


SHARDS = [
    Case("shards: train folder missing", "extra", shards_missing, ("nosuch",)),
    Case("shards: train folder empty", "extra", shards_empty, ("empty_train",)),
    Case("shards: corrupt train tar", "4", shards_corrupt_tar, ("shard-000000.tar",)),
    Case("shards: truncated val tar", "4", shards_truncated_val, ("shard-000000.tar",)),
    Case("shards: corrupt manifest.json", "extra", shards_bad_manifest, ("manifest.json",)),
    Case("shards: old patch-grid format", "extra", shards_old_format, ("make-shards",)),
    Case("shards: label value 50 (2 loader workers)", "20", shards_label_50, ("50", "shard-00"), timeout=240),
    Case("shards: image/label shape mismatch in a sample", "20", shards_shape, ("shape", "shard-00"), timeout=240),
    Case("shards: synthetic into a folder with user files", "extra", shards_synthetic_foreign, ("data.train",)),
    Case("shards: data.val glob matches nothing", "extra", shards_glob_no_match, ("nothing-",)),
]


# ----------------------------------------------------------------------------------------- label maps
LABEL_MAPS = [
    Case(
        "label map: duplicate key",
        "12",
        lambda c: with_map(c, "mapping:\n  3: axon\n  6: myelin\n  3: myelin\n"),
        ("duplicate key",),
    ),
    Case("label map: unknown class", "extra", lambda c: with_map(c, "mapping:\n  3: axxon\n"), ("axxon",)),
    Case(
        "label map: empty set",
        "extra",
        lambda c: with_map(c, "mapping:\n  3: []\nunmapped: uncertain\n"),
        ("map.yaml",),
    ),
    Case(
        "label map: unmapped value",
        "extra",
        lambda c: with_map(c, "mapping:\n  3: axon\n  255: uncertain\n"),
        ("synth_0000", "value"),
    ),
    Case("label map: unknown top-level key", "extra", lambda c: with_map(c, "mappng:\n  3: axon\n"), ("mappng",)),
    Case(
        "label map: file missing",
        "extra",
        lambda c: make_shards(c, "--label-map", str(c.p("nosuch.yaml")), "--out", str(c.p("out"))),
        ("nosuch.yaml",),
    ),
]


# ---------------------------------------------------------------------------------------- make-shards
def ms_out(ctx: Ctx, *args: str) -> list[str]:
    return make_shards(ctx, "--out", str(ctx.p("out")), *args)


def ms_read_only(ctx: Ctx) -> list[str]:
    ctx.read_only("ro")
    return make_shards(ctx, "--out", str(ctx.p("ro/shards")))


def ms_overwrite_failing(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "out")
    return [*with_map(ctx, "mapping:\n  3: axon\n  255: uncertain\n"), "--overwrite"]


def ms_nonempty(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "out")
    return ms_out(ctx)


def ms_colour_npy(ctx: Ctx) -> list[str]:
    images, labels = synth_copy(ctx)
    for folder in (images, labels):
        np.save(folder / "rgb.npy", np.zeros((64, 80, 3), np.uint8))
    return make_shards(ctx, "--out", str(ctx.p("out")), images=images, labels=labels)


def ms_colour_png(ctx: Ctx) -> list[str]:
    from PIL import Image

    images, labels = synth_copy(ctx)
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(images / "synth_0000.png")
    return make_shards(ctx, "--out", str(ctx.p("out")), images=images, labels=labels)


def ms_corrupt_png(ctx: Ctx) -> list[str]:
    images, labels = synth_copy(ctx)
    truncate(images / "synth_0003.png", 0.4)
    return make_shards(ctx, "--out", str(ctx.p("out")), images=images, labels=labels)


def ms_foreign_in_split(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "out")
    ctx.write("out/train/notes.txt", "mine\n")
    return ms_out(ctx, "--overwrite")


def ms_out_is_file(ctx: Ctx) -> list[str]:
    ctx.write("out", "a file where the output folder should go\n")
    return ms_out(ctx)


def ms_overwrite_control(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "out")
    ctx.write("out/README.txt", "notes on these shards\n")
    return ms_out(ctx, "--overwrite", "--val-frac", "0.5")


MAKE = [
    Case("make-shards: --patch-size given", "24", lambda c: ms_out(c, "--patch-size", "64"), ("--patch-size",)),
    Case("make-shards: --stride 0", "12", lambda c: ms_out(c, "--stride", "0"), ("--stride",)),
    Case("make-shards: --patch-size -8", "24", lambda c: ms_out(c, "--patch-size", "-8"), ("--patch-size",)),
    Case("make-shards: read-only output folder", "24", ms_read_only, ("{dir}/ro",)),
    Case("make-shards: --overwrite, failing build keeps old shards", "2", ms_overwrite_failing, ("synth_0000",)),
    Case("make-shards: non-empty --out without --overwrite", "extra", ms_nonempty, ("--overwrite",)),
    Case("make-shards: colour .npy", "13", ms_colour_npy, ("rgb.npy", "colour")),
    Case("make-shards: colour .png", "13", ms_colour_png, ("synth_0000.png", "colour")),
    Case("make-shards: truncated .png", "extra", ms_corrupt_png, ("synth_0003.png",)),
    Case("make-shards: --overwrite with a user file in a split", "extra", ms_foreign_in_split, ("notes.txt",)),
    Case("make-shards: --out is a file", "extra", ms_out_is_file, ("{dir}/out",)),
    Case(
        "make-shards: --overwrite rebuild keeps other files",
        "2",
        ms_overwrite_control,
        ok=True,
        may_change=("out/train/*", "out/val/*"),
        check=exists("out/README.txt"),
    ),
]


# ---------------------------------------------------------------------------------------- checkpoints
RUN_RECORD = ("runs/t/run.json",)
"""The run's MLflow run id: a copied run names the fixture's store, so a new MLflow run is recorded."""
RESUMED_RUN = ("runs/t/checkpoints.json", *RUN_RECORD, "runs/t/best/*")


def ck_truncated_newest(ctx: Ctx) -> list[str]:
    truncate(fx_run(ctx) / "checkpoint_00000002" / "state.pt")
    return ctx.train(ctx.spec(), "--set", "run.max_steps=3")


def ck_corrupt_index(ctx: Ctx) -> list[str]:
    (fx_run(ctx) / "checkpoints.json").write_text('[{"dir": "checkpoint_00000002", "metr')
    return ctx.train(ctx.spec(), "--set", "run.max_steps=3")


def ck_deleted_and_stale(ctx: Ctx) -> list[str]:
    shutil.rmtree(fx_run(ctx) / "checkpoint_00000002")  # the index still names it
    ctx.write("runs/t/.checkpoint_00000009.ab12/state.pt", "half written")
    ctx.write("runs/t/notes.txt", "my notes on this run\n")
    ctx.write("runs/t/best/README", "what best/ is\n")
    return ctx.train(ctx.spec(), "--set", "run.max_steps=3")


def ck_changed_model(ctx: Ctx) -> list[str]:
    fx_run(ctx)
    return ctx.train(ctx.spec(), "--set", "run.max_steps=3", "--set", "model.base_channels=16")


def ck_moved_groups(ctx: Ctx) -> list[str]:
    fx_run(ctx)
    return ctx.train(
        ctx.spec({"run": {"max_steps": 3}, "hierarchy": {"levels": [{"name": "coarse", "groups": MOVED}]}})
    )


def ck_predict_truncated(ctx: Ctx) -> list[str]:
    state = ctx.copy(ctx.fx / "runs/t/best/state.pt", "ckpt/state.pt")
    truncate(state)
    return predict(ctx, "--output", str(ctx.p("out")), model=str(state))


def ck_predict_pickled(ctx: Ctx) -> list[str]:
    path = ctx.p("ckpt/state.pt")
    path.parent.mkdir()
    code = "import argparse, sys, torch; torch.save({'model': {}, 'args': argparse.Namespace(x=1)}, sys.argv[1])"
    subprocess.run([*NICE, PY, "-c", code, str(path)], check=True, env=case_env({}))
    return predict(ctx, "--output", str(ctx.p("out")), model=str(path))


CHECKPOINTS = [
    Case(
        "checkpoint: newest state.pt truncated, resume falls back",
        "22",
        ck_truncated_newest,
        ("checkpoint_00000002",),
        ok=True,
        timeout=240,
        may_change=(*RESUMED_RUN, "runs/t/checkpoint_00000002/*"),  # the damaged one, trained again
    ),
    Case("checkpoint: corrupt checkpoints.json", "22", ck_corrupt_index, ("checkpoints.json",), may_change=RUN_RECORD),
    Case(
        "checkpoint: index names a deleted folder + stale temporaries: resume falls back, user files kept",
        "3",
        ck_deleted_and_stale,
        ("checkpoint_00000002",),
        ok=True,
        timeout=240,
        may_change=(*RESUMED_RUN, "runs/t/.checkpoint_*"),
    ),
    Case("checkpoint: resume with changed model.base_channels", "14", ck_changed_model, ("model.base_channels",)),
    Case("checkpoint: resume with classes moved between groups", "14", ck_moved_groups, ("hierarchy",)),
    Case(
        "checkpoint: predict with truncated state.pt",
        "22",
        ck_predict_truncated,
        ("state.pt",),
        forbid=("weights_only=False",),
    ),
    Case(
        "checkpoint: predict with pickled code in state.pt",
        "22",
        ck_predict_pickled,
        ("state.pt",),
        forbid=("weights_only=False",),
    ),
]


# ------------------------------------------------------------------------------------------- tracking
def tr_uri(ctx: Ctx, uri: str) -> list[str]:
    return ctx.train(ctx.spec({"tracking": {"uri": uri}}))


def tr_read_only(ctx: Ctx) -> list[str]:
    ctx.read_only("ro")
    return tr_uri(ctx, f"sqlite:///{ctx.p('ro/mlflow.db')}")


def tr_not_a_db(ctx: Ctx) -> list[str]:
    ctx.write("notes.db", "these are my notes, not a database\n")
    return tr_uri(ctx, f"sqlite:///{ctx.p('notes.db')}")


def tr_unreachable(ctx: Ctx) -> list[str]:
    uri = f"http://127.0.0.1:{free_port()}"
    ctx.expect.append(uri)
    return tr_uri(ctx, uri)


def offline_record(ctx: Ctx) -> Path:
    line = {"kind": "metrics", "tracking_uri": "x", "run_id": "0" * 32, "metrics": [["a", 1.0, 1, 1]]}
    return ctx.write("runs/t/tracking_offline.jsonl", json.dumps(line) + "\n")


def replay_bad_uri(ctx: Ctx) -> list[str]:
    return [*CLI, "replay-tracking", "--record", str(offline_record(ctx)), "--tracking-uri", "htp://127.0.0.1:1"]


def replay_corrupt(ctx: Ctx) -> list[str]:
    record = ctx.write("runs/t/tracking_offline.jsonl", '{"kind": "metrics", "run_id": \n')
    return [*CLI, "replay-tracking", "--record", str(record), "--tracking-uri", f"sqlite:///{ctx.p('mlflow.db')}"]


TRACKING = [
    Case("tracking: htp:// typo", "23", lambda c: tr_uri(c, "htp://127.0.0.1:5000"), ("did you mean http",)),
    Case("tracking: sqlite in a read-only folder", "23", tr_read_only, ("{dir}/ro",), timeout=150),
    Case("tracking: file that is not a database", "23", tr_not_a_db, ("notes.db",)),
    Case("tracking: unreachable http server port", "23", tr_unreachable, timeout=150),
    Case("replay-tracking: htp:// typo keeps the record", "10", replay_bad_uri, ("htp://127.0.0.1:1",)),
    Case("replay-tracking: corrupt record", "10", replay_corrupt, ("tracking_offline.jsonl",)),
]


# -------------------------------------------------------------------------------------------- predict
OUR_OUTPUTS = ("out/fine_labels.tif", "out/fine_confidence.tif", "out/coarse_prob.npy", "out/fallback.tif")


def pr_into_input(ctx: Ctx) -> list[str]:
    inp = predict_in(ctx)
    return predict(ctx, "--output", str(inp), "--overwrite", inp=str(inp))


def pr_inside_input(ctx: Ctx) -> list[str]:
    inp = predict_in(ctx)
    return predict(ctx, "--output", str(inp / "pred"), "--overwrite", inp=str(inp))


def pr_contains_input(ctx: Ctx) -> list[str]:
    inp = predict_in(ctx)
    return predict(ctx, "--output", str(ctx.dir), "--overwrite", inp=str(inp / "synth_0000.png"))


def pr_file_onto_itself(ctx: Ctx) -> list[str]:
    image = predict_in(ctx) / "synth_0000.png"
    return predict(ctx, "--output", str(image), "--overwrite", inp=str(image))


def pr_overwrite_control(ctx: Ctx) -> list[str]:
    ctx.write("out/notes.txt", "my notes\n")
    ctx.write("out/fine_labels.tif", "an earlier prediction\n")
    return predict(ctx, "--output", str(ctx.p("out")), "--overwrite")


def pr_no_overwrite(ctx: Ctx) -> list[str]:
    ctx.write("out/fine_labels.tif", "an earlier prediction\n")
    return predict(ctx, "--output", str(ctx.p("out")))


def pr_zarr_foreign(ctx: Ctx) -> list[str]:
    ctx.write("out.zarr/zarr.json", '{"zarr_format": 3, "node_type": "group"}')
    ctx.write("out.zarr/notes.txt", "mine\n")
    return predict(ctx, "--output", str(ctx.p("out.zarr")), "--overwrite")


def pr_registry(model: str, uri: bool = True) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        extra = ["--tracking-uri", f"sqlite:///{ctx.fx / 'mlflow.db'}"] if uri else []
        return predict(ctx, "--output", str(ctx.p("out")), *extra, model=model)

    return setup


def pr_args(*args: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: predict(ctx, "--output", str(ctx.p("out")), *args)


def pr_colour(ctx: Ctx) -> list[str]:
    np.save(ctx.p("rgb.npy"), np.zeros((64, 80, 3), np.uint8))
    return predict(ctx, "--output", str(ctx.p("out")), inp=str(ctx.p("rgb.npy")))


def pr_mixed_shapes(ctx: Ctx) -> list[str]:
    from PIL import Image

    inp = predict_in(ctx)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(inp / "synth_0001.png")
    return predict(ctx, "--output", str(ctx.p("out")), inp=str(inp))


PREDICTS = [
    Case("predict: control, folder of PNGs", "extra", pr_args(), ok=True, check=exists("out/fine_labels.tif")),
    Case("predict: --output = --input folder, --overwrite", "1", pr_into_input, ("--output",)),
    Case("predict: --output inside --input, --overwrite", "1", pr_inside_input, ("--output",)),
    Case("predict: --output contains --input, --overwrite", "1", pr_contains_input, ("--output",)),
    Case("predict: --output = --input file, --overwrite", "1", pr_file_onto_itself, ("--output",)),
    Case(
        "predict: --overwrite keeps other files in the folder",
        "1",
        pr_overwrite_control,
        ok=True,
        may_change=OUR_OUTPUTS,
        check=exists("out/notes.txt"),
    ),
    Case("predict: earlier output without --overwrite", "extra", pr_no_overwrite, ("--overwrite",)),
    Case("predict: --overwrite of a zarr holding user files", "1", pr_zarr_foreign, ("out.zarr",)),
    Case(
        "predict: control, models:/probe/1",
        "extra",
        pr_registry("models:/probe/1"),
        ok=True,
        check=exists("out/fine_labels.tif"),
    ),
    Case("predict: unknown models:/ alias", "extra", pr_registry("models:/probe@champion"), ("champion",)),
    Case(
        "predict: models:/ without a tracking URI",
        "extra",
        pr_registry("models:/probe/1", uri=False),
        ("--tracking-uri",),
    ),
    Case("predict: --tile 8", "extra", pr_args("--tile", "8"), ("--tile",)),
    Case("predict: --overlap = --tile", "extra", pr_args("--tile", "64", "--overlap", "64"), ("--overlap",)),
    Case(
        "predict: --label-map path missing",
        "extra",
        lambda c: pr_args("--label-map", str(c.p("nosuch.yaml")))(c),
        ("nosuch.yaml",),
    ),
    Case("predict: colour .npy input", "13", pr_colour, ("rgb.npy", "colour")),
    Case("predict: input slices of different sizes", "extra", pr_mixed_shapes, ("synth_0001",)),
]


# ------------------------------------------------------------------------------- evaluate, promote, sweep
def evaluate(ctx: Ctx, *args: str) -> list[str]:
    return [*CLI, "evaluate", "--model", str(ctx.fx / "runs/t/best"), *args]


def ev_other_map(ctx: Ctx) -> list[str]:
    mapping = ctx.write("map.yaml", "mapping:\n  3: axon\n  6: myelin\n  255: uncertain\nunmapped: uncertain\n")
    build = make_shards(ctx, "--label-map", str(mapping), "--out", str(ctx.p("other")), "--val-frac", "0.34")
    subprocess.run([*NICE, *build], check=True, capture_output=True, env=case_env({}), cwd=ctx.dir, timeout=300)
    return evaluate(ctx, "--shards", str(ctx.p("other/val")))


def ev_corrupt(ctx: Ctx) -> list[str]:
    ctx.copy(ctx.fx / "shards", "shards")
    truncate(first_tar(ctx, "val"), 0.3)
    return evaluate(ctx, "--shards", str(ctx.p("shards/val")))


def promote(ctx: Ctx, *args: str) -> list[str]:
    return [*CLI, "promote", "--tracking-uri", f"sqlite:///{ctx.fx / 'mlflow.db'}", "--name", "probe", *args]


def sweep_bad_key(ctx: Ctx) -> list[str]:
    sweep = ctx.write("sweep.yaml", "name: s\ngrid:\n  run.nme: [a, b]\n")
    return [*CLI, "sweep", "--spec", str(ctx.spec()), "--sweep", str(sweep), "--local"]


OTHERS = [
    Case("evaluate: no --shards nor --image", "extra", lambda c: evaluate(c), ("--shards",)),
    Case(
        "evaluate: control on the val shards",
        "extra",
        lambda c: evaluate(c, "--shards", str(c.fx / "shards/val")),
        ok=True,
    ),
    Case("evaluate: shards of another label map say so", "15", ev_other_map, ("note",), ok=True, timeout=240),
    Case("evaluate: truncated val shard", "extra", ev_corrupt, ("shard-000000.tar",)),
    Case("promote: control --dry-run", "extra", lambda c: promote(c, "--experiment", "probe", "--dry-run"), ok=True),
    Case(
        "promote: metric nobody logged",
        "extra",
        lambda c: promote(c, "--experiment", "probe", "--metric", "val/nosuch", "--dry-run"),
        ("val/nosuch",),
    ),
    Case("sweep: bad key in the grid writes nothing", "extra", sweep_bad_key, ("run.nme",), check=absent("sweeps")),
    Case("synth: --num -1", "extra", lambda c: [*CLI, "synth", "--out", str(c.p("s")), "--num", "-1"], ("--num",)),
]


# ------------------------------------------------------------------------------- signals, concurrency
def sig_ctrl_c(ctx: Ctx) -> list[str]:
    return ctx.train(ctx.spec({"run": {"max_steps": 400, "eval_every": 400}}))


def conc_second(ctx: Ctx) -> list[str]:
    spec = ctx.spec({"run": {"max_steps": 100000, "eval_every": 100000}})
    ctx.background(ctx.train(spec), "[hierseg] step", timeout=240)
    return ctx.train(spec)


LIVE = [
    Case(
        "signal: Ctrl-C during a local run",
        "11",
        sig_ctrl_c,
        ("stopped at step",),
        ok=True,
        timeout=240,
        signal_on=("[hierseg] step 2/", signal.SIGINT),
        may_change=("runs/*",),
        check=checkpoint_written,
    ),
    Case("concurrency: second launch of a live run", "6", conc_second, ("in use by pid",), timeout=300),
]

CASES = [*FIXTURES, *SPEC, *LAUNCHERS, *SHARDS, *LABEL_MAPS, *MAKE, *CHECKPOINTS, *TRACKING, *PREDICTS, *OTHERS, *LIVE]


# ---------------------------------------------------------------------------------------------- running
def execute(argv: list[str], ctx: Ctx, case: Case) -> tuple[int | None, float, bool, str, str]:
    """Run the command in the case folder; ``(rc, wall_s, hang, stdout, stderr)``."""
    out_path, err_path = ctx.logs / f"{ctx.dir.name}.out", ctx.logs / f"{ctx.dir.name}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*NICE, *argv],
            cwd=ctx.dir,
            env=case_env(ctx.env),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        pending = case.signal_on
        while proc.poll() is None and time.monotonic() - t0 < case.timeout:
            if pending and pending[0] in out_path.read_text(errors="replace") + err_path.read_text(errors="replace"):
                os.killpg(proc.pid, pending[1])  # as a terminal's Ctrl-C: the whole foreground group
                pending = None
            time.sleep(0.2)
        hang = proc.poll() is None
        if hang:
            stop_group(proc)
        wall = time.monotonic() - t0
    return (
        (None if hang else proc.returncode),
        wall,
        hang,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )


RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)?\([^)]*pid=\d+[^)]*\)(\x1b\[[0-9;]*m)?\s?")


def traceback_origins(text: str) -> list[str]:
    """The exception line that ends each traceback (Ray's ``(Worker pid=N)`` prefixes dropped), deduplicated."""
    lines = [RAY_PREFIX.sub("", line) for line in text.splitlines()]
    found = []
    for i, line in enumerate(lines):
        if TRACEBACK in line:
            end = next((n for n in lines[i + 1 :] if n.strip() and not n.startswith((" ", "\t"))), "?")
            found.append(end.strip()[:160])
    return list(dict.fromkeys(found))


def named_line(stderr: str) -> tuple[bool, str]:
    """Whether stderr ends in one ``hierseg ...`` line (a listed spec error's indented lines belong to it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    for line in reversed(lines):
        if line.startswith("hierseg"):
            return True, last
        if not line.startswith((" ", "\t")):
            return False, last
    return False, last


def verdict(case: Case, r: Result, missing: list[str], problem: str | None, forbidden: list[str]) -> tuple[str, str]:
    if r.hang:
        return "bad", f"hang (no exit within {case.timeout:.0f} s)"
    if r.traceback:
        more = f" (+{len(r.traceback) - 1} more)" if len(r.traceback) > 1 else ""
        return "bad", f"raw traceback: {r.traceback[0]}{more}"
    if r.lost:
        return "bad", f"data loss: {', '.join(r.lost[:4])}" + (f" (+{len(r.lost) - 4})" if len(r.lost) > 4 else "")
    if case.ok and r.rc != 0:
        return "bad", f"control failed (exit {r.rc})"
    if not case.ok and r.rc == 0:
        return "bad", "exit 0 where an error was due"
    if problem:
        return "bad", problem
    if not case.ok and not r.named:
        return "weak", "no one-line 'hierseg ...' message at the end of stderr"
    if missing:
        return "weak", f"message lacks {missing}"
    if forbidden:
        return "weak", f"says {forbidden}"
    return "good", "ok" if case.ok else f"exit {r.rc}, named"


def run_case(index: int, case: Case, work: Path, fx: Path, logs: Path) -> Result:
    folder = fx if case.fixture else work / f"{index:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(folder, fx, logs)
    before_fx = {} if case.fixture else snapshot(fx, "fx/")
    try:
        try:
            argv = case.setup(ctx)
        except Exception as e:  # a broken setup is the probe's fault or a missing fixture: reported, not hidden
            return Result(case.name, case.item, reason=f"setup failed: {type(e).__name__}: {e}")
        before = {} if case.fixture else snapshot(folder)
        rc, wall, hang, out, err = execute(argv, ctx, case)
        after = {} if case.fixture else snapshot(folder)
        text = out + err
        named, last = named_line(err)
        r = Result(case.name, case.item, command=shlex.join(a.replace(str(ROOT) + "/", "") for a in argv), rc=rc,
                   wall_s=round(wall, 1), hang=hang, traceback=traceback_origins(text), named=named,
                   last_line=last[:300],
                   expect=[e.format(dir=folder, fx=fx) for e in case.expect] + ctx.expect,
                   lost=lost_files(before, after, case.may_change) + lost_files(before_fx, snapshot(fx, "fx/"), ()),
                   stderr_tail=err[-2500:], stdout_tail=out[-800:])  # fmt: skip
        missing = [e for e in r.expect if e not in text]
        problem = case.check(ctx, text) if case.check and not hang else None
        forbidden = [f for f in case.forbid if f in text]
        r.verdict, r.reason = verdict(case, r, missing, problem, forbidden)
        return r
    finally:
        for undo in reversed(ctx.cleanups):
            undo()


# ---------------------------------------------------------------------------------------------- report
def print_row(i: int, r: Result) -> None:
    rc = "-" if r.rc is None else str(r.rc)
    print(f"{i:3d} {r.verdict:<5} {r.item:>5} {rc:>4} {r.wall_s:6.1f}s  {r.name[:58]:<58} {r.reason[:90]}", flush=True)


def summary(results: list[Result]) -> dict[str, int]:
    counts = {"cases": len(results)} | {v: sum(r.verdict == v for r in results) for v in ("good", "weak", "bad")}
    counts |= {
        "hang": sum(r.hang for r in results),
        "traceback": sum(bool(r.traceback) for r in results),
        "data_loss": sum(bool(r.lost) for r in results),
    }
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="results and work folder (default: a new temporary folder)")
    ap.add_argument("--only", action="append", default=[], help="run the cases whose name holds this (repeatable)")
    ap.add_argument("--no-ray", action="store_true", help="leave out the cases that use the Ray launcher")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--reuse-fixtures", action="store_true", help="with --out: keep fixtures built by an earlier run")
    return ap.parse_args(argv)


def selected(args: argparse.Namespace) -> list[Case]:
    cases = [c for c in CASES if c.fixture or not args.only or any(s in c.name for s in args.only)]
    return [c for c in cases if not (args.no_ray and c.name.startswith("ray:"))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = selected(args)
    if args.list:
        for i, c in enumerate(cases):
            print(f"{i:3d} {c.item:>5}  {c.name}")
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="hierseg-probe-"))
    work, fx, logs = out / "work", out / "work" / "fx", out / "logs"
    if args.reuse_fixtures and (fx / "runs" / "t" / "best" / "state.pt").is_file():
        cases = [c for c in cases if not c.fixture]
    else:
        shutil.rmtree(work, ignore_errors=True)
    for old in (p for p in work.glob("[0-9]*") if p.is_dir()):  # case folders of an earlier run
        shutil.rmtree(old)
    for d in (fx, logs):
        d.mkdir(parents=True, exist_ok=True)
    print(f"probe: {len(cases)} cases in {out}\n  # verdict item   rc   wall  case{' ' * 55}reason", flush=True)
    t0 = time.monotonic()
    results = []
    for i, case in enumerate(cases):
        results.append(run_case(i, case, work, fx, logs))
        print_row(i, results[-1])
    counts = summary(results) | {"runtime_s": round(time.monotonic() - t0)}
    print("\n" + "  ".join(f"{k}: {v}" for k, v in counts.items()))
    for r in results:
        if r.verdict == "bad":
            tail = "\n  ".join(r.stderr_tail.splitlines()[-6:])
            print(f"\nBAD [{r.item}] {r.name}: {r.reason}\n  $ {r.command}\n  {tail}")
    (out / "results.json").write_text(json.dumps({"counts": counts, "cases": [asdict(r) for r in results]}, indent=1))
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
