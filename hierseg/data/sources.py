"""Several data sets in one run: per-source manifests, one merged label-set table, per-source remapping.

Each source's shards were built with its own label map, so its stored set ids (``12 + i``) index its
own ``label_sets`` table: id 12 is "not mitochondria" in a binary mito set and "glia or extracellular
space" in vnc_sstem. Training needs one table, so the sources' tables are merged (a set with the same
members in two sources is one set) and every source's labels go through a small int lookup table
when its samples are decoded. Fine classes (0..11) and uncertain (-1) never change.

One plain ``data.train: <shards>`` string is the single source ``default`` and takes the path it
always took (:func:`hierseg.data.labelmap.resolve_label_sets`, no remapping).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hierseg.data.labelmap import manifest_label_sets, resolve_label_sets
from hierseg.labels import FINE_CLASSES, NUM_FINE_CLASSES, SET_ID_OFFSET, LabelSets, LabelSpace, LabelValue
from hierseg.spec import DataSpec


@dataclass(frozen=True)
class Source:
    """One data set of a run: its shards, weight, manifests and how its stored labels become merged ones."""

    name: str
    weight: float
    train: str
    val: str | None
    train_manifest: Mapping[str, Any] | None
    val_manifest: Mapping[str, Any] | None
    sets: LabelSets
    """The source's own set table (what its stored ids ``12 + i`` mean)."""
    remap: np.ndarray | None = None
    """int64 ``[1 + 12 + len(sets)]``: ``remap[stored + 1]`` is the merged label; ``None``: identity."""

    @property
    def num_labels(self) -> int:
        """Stored labels lie in ``-1 .. num_labels - 1`` (checked before remapping, so errors use stored ids)."""
        return NUM_FINE_CLASSES + len(self.sets)

    def labelled_classes(self) -> tuple[int, ...]:
        """The fine classes the source's training labels contain, alone or inside a label set (the manifest's
        histograms); every class when the manifest has none."""
        manifest = self.train_manifest or {}
        if "class_histogram" not in manifest:
            return tuple(range(NUM_FINE_CLASSES))
        named = {c for c, n in enumerate(manifest["class_histogram"]) if n}
        for members, n in zip(self.sets.members, manifest.get("set_histogram", []), strict=False):
            named.update(members if n else ())
        return tuple(sorted(named))

    def label_space(self) -> LabelSpace | None:
        """The source's validation label space with merged stored ids (``val/<source>/label/...``)."""
        record = (self.val_manifest or {}).get("label_map")
        if not record:
            return None
        space = LabelSpace.from_label_map(record, self.sets)
        if self.remap is None:
            return space
        return LabelSpace(tuple(_remapped(v, self.remap) for v in space.values))


def _remapped(value: LabelValue, remap: np.ndarray) -> LabelValue:
    return LabelValue(value.name, int(remap[value.stored_id + 1]), value.members, value.code)


@dataclass(frozen=True)
class DataSources:
    """Every source of a run and the merged set table the model and the loss use."""

    sources: tuple[Source, ...]
    label_sets: LabelSets
    multi: bool

    @property
    def val_sources(self) -> tuple[Source, ...]:
        return tuple(s for s in self.sources if s.val is not None)

    @property
    def label_map(self) -> Mapping[str, Any] | None:
        """The training label map prediction decodes into: the one source's, or the one all sources share.

        Sources with different maps have no single label space, so the model then decodes fine classes.
        """
        maps = [(s.train_manifest or {}).get("label_map") for s in self.sources]
        return maps[0] if all(m == maps[0] for m in maps) else None

    def label_space(self) -> LabelSpace | None:
        """The together label space: every source's values by merged id (the first name of an id wins)."""
        if not self.multi:
            return self.sources[0].label_space()
        by_id: dict[int, LabelValue] = {}
        for src in self.val_sources:
            for v in (src.label_space() or LabelSpace(())).values:
                by_id.setdefault(v.stored_id, v)
        return LabelSpace(tuple(by_id[k] for k in sorted(by_id))) if by_id else None

    def training_record(self) -> dict[str, Any]:
        """What checkpoints take from "the training manifest": label map, merged sets, intensity record."""
        if not self.multi:
            return dict(self.sources[0].train_manifest or {})
        first = self.sources[0].train_manifest or {}
        record = {"label_map": self.label_map, "label_sets": self.label_sets.to_config()}
        return record | ({"intensity": first["intensity"]} if "intensity" in first else {})

    def normalization(self, spec: Any) -> dict[str, Any]:
        """The run's one normalisation; sources whose intensity records resolve differently are an error."""
        from hierseg.data import normalize

        resolved = [normalize.resolve(spec, (s.train_manifest or {}).get("intensity")) for s in self.sources]
        for src, norm in zip(self.sources, resolved, strict=True):
            if norm != resolved[0]:
                raise ValueError(
                    f"data source {src.name!r}: data.normalization resolves to {norm} but source "
                    f"{self.sources[0].name!r} gives {resolved[0]}; one normalisation serves every source "
                    "(use mode zscore, or a fixed range)"
                )
        return resolved[0]


