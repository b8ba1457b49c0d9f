"""Subset warm-up schedule: weights at the stages, in between, after the last stage; bad configs."""

import pytest

from reflectionflow.data.schedule import SubsetSchedule

PAPER = {"general": [0.1, 0.3], "length": [0.1, 0.3], "rule": [0.1, 0.4], "editing": [0.7, 0.0]}


def test_weights_at_start_mid_warmup_and_after_last_stage():
    schedule = SubsetSchedule(PAPER, [0, 5000])
    assert schedule.weights(0) == pytest.approx({"general": 0.1, "length": 0.1, "rule": 0.1, "editing": 0.7})
    assert schedule.weights(2500) == pytest.approx(
        {"general": 0.2, "length": 0.2, "rule": 0.25, "editing": 0.35}
    )
    after = {"general": 0.3, "length": 0.3, "rule": 0.4, "editing": 0.0}
    assert schedule.weights(5000) == pytest.approx(after)
    assert schedule.weights(10**6) == pytest.approx(after)


def test_weights_are_normalised_and_follow_three_stages():
    schedule = SubsetSchedule({"a": [1, 1, 0], "b": [0, 1, 3]}, [0, 10, 30])
    assert schedule.weights(5) == pytest.approx({"a": 1 / 1.5, "b": 0.5 / 1.5})
    assert schedule.weights(20) == pytest.approx({"a": 0.5 / 2.5, "b": 2 / 2.5})
    assert schedule.weights(30) == pytest.approx({"a": 0.0, "b": 1.0})


def test_excluded_subsets_get_no_weight_and_the_rest_is_renormalised():
    schedule = SubsetSchedule(PAPER, [0, 5000])
    weights = schedule.weights(0, exclude={"editing"})
    assert weights["editing"] == 0
    assert weights["general"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no subset"):
        schedule.weights(5000, exclude={"general", "length", "rule"})


@pytest.mark.parametrize(
    ("ratios", "stages", "match"),
    [
        ({"a": [1.0]}, [0, 10], "has 1 values"),
        ({"a": [1.0, 1.0]}, [10, 5], "increasing"),
        ({"a": [1.0, -1.0]}, [0, 5], "negative"),
        ({"a": [0.0, 1.0]}, [0, 5], "positive weight"),
        ({}, [0], "at least one"),
    ],
)
def test_invalid_schedules_fail_with_the_config_key(ratios, stages, match):
    with pytest.raises(ValueError, match=match):
        SubsetSchedule(ratios, stages)
