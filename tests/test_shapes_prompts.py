"""Shapes world: prompt specs, GenEval records, the train/test split, scene sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reflectionflow.shapes.world import (
    CATEGORIES,
    ObjectRequirement,
    PromptSpec,
    all_specs,
    check_scene,
    heldout_eval_set,
    is_heldout,
    sample_example,
    sample_scene,
    split_specs,
)


def test_prompts_use_geneval_phrasing():
    blue_triangle = ObjectRequirement("triangle", color="blue", position=("left of", 0))
    assert PromptSpec("position", (ObjectRequirement("circle", color="green"), blue_triangle)).prompt == (
        "a photo of a blue triangle left of a green circle"
    )
    assert (
        PromptSpec("counting", (ObjectRequirement("square", count=3),)).prompt == "a photo of three squares"
    )
    assert (
        PromptSpec("colors", (ObjectRequirement("circle", color="red"),)).prompt == "a photo of a red circle"
    )
    pair = (ObjectRequirement("square", color="red"), ObjectRequirement("circle", color="yellow"))
    assert PromptSpec("color_attr", pair).prompt == "a photo of a red square and a yellow circle"


def test_geneval_records_round_trip_through_json():
    for tag in CATEGORIES:
        for spec in all_specs(tag)[:20]:
            record = json.loads(json.dumps(spec.to_geneval()))
            assert record["tag"] == tag and record["prompt"] == spec.prompt
            assert PromptSpec.from_geneval(record) == spec
    counting = all_specs("counting")[0].to_geneval()
    assert counting["exclude"] == [
        {"class": counting["include"][0]["class"], "count": counting["include"][0]["count"] + 1}
    ]


def test_foreign_or_invalid_specs_fail_with_one_line():
    with pytest.raises(ValueError, match="not the shapes phrasing"):
        PromptSpec.from_geneval(
            {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}
        )
    with pytest.raises(ValueError, match="unknown shape"):
        PromptSpec("single_object", (ObjectRequirement("cow"),))
    with pytest.raises(ValueError, match="same object"):
        PromptSpec("two_object", (ObjectRequirement("circle"), ObjectRequirement("circle", color="red")))


def test_prompt_counts_per_category():
    counts = {tag: (len(split_specs(tag, "train")), len(split_specs(tag, "test"))) for tag in CATEGORIES}
    assert counts == {
        "single_object": (3, 3),
        "two_object": (6, 6),
        "counting": (9, 9),
        "colors": (14, 4),
        "position": (918, 306),
        "color_attr": (136, 44),
    }


def test_heldout_prompts_never_appear_in_training():
    for tag in ("colors", "position", "color_attr"):
        train = {spec.canonical_key for spec in split_specs(tag, "train")}
        test = {spec.canonical_key for spec in split_specs(tag, "test")}
        assert test and train and not train & test
        assert {spec.prompt for spec in split_specs(tag, "train")}.isdisjoint(
            spec.prompt for spec in split_specs(tag, "test")
        )
    # Word order does not leak a held-out prompt into training.
    reversed_order = PromptSpec("color_attr", tuple(reversed(split_specs("color_attr", "test")[0].include)))
    assert is_heldout(reversed_order)
    rng = np.random.default_rng(0)
    assert not any(is_heldout(sample_example(rng)[0]) for _ in range(500))


def test_heldout_eval_set_has_64_per_category_from_the_test_split():
    specs = heldout_eval_set(64, seed=0)
    assert [spec.tag for spec in specs] == [tag for tag in CATEGORIES for _ in range(64)]
    for spec in specs:
        assert spec in split_specs(spec.tag, "test")
    assert len({spec.prompt for spec in specs if spec.tag == "position"}) == 64  # distinct where possible
    assert heldout_eval_set(64, seed=0) == specs


def test_sampled_scenes_satisfy_their_prompt_exactly():
    rng = np.random.default_rng(1)
    for tag in CATEGORIES:
        for spec in all_specs(tag)[:: max(1, len(all_specs(tag)) // 40)]:
            scene = sample_scene(spec, rng)
            assert check_scene(scene, spec).correct, spec.prompt
            cells = [obj.cell for obj in scene.objects]
            assert len(set(cells)) == len(cells)


def test_sampling_is_seeded():
    a = [sample_example(np.random.default_rng(7)) for _ in range(3)]
    b = [sample_example(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
