"""ACR QCT and L1-HU screening categories at and around their boundaries."""
import math

import pytest

from bmd_d2.measure.categories import acr_category, acr_levels, hu_category


@pytest.mark.parametrize("bmd,cat", [(120.01, "normal"), (120.0, "osteopenia"), (100, "osteopenia"),
                                     (80.0, "osteopenia"), (79.99, "osteoporosis"), (0, "osteoporosis"),
                                     (250, "normal"), (None, None), (math.nan, None)])
def test_acr(bmd, cat):
    assert acr_category(bmd) == cat


@pytest.mark.parametrize("hu,cat", [(160.01, "normal_likely"), (160.0, "indeterminate"), (110.01, "indeterminate"),
                                    (110.0, "osteoporosis_likely"), (-5, "osteoporosis_likely"), (None, None),
                                    (math.inf, None)])
def test_hu(hu, cat):
    assert hu_category(hu) == cat


def test_acr_levels_prefers_l1_l2_then_the_first_two_usable_lumbar_levels():
    assert acr_levels({"T12", "L1", "L2", "L3"}) == ["L1", "L2"]
    assert acr_levels(["L2", "L4", "L1"]) == ["L1", "L2"]
    assert acr_levels({"L1", "L3", "L4"}) == ["L1", "L3"]
    assert acr_levels({"L2", "L4", "L5"}) == ["L2", "L4"]
    assert acr_levels({"L3", "L5", "T12"}) == []  # one usable lumbar level of L1-L4 only
    assert acr_levels({"L1": 100.0, "L3": 90.0}) == ["L1", "L3"]  # any collection of level names
