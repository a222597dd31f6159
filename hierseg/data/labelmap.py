"""Label maps: the user's label values -> fine class indices, with uncertain as IGNORE_INDEX.

Labs store labels in their own value spaces (vnc_sstem uses 159 for glia/extracellular, 191 for
mitochondria, ...). A :class:`LabelMap` says, for every source value, which fine class it means or
that it is ``uncertain``. Values the map does not cover are an error by default, because silently
training on a value nobody mapped is the worst failure mode; ``unmapped: uncertain`` opts out.

YAML form::

    mapping:            # source value -> what the value tells about the pixel
      3: axon                          # a fine class (name or index)
      255: uncertain                   # nothing (IGNORE_INDEX)
      159: [glia, extracellular space] # partial label: one of these classes (classes or group names)
      77: neuron_part                  # partial label: a group of the default hierarchy
      0: {not: [mitochondria]}         # partial label: anything but these
      5: neurite_or_glia               # partial label declared under `sets`
    unmapped: error     # or: uncertain (unmapped values become uncertain, counted and warned)
    sets:               # optional named sets (name -> classes, group names, or {not: [...]})
      neurite_or_glia: [neuron_part, glia]

Partial labels are stored as set ids ``12, 13, ...`` (see :class:`~hierseg.labels.LabelSets`) so the
stored label stays one integer per pixel; the set table goes into the manifest. A set of one class
is that plain class; an empty set or a set of all 12 classes is an error (the latter is uncertain).

Applying a map is one vectorised table lookup; the result is int64 with -1 for uncertain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hierseg.labels import (
    FINE_CLASSES,
    IGNORE_INDEX,
    NUM_FINE_CLASSES,
    SET_ID_OFFSET,
    Hierarchy,
    LabelSets,
    check_set_members,
    class_index,
    closest,
    metric_name,
)

UNCERTAIN_NAMES = {"uncertain", "ignore", "void"}
_UNMAPPED = -2  # sentinel inside lookup tables; never leaves this module


@dataclass
class LabelMap:
    """Source label value -> fine class index (0..11), IGNORE_INDEX for uncertain, or a set id (12 + i)."""

    values: dict[int, int]
    unmapped: Literal["error", "uncertain"] = "error"
    sets: LabelSets = field(default_factory=LabelSets)
    """Partial-label table: stored value ``12 + i`` means "one of the fine classes of set ``i``"."""
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
        from hierseg.spec import SpecError, parse_yaml

        try:  # the spec's loader: safe_load that rejects duplicate keys instead of keeping the last
            raw = parse_yaml(p.read_text(), str(p))
        except SpecError as e:
            raise ValueError(f"label map {p}: {'; '.join(e.errors)}") from None
        return cls.from_config(raw, source=str(p))

    @classmethod
    def from_config(cls, raw: Any, source: str = "<config>", hierarchy: Hierarchy | None = None) -> LabelMap:
        """Parse the YAML structure; errors name the file and the offending entry.

        Group names in targets refer to ``hierarchy`` (default: the plan's default hierarchy).
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"label map {source}: expected a mapping with a 'mapping' section (value -> class)")
        _check_top_level_keys(raw, source)
        if "mapping" not in raw:
            raise ValueError(f"label map {source}: expected a mapping with a 'mapping' section (value -> class)")
        mapping = raw["mapping"]
        if not isinstance(mapping, Mapping) or not mapping:
            raise ValueError(f"label map {source}: 'mapping' must be a non-empty mapping of value -> class")
        unmapped = raw.get("unmapped", "error")
        if unmapped not in ("error", "uncertain"):
            raise ValueError(f"label map {source}: unmapped must be 'error' or 'uncertain', got {unmapped!r}")
        builder = _SetBuilder(source, hierarchy or Hierarchy.default())
        builder.declare(raw.get("sets") or [])
        values = {_parse_value(k, source): builder.target(k, v) for k, v in mapping.items()}
        return cls(values=values, unmapped=unmapped, sets=builder.label_sets(), source=source)

    def to_manifest(self) -> dict[str, Any]:
        """Plain-data form recorded in manifest.json (class names, so it reads without the code)."""
        return {
            "source": self.source,
            "mapping": {str(k): self.target_name(v) for k, v in sorted(self.values.items())},
            "unmapped": self.unmapped,
            "sets": self.sets.to_config(),
        }

    def target_name(self, index: int) -> str:
        """``uncertain``, a fine class name, or a label set name."""
        if index == IGNORE_INDEX:
            return "uncertain"
        return FINE_CLASSES[index] if index < SET_ID_OFFSET else self.sets.names[index - SET_ID_OFFSET]

    def apply(self, label: np.ndarray, where: str) -> tuple[np.ndarray, dict[int, int]]:
        """Map a label array to int64 fine indices (-1 = uncertain, ``12 + i`` = label set ``i``).

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
                    "(a fine class, a set of classes or 'uncertain'), or pass --unmapped uncertain"
                )
            lut[bad] = IGNORE_INDEX
        return lut[inverse].reshape(label.shape), counts


_TOP_LEVEL_KEYS = ("mapping", "unmapped", "sets", "description")


def _check_top_level_keys(raw: Mapping[Any, Any], source: str) -> None:
    """An unknown key is refused by name, with the key it most likely misspells (a typo in ``mapping``
    would otherwise read as "no mapping section")."""
    for key in sorted(map(str, raw)):
        if key not in _TOP_LEVEL_KEYS:
            close = closest(key, _TOP_LEVEL_KEYS)
            hint = f"did you mean {close!r}?" if close else f"allowed: {', '.join(_TOP_LEVEL_KEYS)}"
            raise ValueError(f"label map {source}: unknown key {key!r}; {hint}")


def _parse_value(key: Any, source: str) -> int:
    try:
        value = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"label map {source}: key {key!r} is not an integer label value") from None
    if isinstance(key, bool) or value < 0:
        raise ValueError(f"label map {source}: key {key!r} must be a non-negative integer label value")
    return value


class _SetBuilder:
    """Resolves label-map targets to class ids or set ids, numbering distinct sets in order of appearance.

    Two source values that mean the same set of classes share one set id (first name wins), so
    the set table and the statistics stay free of duplicates.
    """

    def __init__(self, source: str, hierarchy: Hierarchy):
        self.source = source
        self.groups = {
            metric_name(g): members
            for lv in hierarchy.levels
            for g, members in zip(lv.group_names, lv.group_members, strict=True)
        }
        self.names: list[str] = []
        self.members: list[tuple[int, ...]] = []
        self.declared: dict[str, tuple[int, ...]] = {}

    def declare(self, sets: Any) -> None:
        """The optional ``sets`` section: ``{name: target}`` (or ``[{name, classes}]``) of named sets."""
        if isinstance(sets, Sequence) and not isinstance(sets, str):
            pairs = []
            for i, item in enumerate(sets):
                if not isinstance(item, Mapping) or "name" not in item or "classes" not in item:
                    raise ValueError(f"label map {self.source}: sets[{i}] must be a mapping with 'name' and 'classes'")
                pairs.append((item["name"], item["classes"]))
        elif isinstance(sets, Mapping):
            pairs = list(sets.items())
        else:
            raise ValueError(f"label map {self.source}: 'sets' must map set names to lists of fine classes")
        for name, target in pairs:
            where = f"label map {self.source}, set {name!r}"
            members = self._resolve(target, where)
            check_set_members(str(name), members)
            self.declared[metric_name(str(name))] = members
            self._add(str(name), members, where)

    def target(self, key: Any, target: Any) -> int:
        """Class index, IGNORE_INDEX, or set id of one mapping entry."""
        where = f"label map {self.source}, value {key}"
        if isinstance(target, str) and target.strip().lower() in UNCERTAIN_NAMES:
            return IGNORE_INDEX
        if target == IGNORE_INDEX and not isinstance(target, bool):
            return IGNORE_INDEX
        members = self._resolve(target, where)
        name = _set_name(target)
        if not members:
            raise ValueError(f"{where}: {target!r} is an empty set of classes; name at least one fine class")
        if len(members) == NUM_FINE_CLASSES:
            raise ValueError(
                f"{where}: {target!r} covers all {NUM_FINE_CLASSES} fine classes, which says nothing about the "
                "pixel: that is 'uncertain'; map the value to uncertain"
            )
        if len(members) == 1:
            return members[0]
        return self._add(name, members, where)

    def _add(self, name: str, members: tuple[int, ...], where: str) -> int:
        if members in self.members:
            return SET_ID_OFFSET + self.members.index(members)
        if name in self.names:
            raise ValueError(f"{where}: set name {name!r} already names a different set of classes; rename one")
        self.names.append(name)
        self.members.append(members)
        return SET_ID_OFFSET + len(self.members) - 1

    def _resolve(self, target: Any, where: str) -> tuple[int, ...]:
        """Sorted fine class indices a target names (class, group, declared set, list, or ``{not: ...}``)."""
        if isinstance(target, Mapping):
            if set(target) != {"not"}:
                raise ValueError(f"{where}: a set written as a mapping must be {{not: [classes]}}, got {dict(target)}")
            inner = set(self._resolve(target["not"], where))
            return tuple(c for c in range(NUM_FINE_CLASSES) if c not in inner)
        if isinstance(target, Sequence) and not isinstance(target, str):
            return tuple(sorted({c for item in target for c in self._resolve(item, where)}))
        if isinstance(target, str) and target.strip().lower() in UNCERTAIN_NAMES:
            raise ValueError(f"{where}: 'uncertain' cannot be part of a set; map the value to uncertain on its own")
        try:
            return (class_index(target),)
        except ValueError as e:
            key = metric_name(str(target))
            if isinstance(target, str) and key in self.declared:
                return self.declared[key]
            if isinstance(target, str) and key in self.groups:
                return self.groups[key]
            known = ", ".join([*self.groups, *self.declared])
            raise ValueError(f"{where}: {e}; or a group/set name ({known}), or 'uncertain'") from None

    def label_sets(self) -> LabelSets:
        return LabelSets(tuple(self.names), tuple(self.members))


def _set_name(target: Any) -> str:
    """Metric-safe name of a set expression: ``[glia, extracellular space]`` -> ``glia_or_extracellular_space``."""
    if isinstance(target, Mapping):
        return "not_" + _set_name(target["not"])
    if isinstance(target, Sequence) and not isinstance(target, str):
        return "_or_".join(_set_name(t) for t in target)
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < NUM_FINE_CLASSES:
        return metric_name(FINE_CLASSES[target])
    return metric_name(str(target))


def histogram(label: np.ndarray) -> tuple[np.ndarray, int]:
    """Valid pixels per fine class (12 int64) and the uncertain pixel count of a mapped label."""
    flat = label.ravel()
    valid = flat[flat >= 0]
    hist = np.bincount(valid, minlength=NUM_FINE_CLASSES)[:NUM_FINE_CLASSES].astype(np.int64)
    return hist, int(flat.size - valid.size)


def set_histogram(label: np.ndarray, num_sets: int) -> np.ndarray:
    """Pixels per label set (``num_sets`` int64) of a mapped label; set pixels are never a fine class."""
    flat = label.ravel()
    ids = flat[flat >= SET_ID_OFFSET] - SET_ID_OFFSET
    if ids.size and int(ids.max()) >= num_sets:
        raise ValueError(f"label value {int(ids.max()) + SET_ID_OFFSET} is a set id beyond the {num_sets} label sets")
    return np.bincount(ids, minlength=num_sets).astype(np.int64)


def manifest_label_sets(manifest: Mapping[str, Any] | None, where: str) -> LabelSets | None:
    """The ``label_sets`` table recorded in a shard manifest (``None`` without a manifest)."""
    if manifest is None:
        return None
    return LabelSets.from_config(manifest.get("label_sets") or [], where=f"{where} label_sets")


def resolve_label_sets(
    spec_sets: Sequence[Any] | None, train_manifest: Mapping[str, Any] | None, val_manifest: Mapping[str, Any] | None
) -> LabelSets:
    """The label-set table training uses: from ``data.label_sets`` or else the training manifest.

    Set ids only mean something together with their table, so the train and val manifests must
    agree with each other and with the spec when both say something; a mismatch is an error rather
    than a silently mislabelled run.
    """
    train = manifest_label_sets(train_manifest, "training manifest")
    val = manifest_label_sets(val_manifest, "validation manifest")
    if train is not None and val is not None and train != val:
        raise ValueError(
            f"the training and validation manifests have different label_sets ({list(train.names)} vs "
            f"{list(val.names)}): set ids would mean different things; build both splits with one label map"
        )
    recorded = train if train is not None else val
    if spec_sets is None:
        return recorded or LabelSets()
    chosen = LabelSets.from_config(spec_sets, where="data.label_sets")
    if recorded is not None and len(recorded) and recorded != chosen:
        raise ValueError(
            f"data.label_sets {list(chosen.names)} differs from the shards' manifest label_sets "
            f"{list(recorded.names)}; remove data.label_sets (the manifest's table is used) or rebuild the shards"
        )
    return chosen
