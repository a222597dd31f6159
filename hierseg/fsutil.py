"""File-system checks shared by every command that writes (shards, checkpoints, tracking stores, predictions)."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path


def check_folder_path(folder: Path) -> None:
    """Raise ``NotADirectoryError`` whose ``strerror`` names the file when ``folder`` or a parent is one.

    Why: ``mkdir(parents=True, exist_ok=True)`` then fails with a bare "File exists" or "Not a directory"
    that says neither which path is the file nor that a folder was expected there. Callers put the
    ``strerror`` into their own message, which names their flag or spec field and the fix.
    """
    for path in (folder, *folder.parents):
        if path.is_dir():
            return
        if path.is_symlink() and not path.exists():
            raise NotADirectoryError(errno.ENOTDIR, f"{path} is a broken link, not a folder", str(path))
        if path.exists():
            raise NotADirectoryError(errno.ENOTDIR, f"{path} is a file, not a folder", str(path))


def probe_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write (and remove) a probe file in it; raises ``OSError`` if it cannot.

    Why a real write rather than ``os.access``: root passes every ``os.access`` test, and read-only
    mounts or quotas only show when something is written.
    """
    check_folder_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".hierseg-probe-"):
        pass