def resolve_sources(data: DataSpec) -> DataSources:
    """Read every source's manifests, check them, merge the set tables and build the remapping tables."""
    from hierseg.data.loader import read_manifest

    spec_sets = None if data.label_sets is None else [s.model_dump() for s in data.label_sets]
    val_of = {s.name: s.shards for s in data.sources("val")}
    if not data.multi_source:
        (src,) = data.sources("train")
        train_m, val_m = read_manifest(src.shards), read_manifest(val_of[src.name])
        sets = resolve_label_sets(spec_sets, train_m, val_m)
        one = Source(src.name, src.weight, src.shards, val_of[src.name], train_m, val_m, sets)
        return DataSources((one,), sets, multi=False)
    raw = []
    for spec in data.sources("train"):
        val = val_of.get(spec.name)
        train_m, val_m = read_manifest(spec.shards), read_manifest(val) if val is not None else None
        raw.append(
            Source(spec.name, spec.weight, spec.shards, val, train_m, val_m, _source_sets(spec.name, train_m, val_m))
        )
    chosen = None if spec_sets is None else LabelSets.from_config(spec_sets, where="data.label_sets")
    merged = merge_label_sets([(s.name, s.sets) for s in raw], chosen)
    sources = tuple(_with_remap(s, merged) for s in raw)
    return DataSources(sources, merged, multi=True)


def _source_sets(name: str, train_m: Mapping[str, Any] | None, val_m: Mapping[str, Any] | None) -> LabelSets:
    """A source's own set table; its splits must agree, and each split must hold some valid pixel."""
    where = f"data source {name!r}"
    train = manifest_label_sets(train_m, f"{where} training manifest")
    val = manifest_label_sets(val_m, f"{where} validation manifest")
    if train is not None and val is not None and train != val:
        raise ValueError(
            f"{where}: its training and validation manifests have different label_sets ({list(train.names)} vs "
            f"{list(val.names)}); build both splits of a source with one label map"
        )
    sets = train if train is not None else (val or LabelSets())
    for split, manifest in (("training", train_m), ("validation", val_m)):
        if manifest is not None:
            _check_histograms(f"{where} {split} manifest", manifest, sets)
    return sets


def _check_histograms(where: str, manifest: Mapping[str, Any], sets: LabelSets) -> None:
    classes = [int(v) for v in manifest.get("class_histogram", [])]
    set_counts = [int(v) for v in manifest.get("set_histogram", [0] * len(sets))]
    if classes and len(classes) != NUM_FINE_CLASSES:
        raise ValueError(f"{where}: class_histogram has {len(classes)} entries, not {NUM_FINE_CLASSES}; rebuild it")
    if len(set_counts) != len(sets):
        raise ValueError(
            f"{where}: set_histogram has {len(set_counts)} entries for {len(sets)} label_sets, so the stored set ids "
            "do not match the set table; rebuild the shards"
        )
    if "class_histogram" in manifest and sum(classes) + sum(set_counts) == 0:
        raise ValueError(
            f"{where}: no valid pixel (class_histogram and set_histogram are all zero, every pixel is uncertain): "
            "check the source's label map, or leave the source out"
        )


def merge_label_sets(tables: Sequence[tuple[str, LabelSets]], chosen: LabelSets | None = None) -> LabelSets:
    """One table: ``chosen`` (``data.label_sets``) or the union of the sources' tables in source order.

    A set with the same members in two sources is one set (the first name is kept); two different
    sets under one name would log ``val/set_accuracy/<name>`` for both, so that is an error.
    """
    names = list(chosen.names) if chosen is not None else []
    members = list(chosen.members) if chosen is not None else []
    owner = {n: "data.label_sets" for n in names}
    for source, sets in tables:
        for name, m in zip(sets.names, sets.members, strict=True):
            if m in members:
                continue
            classes = [FINE_CLASSES[c] for c in m]
            if chosen is not None:
                raise ValueError(
                    f"data source {source!r}: its manifest's label set {name!r} {classes} is not in data.label_sets "
                    f"({list(chosen.names)}); add it there, or remove data.label_sets to merge the sources' tables"
                )
            if name in names:
                other = [FINE_CLASSES[c] for c in members[names.index(name)]]
                raise ValueError(
                    f"data source {source!r}: its manifest's label set {name!r} is {classes} but {owner[name]} "
                    f"names {other} so; one name must mean one set: rebuild one source with another set name"
                )
            names.append(name)
            members.append(m)
            owner[name] = f"data source {source!r}"
    return LabelSets(tuple(names), tuple(members))


def _with_remap(src: Source, merged: LabelSets) -> Source:
    remap = np.arange(-1, src.num_labels, dtype=np.int64)  # identity on uncertain and fine classes
    for i, m in enumerate(src.sets.members):
        remap[1 + SET_ID_OFFSET + i] = SET_ID_OFFSET + merged.members.index(m)
    return Source(**{**src.__dict__, "remap": remap})
