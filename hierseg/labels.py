"""Label taxonomy: the 12 fine classes, the uncertain value, and coarse hierarchies over them.

The fine label of a pixel is an integer in ``0..11`` (index into :data:`FINE_CLASSES`) or
:data:`IGNORE_INDEX` (-1) for pixels human tracers marked *uncertain*. Uncertain is never a class:
it contributes nothing to any loss, metric or statistic.

A :class:`Hierarchy` is data: one or more *levels*, each a set of named groups of fine classes.
Every level becomes one sigmoid head whose targets are looked up from the fine label through a
``[12, K]`` table (:meth:`Hierarchy.lut`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -1

FINE_CLASSES: tuple[str, ...] = (
    "extracellular space",
    "tear",
    "dendrite",
    "axon",
    "soma",
    "glia",
    "myelin",
    "myelin inner tongue",
    "myelin outer tongue",
    "nucleus",
    "mitochondria",
    "fat globule",
)
NUM_FINE_CLASSES = len(FINE_CLASSES)

# The plan's coarse head: 5 sigmoid groups.
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {
    "neuron_part": ("dendrite", "axon", "soma"),
    "glia": ("glia",),
    "myelin_related": ("myelin", "myelin inner tongue", "myelin outer tongue"),
    "organelle": ("nucleus", "mitochondria", "fat globule"),
    "non_tissue": ("extracellular space", "tear"),
}


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


_CLASS_INDEX = {_norm(n): i for i, n in enumerate(FINE_CLASSES)}


def class_index(name: str | int) -> int:
    """Index of a fine class given its name (case, ``_``/``-``/space insensitive) or index."""
    if isinstance(name, bool):
        raise ValueError(f"fine class must be a name or an index 0..11, got {name!r}")
    if isinstance(name, int):
        if not 0 <= name < NUM_FINE_CLASSES:
            raise ValueError(f"fine class index {name} is outside 0..{NUM_FINE_CLASSES - 1}")
        return name
    key = _norm(str(name))
    if key not in _CLASS_INDEX:
        close = closest(key, list(_CLASS_INDEX))
        hint = f" (did you mean {FINE_CLASSES[_CLASS_INDEX[close]]!r}?)" if close else ""
        raise ValueError(f"unknown fine class {name!r}{hint}; known classes: {', '.join(FINE_CLASSES)}")
    return _CLASS_INDEX[key]


def closest(word: str, known: Sequence[str]) -> str | None:
    """The known name ``word`` most likely misspells, or None: the "did you mean" of every error message."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return close[0] if close else None


def first_duplicate(names: Sequence[str]) -> str | None:
    """The alphabetically first name that occurs twice (errors name one culprit, deterministically)."""
    dup = sorted({n for n in names if names.count(n) > 1})
    return dup[0] if dup else None


def metric_name(name: str) -> str:
    """A class or group name as used in metric keys (``myelin inner tongue`` -> ``myelin_inner_tongue``)."""
    return _norm(name).replace(" ", "_")


@dataclass(frozen=True)
class Level:
    """One coarse level: named groups, each a tuple of fine class indices."""

    name: str
    group_names: tuple[str, ...]
    group_members: tuple[tuple[int, ...], ...]

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def lut(self) -> torch.Tensor:
        """``[12, K]`` float table: ``lut[c, k] = 1`` when fine class ``c`` is in group ``k``."""
        table = torch.zeros(NUM_FINE_CLASSES, self.num_groups, dtype=torch.float32)
        for k, members in enumerate(self.group_members):
            table[list(members), k] = 1.0
        return table


class Hierarchy:
    """Levels of named groups over the fine classes; each level drives one sigmoid head."""

    def __init__(self, levels: Sequence[Level]):
        if not levels:
            raise ValueError("hierarchy.levels is empty: give at least one level of groups")
        dup = first_duplicate([lv.name for lv in levels])
        if dup is not None:
            raise ValueError(f"hierarchy level name {dup!r} is used twice; level names must be unique")
        self.levels: tuple[Level, ...] = tuple(levels)

    @classmethod
    def default(cls) -> Hierarchy:
        """The plan's single coarse level of 5 groups."""
        return cls.from_config({"levels": [{"name": "coarse", "groups": DEFAULT_GROUPS}]})

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Sequence[Any]) -> Hierarchy:
        """Build from ``{"levels": [{"name": ..., "groups": {group: [class, ...]}}, ...]}``.

        ``groups`` may also be a list of ``{"name": ..., "classes": [...]}`` (which lets duplicate
        group names be caught). A bare list of levels is accepted too.
        """
        raw_levels = config.get("levels") if isinstance(config, Mapping) else config
        if not isinstance(raw_levels, Sequence) or isinstance(raw_levels, str):
            raise ValueError("hierarchy.levels must be a list of {name, groups} mappings")
        return cls([_parse_level(i, raw) for i, raw in enumerate(raw_levels)])

    def to_config(self) -> dict[str, Any]:
        """Plain-data form that :meth:`from_config` reads back (stored in checkpoints and models)."""
        return {
            "levels": [
                {
                    "name": lv.name,
                    "groups": {
                        g: [FINE_CLASSES[c] for c in members]
                        for g, members in zip(lv.group_names, lv.group_members, strict=True)
                    },
                }
                for lv in self.levels
            ]
        }

    def level(self, level: int | str | None = None) -> Level:
        """A level by index or name; ``None`` is the first (the plan's coarse head)."""
        if level is None:
            return self.levels[0]
        if isinstance(level, int):
            return self.levels[level]
        for lv in self.levels:
            if lv.name == level:
                return lv
        raise ValueError(f"unknown hierarchy level {level!r}; levels: {[lv.name for lv in self.levels]}")

    def lut(self, level: int | str | None = None) -> torch.Tensor:
        """``[12, K]`` float lookup table of one level (the plan's ``coarse_lut`` for the default)."""
        return self.level(level).lut()

    def luts(self) -> list[torch.Tensor]:
        return [lv.lut() for lv in self.levels]

    @property
    def num_groups(self) -> list[int]:
        return [lv.num_groups for lv in self.levels]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hierarchy) and self.levels == other.levels

    def __repr__(self) -> str:
        return f"Hierarchy({self.to_config()!r})"


