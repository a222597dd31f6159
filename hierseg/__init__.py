"""hierseg: distributed hierarchical segmentation of EM images that never learns from uncertain pixels."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["FINE_CLASSES", "IGNORE_INDEX", "Hierarchy", "__version__"]


def __getattr__(name: str) -> Any:
    """The label names load on first use: importing a light module (``hierseg.raycluster``, the hook every
    embedded Ray worker runs before Ray sets ``OMP_NUM_THREADS``) must not import torch, or torch sizes its
    thread pool to the whole machine in every worker (2 workers x 2 threads on 2 cores trained at half speed)."""
    if name in ("FINE_CLASSES", "IGNORE_INDEX", "Hierarchy"):
        from hierseg import labels

        return getattr(labels, name)
    raise AttributeError(f"module 'hierseg' has no attribute {name!r}")
