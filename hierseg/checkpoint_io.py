"""Reading a hierseg checkpoint (``state.pt``, ``weights_only=True``): shared by training and serving.

Why a module of its own: :mod:`hierseg.serve` loads checkpoints but never imports :mod:`hierseg.train`;
writing, resuming and pruning stay in :mod:`hierseg.train.checkpoint`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint (or its index) that cannot be used; the message names the file and the fix."""


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory or ``state.pt`` file with ``weights_only=True``."""
    p = Path(path)
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a directory with {STATE_FILE} or the file)")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message recommends weights_only=False, i.e. running the file's code: never repeat it.
        raise CheckpointError(
            f"{p}: holds pickled Python objects, which hierseg checkpoints never contain and hierseg will not "
            "load; use a checkpoint written by hierseg train (or its best/ folder)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{p}: truncated or corrupt checkpoint ({type(e).__name__}); delete this checkpoint folder "
            "(training then resumes from the previous one) or copy it again from where it came from"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{p}: not a hierseg checkpoint (no model weights); use one written by hierseg train")
    return state
