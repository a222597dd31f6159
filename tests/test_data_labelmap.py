"""Label maps: YAML parsing, vectorised mapping, and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest

from hierseg.data.labelmap import LabelMap, histogram


def test_default_map_is_identity_with_255_uncertain() -> None:
    lab = np.array([[0, 3, 11], [255, 6, 255]], np.uint8)
    out, unmapped = LabelMap.default().apply(lab, "x.png")
    assert out.dtype == np.int64 and unmapped == {}
    assert out.tolist() == [[0, 3, 11], [-1, 6, -1]]


def test_unmapped_value_names_file_value_and_count() -> None:
    lab = np.array([[0, 77, 77]], np.uint8)
    with pytest.raises(ValueError, match=r"labels/a\.png.*value 77 \(2 pixels\).*--unmapped uncertain"):
        LabelMap.default().apply(lab, "label labels/a.png")


def test_unmapped_uncertain_counts(tmp_path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("mapping:\n  191: mitochondria\n  159: extracellular_space\nunmapped: uncertain\n")
    out, unmapped = LabelMap.from_yaml(path).apply(np.array([191, 159, 5, 5, 7]), "v")
    assert out.tolist() == [10, 0, -1, -1, -1] and unmapped == {5: 2, 7: 1}


def test_unknown_class_in_yaml_is_named(tmp_path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("mapping:\n  1: mitochondrion\n")
    with pytest.raises(ValueError, match=r"m\.yaml, value 1: unknown fine class 'mitochondrion'.*mitochondria"):
        LabelMap.from_yaml(path)


def test_example_maps_load_and_record_sets_slot() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "label_maps"
    vnc = LabelMap.from_yaml(root / "vnc_sstem.yaml")
    out, _ = vnc.apply(np.array([0, 32, 64, 96, 128, 159, 191, 223, 255], np.uint8), "v")
    assert out.tolist() == [-1, -1, -1, -1, -1, 0, 10, -1, -1]
    assert LabelMap.from_yaml(root / "srf_tem.yaml").to_manifest()["sets"] == []
    axoplasm = LabelMap.from_yaml(root / "srf_tem_axoplasm.yaml")  # axon label 3 as drawn: mitochondria inside
    out, _ = axoplasm.apply(np.array([3, 6, 255], np.uint8), "v")
    (axon_or_mito,) = axoplasm.to_manifest()["sets"]
    assert out.tolist() == [axon_or_mito["id"], 6, -1] and axon_or_mito["classes"] == ["axon", "mitochondria"]


def test_histogram_excludes_uncertain() -> None:
    hist, unc = histogram(np.array([[-1, 0, 0], [11, -1, -1]]))
    assert hist.tolist() == [2] + [0] * 10 + [1] and unc == 3
