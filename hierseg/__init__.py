"""hierseg: distributed hierarchical segmentation of EM images that never learns from uncertain pixels."""

from hierseg.labels import FINE_CLASSES, IGNORE_INDEX, Hierarchy

__version__ = "0.1.0"
__all__ = ["FINE_CLASSES", "IGNORE_INDEX", "Hierarchy", "__version__"]
