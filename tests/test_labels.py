import pytest
import torch

from hierseg.labels import FINE_CLASSES, IGNORE_INDEX, Hierarchy, class_index
from tests.plan_reference import PLAN_LUT


def test_fine_classes_follow_the_plan_order():
    """Classes 0..11 are the plan's names in the plan's order; uncertain is -1, not a class."""
    assert IGNORE_INDEX == -1
    assert len(FINE_CLASSES) == 12
    assert FINE_CLASSES[0] == "extracellular space" and FINE_CLASSES[4] == "soma" and FINE_CLASSES[11] == "fat globule"
    assert "uncertain" not in FINE_CLASSES


def test_default_lut_is_the_plans_table():
    """Hierarchy.default().lut() is the plan's [12, 5] float table."""
    lut = Hierarchy.default().lut()
    assert lut.dtype == torch.float32 and lut.shape == (12, 5)
    assert torch.equal(lut, PLAN_LUT)
    assert Hierarchy.default().level().group_names == (
        "neuron_part",
        "glia",
        "myelin_related",
        "organelle",
        "non_tissue",
    )


def test_multi_level_hierarchy_and_round_trip():
    """A second level splits myelin_related; to_config/from_config round-trips."""
    cfg = Hierarchy.default().to_config()
    cfg["levels"].append(
        {
            "name": "myelin_split",
            "groups": {
                "myelin": ["myelin"],
                "tongues": ["myelin_inner_tongue", "Myelin Outer Tongue"],
                "other": [c for c in FINE_CLASSES if not c.startswith("myelin")],
            },
        }
    )
    h = Hierarchy.from_config(cfg)
    assert h.num_groups == [5, 3]
    lut = h.lut("myelin_split")
    assert lut[7].tolist() == [0, 1, 0] and lut[6].tolist() == [1, 0, 0] and lut.sum() == 12
    assert Hierarchy.from_config(h.to_config()) == h


@pytest.mark.parametrize(
    "groups, culprit",
    [
        ({"a": ["axon", "dendrit"]}, "dendrit"),
        ({"a": list(FINE_CLASSES), "b": []}, "'b' is empty"),
        ({"a": [c for c in FINE_CLASSES if c != "glia"]}, "glia"),
    ],
)
def test_bad_hierarchy_names_the_culprit(groups, culprit):
    """Unknown class, empty group, uncovered class: ValueError naming it."""
    with pytest.raises(ValueError, match=culprit):
        Hierarchy.from_config({"levels": [{"name": "x", "groups": groups}]})


def test_duplicate_group_and_level_names_are_rejected():
    """Duplicate group names (list form) and duplicate level names raise ValueError naming them."""
    groups = [{"name": "g", "classes": list(FINE_CLASSES[:6])}, {"name": "g", "classes": list(FINE_CLASSES[6:])}]
    with pytest.raises(ValueError, match="'g' appears twice"):
        Hierarchy.from_config({"levels": [{"name": "x", "groups": groups}]})
    level = Hierarchy.default().to_config()["levels"][0]
    with pytest.raises(ValueError, match="'coarse' is used twice"):
        Hierarchy.from_config({"levels": [level, level]})


def test_class_index_suggests_close_match():
    """A misspelt class name is answered with the nearest real one."""
    assert class_index("Myelin_Inner-Tongue") == 7
    with pytest.raises(ValueError, match="did you mean 'mitochondria'"):
        class_index("mitochondira")