def _parse_level(i: int, raw: Any) -> Level:
    where = f"hierarchy.levels[{i}]"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping with 'name' and 'groups'")
    unknown = set(raw) - {"name", "groups"}
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: name, groups")
    name = raw.get("name", f"level{i}")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.name must be a non-empty string")
    where = f"hierarchy level {name!r}"
    groups = raw.get("groups")
    pairs = _group_pairs(where, groups)
    if not pairs:
        raise ValueError(f"{where} has no groups")
    seen: set[str] = set()
    names, members = [], []
    for gname, classes in pairs:
        if gname in seen:
            raise ValueError(f"{where}: group name {gname!r} appears twice; group names must be unique")
        seen.add(gname)
        if isinstance(classes, (str, int)):
            classes = [classes]
        if not classes:
            raise ValueError(f"{where}: group {gname!r} is empty; list at least one fine class")
        idx = []
        for c in classes:
            try:
                idx.append(class_index(c))
            except ValueError as e:
                raise ValueError(f"{where}, group {gname!r}: {e}") from None
        names.append(gname)
        members.append(tuple(sorted(set(idx))))
    covered = {c for m in members for c in m}
    missing = [FINE_CLASSES[c] for c in range(NUM_FINE_CLASSES) if c not in covered]
    if missing:
        raise ValueError(
            f"{where}: fine class(es) {missing} are in no group; every fine class must belong to "
            "at least one group of each level (add them to a group, or to a catch-all group)"
        )
    return Level(name=name, group_names=tuple(names), group_members=tuple(members))


def _group_pairs(where: str, groups: Any) -> list[tuple[str, Any]]:
    if isinstance(groups, Mapping):
        return [(str(k), v) for k, v in groups.items()]
    if isinstance(groups, Sequence) and not isinstance(groups, str):
        pairs = []
        for j, g in enumerate(groups):
            if not isinstance(g, Mapping) or "name" not in g or "classes" not in g:
                raise ValueError(f"{where}.groups[{j}] must be a mapping with 'name' and 'classes'")
            pairs.append((str(g["name"]), g["classes"]))
        return pairs
    raise ValueError(f"{where}.groups must be a mapping of group name -> list of fine classes")


# ------------------------------------------------------------------------------------------ label sets
SET_ID_OFFSET = NUM_FINE_CLASSES
"""Stored label ``SET_ID_OFFSET + i`` means "one of the fine classes of label set ``i``" (partial labels)."""


