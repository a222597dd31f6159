"""File-system checks shared by every command that writes (shards, checkpoints, tracking stores)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def probe_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write (and remove) a probe file in it; raises ``OSError`` if it cannot.

    Why a real write rather than ``os.access``: root passes every ``os.access`` test, and read-only
    mounts or quotas only show when something is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".hierseg-probe-"):
        pass
