"""Label maps: the user's label values -> fine class indices, with uncertain as IGNORE_INDEX.

Labs store labels in their own value spaces (vnc_sstem uses 159 for glia/extracellular, 191 for
mitochondria, ...). A :class:`LabelMap` says, for every source value, which fine class it means or
that it is ``uncertain``. Values the map does not cover are an error by default, because silently
training on a value nobody mapped is the worst failure mode; ``unmapped: uncertain`` opts out.

YAML form::

    mapping:            # source value -> fine class name (or index) | uncertain
      3: axon
      6: myelin
      255: uncertain
    unmapped: error     # or: uncertain (unmapped values become uncertain, counted and warned)
    sets: []            # reserved for partial labels (label sets); must stay empty for now

Applying a map is one vectorised table lookup; the result is int64 with -1 for uncertain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from hierseg.labels import FINE_CLASSES, IGNORE_INDEX, NUM_FINE_CLASSES, class_index

UNCERTAIN_NAMES = {"uncertain", "ignore", "void"}
_UNMAPPED = -2  # sentinel inside lookup tables; never leaves this module


@dataclass
class LabelMap:
    """Source label value -> fine class index (0..11) or IGNORE_INDEX for uncertain."""

    values: dict[int, int]
    unmapped: Literal["error", "uncertain"] = "error"
    sets: list[Any] = field(default_factory=list)
    """Reserved slot for label sets (values >= 12 meaning "one of these fine classes"); unused today."""
    source: str = "<default>"

    @classmethod
    def default(cls) -> LabelMap:
        """Identity on 0..11 plus 255 -> uncertain: labels already in the fine-class index space."""
        values = {i: i for i in range(NUM_FINE_CLASSES)}
        values[255] = IGNORE_INDEX
        return cls(values=values, source="<default: identity 0..11, 255=uncertain>")

    @classmethod
    def from_yaml(cls, path: str | Path) -> LabelMap:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"label map {p} not found; pass an existing YAML file to --label-map")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"label map {p} is not valid YAML: {e}") from None
        return cls.from_config(raw, source=str(p))

    @classmethod
    def from_config(cls, raw: Any, source: str = "<config>") -> LabelMap:
        """Parse the YAML structure; errors name the file and the offending entry."""
        if not isinstance(raw, Mapping) or "mapping" not in raw:
            raise ValueError(f"label map {source}: expected a mapping with a 'mapping' section (value -> class)")
        unknown = set(raw) - {"mapping", "unmapped", "sets", "description"}
        if unknown:
            raise ValueError(f"label map {source}: unknown key(s) {sorted(unknown)}; allowed: mapping, unmapped, sets")
        mapping = raw["mapping"]
        if not isinstance(mapping, Mapping) or not mapping:
            raise ValueError(f"label map {source}: 'mapping' must be a non-empty mapping of value -> class")
        values = {_parse_value(k, source): _parse_target(k, v, source) for k, v in mapping.items()}
        unmapped = raw.get("unmapped", "error")
        if unmapped not in ("error", "uncertain"):
            raise ValueError(f"label map {source}: unmapped must be 'error' or 'uncertain', got {unmapped!r}")
        sets = raw.get("sets") or []
        if sets:
            raise ValueError(f"label map {source}: 'sets' (partial labels) is not supported yet; leave it empty")
        return cls(values=values, unmapped=unmapped, sets=list(sets), source=source)

    def to_manifest(self) -> dict[str, Any]:
        """Plain-data form recorded in manifest.json (class names, so it reads without the code)."""
        return {
            "source": self.source,
            "mapping": {str(k): _target_name(v) for k, v in sorted(self.values.items())},
            "unmapped": self.unmapped,
            "sets": list(self.sets),
        }

    def apply(self, label: np.ndarray, where: str) -> tuple[np.ndarray, dict[int, int]]:
        """Map a label array to int64 fine indices (-1 = uncertain).

        Returns the mapped array and ``{value: pixel count}`` of unmapped values that were turned
        into uncertain (only when ``unmapped == 'uncertain'``). Raises naming ``where`` otherwise.
        """
        if label.dtype.kind not in "iub":
            if label.dtype.kind == "f" and np.all(np.mod(label, 1) == 0):
                label = label.astype(np.int64)
            else:
                raise ValueError(f"{where}: label values must be integers, got dtype {label.dtype}")
        uniq, inverse = np.unique(label, return_inverse=True)
        lut = np.array([self.values.get(int(v), _UNMAPPED) for v in uniq], dtype=np.int64)
        bad = lut == _UNMAPPED
        counts: dict[int, int] = {}
        if bad.any():
            pix = np.bincount(inverse.ravel(), minlength=len(uniq))
            counts = {int(uniq[i]): int(pix[i]) for i in np.flatnonzero(bad)}
            if self.unmapped == "error":
                listing = ", ".join(f"value {v} ({n} pixels)" for v, n in counts.items())
                raise ValueError(
                    f"{where}: label {listing} not in label map {self.source}; add it to the map "
                    "(a fine class or 'uncertain'), or pass --unmapped uncertain"
                )
            lut[bad] = IGNORE_INDEX
        return lut[inverse].reshape(label.shape), counts


def _parse_value(key: Any, source: str) -> int:
    try:
        value = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"label map {source}: key {key!r} is not an integer label value") from None
    if isinstance(key, bool) or value < 0:
        raise ValueError(f"label map {source}: key {key!r} must be a non-negative integer label value")
    return value


def _parse_target(key: Any, target: Any, source: str) -> int:
    if isinstance(target, str) and target.strip().lower() in UNCERTAIN_NAMES:
        return IGNORE_INDEX
    if target == IGNORE_INDEX and not isinstance(target, bool):
        return IGNORE_INDEX
    try:
        return class_index(target)
    except ValueError as e:
        raise ValueError(f"label map {source}, value {key}: {e} (or 'uncertain')") from None


def _target_name(index: int) -> str:
    return "uncertain" if index == IGNORE_INDEX else FINE_CLASSES[index]


def histogram(label: np.ndarray) -> tuple[np.ndarray, int]:
    """Valid pixels per fine class (12 int64) and the uncertain pixel count of a mapped label."""
    flat = label.ravel()
    valid = flat[flat >= 0]
    hist = np.bincount(valid, minlength=NUM_FINE_CLASSES)[:NUM_FINE_CLASSES].astype(np.int64)
    return hist, int(flat.size - valid.size)