@dataclass(frozen=True)
class LabelSets:
    """Table of partial labels: set ``i`` (stored label ``12 + i``) is a named set of fine classes.

    Many EM label sources name a group rather than a class ("glia or extracellular space",
    "neurite, type unknown", "anything but mitochondria"). Such pixels keep that information
    instead of becoming uncertain: the loss puts probability mass on the set, and the coarse heads
    learn every group the set decides. The table travels from the label map into the shard
    manifests and from there into training (``label_sets`` in the manifest and the spec).
    """

    names: tuple[str, ...] = ()
    members: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.names) != len(self.members):
            raise ValueError("label sets: one name per set of fine classes")
        dup = first_duplicate(self.names)
        if dup is not None:
            raise ValueError(f"label set name {dup!r} is used twice; label set names must be unique")
        for name, members in zip(self.names, self.members, strict=True):
            check_set_members(name, members)

    def __len__(self) -> int:
        return len(self.names)

    def table(self) -> torch.Tensor:
        """``[S, 12]`` bool: ``table[i, c]`` when fine class ``c`` is in set ``i`` (the loss's ``label_sets``)."""
        table = torch.zeros(len(self), NUM_FINE_CLASSES, dtype=torch.bool)
        for i, members in enumerate(self.members):
            table[i, list(members)] = True
        return table

    def to_config(self) -> list[dict[str, Any]]:
        """Plain data for manifests and specs: ``[{id, name, classes}]`` with ids ``12, 13, ...``."""
        return [
            {"id": SET_ID_OFFSET + i, "name": n, "classes": [FINE_CLASSES[c] for c in m]}
            for i, (n, m) in enumerate(zip(self.names, self.members, strict=True))
        ]

    @classmethod
    def from_config(cls, raw: Sequence[Any] | None, where: str = "label_sets") -> LabelSets:
        """Read ``[{name, classes[, id]}]`` (the form :meth:`to_config` writes); errors name ``where``."""
        if raw is None:
            return cls()
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            raise ValueError(f"{where} must be a list of {{name, classes}} mappings")
        names, members = [], []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping) or "name" not in item or "classes" not in item:
                raise ValueError(f"{where}[{i}] must be a mapping with 'name' and 'classes'")
            if item.get("id") is not None and item["id"] != SET_ID_OFFSET + i:
                raise ValueError(
                    f"{where}[{i}] has id {item['id']!r} but sets are numbered from {SET_ID_OFFSET} in order: "
                    f"expected {SET_ID_OFFSET + i}"
                )
            classes = item["classes"]
            if isinstance(classes, (str, int)):
                classes = [classes]
            try:
                idx = tuple(sorted({class_index(c) for c in classes}))
            except ValueError as e:
                raise ValueError(f"{where}[{i}] ({item['name']!r}): {e}") from None
            names.append(str(item["name"]))
            members.append(idx)
        return cls(tuple(names), tuple(members))


def check_set_members(name: str, members: Sequence[int]) -> None:
    """Reject sets that carry no information: empty, or all 12 classes (that is ``uncertain``)."""
    if not members:
        raise ValueError(f"label set {name!r} is empty; list at least one fine class (or map the value to uncertain)")
    if len(set(members)) == NUM_FINE_CLASSES:
        raise ValueError(
            f"label set {name!r} contains all {NUM_FINE_CLASSES} fine classes, which says nothing: "
            "that is 'uncertain'; map the value to uncertain instead"
        )


def set_coarse_targets(label_sets: torch.Tensor, lut_CK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per set and group: ``(target [S, K], known [S, K])``: inside -> 1, disjoint -> 0, straddling -> unknown."""
    members_SC1 = label_sets.to(device=lut_CK.device, dtype=torch.bool).unsqueeze(2)
    in_group_1CK = (lut_CK > 0).unsqueeze(0)
    inside = ~(members_SC1 & ~in_group_1CK).any(1)  # no member outside group k
    disjoint = ~(members_SC1 & in_group_1CK).any(1)  # no member inside group k
    return inside, inside | disjoint


# ----------------------------------------------------------------------------------------- label space
@dataclass(frozen=True)
class LabelValue:
    """One thing a label map can say about a pixel: a fine class or a label set, with its source values."""

    name: str
    """The label map's name of the target, as the manifest records it (``mitochondria``, ``not_mitochondria``)."""
    stored_id: int
    """Label as stored in shards: fine class ``0..11`` or set id ``12 + i``."""
    members: tuple[int, ...]
    """Fine classes the value allows (one for a fine class)."""
    code: int
    """Smallest source label value that maps to it: what ``label_values`` writes."""


@dataclass(frozen=True)
class LabelSpace:
    """The label space of a data set: every distinct non-uncertain target of its label map.

    Scoring and decoding "in the label space" means asking the question the annotation answers:
    for a binary mitochondria mask, mitochondrion vs anything else, never a 12-way argmax.
    """

    values: tuple[LabelValue, ...]

    @classmethod
    def from_label_map(cls, record: Mapping[str, Any] | None, sets: LabelSets) -> LabelSpace:
        """From a manifest's ``label_map`` record (``{"mapping": {source: target name}}``) and its set table."""
        mapping = (record or {}).get("mapping") or {}
        by_id: dict[int, tuple[str, int]] = {}
        set_ids = {metric_name(n): SET_ID_OFFSET + i for i, n in enumerate(sets.names)}
        for source, target in mapping.items():
            if target == "uncertain":
                continue
            key = metric_name(str(target))
            stored = set_ids.get(key)
            if stored is None:
                stored = class_index(str(target))
            code = int(source)
            name = str(target)
            by_id[stored] = (name, min(code, by_id[stored][1]) if stored in by_id else code)
        values = []
        for stored in sorted(by_id):
            members = (stored,) if stored < SET_ID_OFFSET else sets.members[stored - SET_ID_OFFSET]
            values.append(LabelValue(by_id[stored][0], stored, tuple(members), by_id[stored][1]))
        return cls(tuple(values))

    def __len__(self) -> int:
        return len(self.values)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.values)

    def members_table(self) -> torch.Tensor:
        """``[V, 12]`` bool: ``table[v, c]`` when value ``v`` allows fine class ``c``."""
        table = torch.zeros(len(self.values), NUM_FINE_CLASSES, dtype=torch.bool)
        for i, v in enumerate(self.values):
            table[i, list(v.members)] = True
        return table
