"""Checkpoints: atomic writes, safe loads, and where the latest one lives for each launcher.

A checkpoint is a directory holding ``state.pt`` (model, optimizer, scheduler, step, RNG states,
per-rank loader positions, best metric, resolved spec, MLflow run id). It is written under a
temporary name, fsynced, and renamed, so a crash never leaves a half-written checkpoint that looks
whole. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory or ``state.pt`` file with ``weights_only=True``."""
    p = Path(path)
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a directory with {STATE_FILE} or the file)")
    return torch.load(p, map_location=map_location, weights_only=True)


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


class DiskCheckpoints:
    """Checkpoints under ``<root>/checkpoint_<step>``; keeps the best K by a metric plus the latest.

    Used by the torchrun and local launchers (Ray manages its own with the same policy).
    """

    def __init__(self, root: Path, keep: int, metric: str, mode: str):
        self.root, self.keep, self.metric, self.mode = root, keep, metric, mode
        self.index_file = root / "checkpoints.json"

    def _index(self) -> list[dict[str, Any]]:
        return json.loads(self.index_file.read_text()) if self.index_file.is_file() else []

    def latest(self) -> Path | None:
        index = self._index()
        return self.root / index[-1]["dir"] if index else None

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> Path:
        name = f"checkpoint_{state['step']:08d}"
        final = self.root / name
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        atomic_torch_save(state, tmp_dir / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
        index = [e for e in self._index() if e["dir"] != name] + [{"dir": name, "metrics": metrics}]
        atomic_write_text(json.dumps(self._prune(index), indent=1), self.index_file)
        return final

    def _prune(self, index: list[dict[str, Any]]) -> list[dict[str, Any]]:
        scored = [e for e in index[:-1] if self.metric in e["metrics"]]
        scored.sort(key=lambda e: e["metrics"][self.metric], reverse=self.mode == "max")
        keep = {e["dir"] for e in scored[: self.keep]} | {index[-1]["dir"]}
        for e in index:
            if e["dir"] not in keep:
                shutil.rmtree(self.root / e["dir"], ignore_errors=True)
        return [e for e in index if e["dir"] in keep]
