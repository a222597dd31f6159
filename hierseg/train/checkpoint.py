"""Checkpoints: atomic writes, safe loads, and where the latest one lives for each launcher.

A checkpoint is a directory holding ``state.pt`` (model, optimizer, scheduler, step, RNG states,
per-rank loader positions, best metric, resolved spec, MLflow run id). It is written under a
temporary name, fsynced, and renamed, so a crash never leaves a half-written checkpoint that looks
whole. Loading (:mod:`hierseg.checkpoint_io`, shared with serving) uses ``weights_only=True``; a file
that does not load is one :class:`CheckpointError` naming it and the fix (never torch's advice to load
with ``weights_only=False``).

Permissions follow the umask: ``mkstemp``/``mkdtemp`` create 0600/0700, which would lock colleagues
out of checkpoints on a lab's shared storage, so every file and folder written here is chmod-ed to
what a plain ``open``/``mkdir`` would have given.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

# reading lives with serving's code, which must not import training; re-exported here for training
from hierseg.checkpoint_io import STATE_FILE, CheckpointError, load_state

INDEX_FILE = "checkpoints.json"
CHECKPOINT_PREFIX = "checkpoint_"


# ------------------------------------------------------------------------------------------ umask
def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # not Linux: set and restore at once
    os.umask(mask)
    return mask


def follow_umask(path: Path, is_dir: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have (0777/0666 minus the umask)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A hidden temporary folder in ``parent`` (same file system: the final rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    follow_umask(tmp, is_dir=True)
    return tmp


def _atomic_write(path: Path, write: Any, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ on disk
class DiskCheckpoints:
    """Checkpoints under ``<root>/checkpoint_<step>``; keeps the best K by a metric plus the latest.

    Used by the torchrun and local launchers (Ray manages its own with the same policy). Crash safety:
    a checkpoint folder is complete before it gets its name; the index is rewritten before any pruned
    folder is deleted (so it never names a deleted folder); and resume takes the newest checkpoint
    that loads, so a folder damaged or removed behind our back costs one checkpoint, not the run.
    """

    def __init__(self, root: Path, keep: int, metric: str, mode: str):
        self.root, self.keep, self.metric, self.mode = root, keep, metric, mode
        self.index_file = root / INDEX_FILE

    def _index(self) -> list[dict[str, Any]]:
        if not self.index_file.is_file():
            return []
        try:
            index = json.loads(self.index_file.read_text())
            if not isinstance(index, list) or not all(isinstance(e, dict) and "dir" in e for e in index):
                raise ValueError("expected a list of {dir, metrics} entries")
        except ValueError as e:
            raise CheckpointError(
                f"{self.index_file}: corrupt checkpoint index ({e}); delete it to resume from the newest "
                "checkpoint_* folder there, or set run.resume=false / a new run.name to start afresh"
            ) from None
        return index

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first.

        The index's order (last = newest saved) wins; folders it does not name (the index was removed,
        or a crash came between the folder's rename and the index update) rank by step around it.
        """
        named = [self.root / e["dir"] for e in reversed(self._index())]
        on_disk = sorted(self.root.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True) if self.root.is_dir() else []
        extra = [p for p in on_disk if p not in named and p.is_dir()]
        newest = named[0].name if named else ""
        return [p for p in extra if p.name > newest] + named + [p for p in extra if p.name <= newest]

    def latest(self) -> Path | None:
        for path in self.candidates():
            if (path / STATE_FILE).is_file():
                return path
        return None

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """``(folder, state)`` of the newest checkpoint that loads; skipped ones are named in a warning."""
        for path in self.candidates():
            try:
                return path, load_state(path)
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
        return None

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> Path:
        name = f"{CHECKPOINT_PREFIX}{state['step']:08d}"
        final = self.root / name
        tmp_dir = make_temp_dir(self.root, f".{name}.")
        atomic_torch_save(state, tmp_dir / STATE_FILE)
        old = None
        if final.exists():  # same step saved again (a stop at a checkpoint step): swap, then delete
            old = self.root / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp_dir, final)
        index = [e for e in self._index() if e["dir"] != name] + [{"dir": name, "metrics": metrics}]
        kept, pruned = self._prune(index)
        atomic_write_text(json.dumps(kept, indent=1), self.index_file)  # the index first, then delete
        for e in pruned:
            shutil.rmtree(self.root / e["dir"], ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _prune(self, index: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        scored = [e for e in index[:-1] if self.metric in e.get("metrics", {})]
        scored.sort(key=lambda e: e["metrics"][self.metric], reverse=self.mode == "max")
        keep = {e["dir"] for e in scored[: self.keep]} | {index[-1]["dir"]}
        return [e for e in index if e["dir"] in keep], [e for e in index if e["dir"] not in keep]

    def clean_stale_temporaries(self) -> list[Path]:
        """Remove what a crashed save left: hidden ``.checkpoint_*`` folders and ``.*.tmp`` files.

        Only names this module writes are touched; call it only while holding the run lock (nobody
        else can be writing them then).
        """
        if not self.root.is_dir():
            return []
        removed = []
        for folder in (self.root, self.root / "best"):
            for p in folder.glob(".*") if folder.is_dir() else []:
                if p.is_dir() and p.name.startswith(f".{CHECKPOINT_PREFIX}"):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                elif p.is_file() and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed
