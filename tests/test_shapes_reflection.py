"""Shapes world: flawed scenes, the rule-based reflector and the scene editor that carries it out."""

from __future__ import annotations

import numpy as np
import pytest

from reflectionflow.shapes.world import (
    CATEGORIES,
    EXPECTED_PROBLEMS,
    FLAWS,
    ObjectRequirement,
    PromptSpec,
    Scene,
    ShapeObject,
    applicable_flaws,
    apply_reflection,
    check_image,
    check_scene,
    make_flawed,
    parse_reflection,
    reflect,
    reflection_text,
    render_scene,
    sample_example,
    split_specs,
)
from reflectionflow.shapes.world.edits import Add, Change, Move, ObjectRef, Remove
from reflectionflow.shapes.world.sampling import sample_scene


def _cases(per_flaw: int, seed: int):
    """(spec, correct scene, flawed scene, flaw) for every category and each flaw it invites."""
    rng = np.random.default_rng(seed)
    for tag in CATEGORIES:
        specs = split_specs(tag, "train")
        for flaw in FLAWS[tag]:
            made = 0
            while made < per_flaw:
                spec = specs[int(rng.integers(len(specs)))]
                if flaw in applicable_flaws(spec):
                    scene = sample_scene(spec, rng)
                    yield spec, scene, *make_flawed(spec, scene, rng, flaw)
                    made += 1


def test_flawed_scenes_fail_the_checker_with_the_expected_problem():
    for spec, _, flawed, flaw in _cases(per_flaw=25, seed=0):
        result = check_image(render_scene(flawed), spec)
        kinds = {p.kind for p in result.problems}
        assert kinds and kinds <= EXPECTED_PROBLEMS[flaw], (spec.prompt, flaw, result.messages())
        assert result.score < 1.0


@pytest.mark.parametrize("use_rng", [False, True])
def test_reflection_applied_by_the_editor_makes_the_render_pass(use_rng):
    rng = np.random.default_rng(1) if use_rng else None
    for spec, _, flawed, flaw in _cases(per_flaw=12, seed=2 + use_rng):
        result = check_image(render_scene(flawed), spec)
        reflection = reflect(result, rng)
        assert reflection.count(".") == len(parse_reflection(reflection)) >= 1
        fixed = check_image(render_scene(apply_reflection(result.scene, reflection)), spec)
        assert fixed.correct, (spec.prompt, flaw, reflection, fixed.messages())


def test_reflector_handles_random_multi_error_scenes():
    """Scenes of one prompt drawn for another: several errors at once, still fixed in one reflection."""
    rng = np.random.default_rng(4)
    for _ in range(150):
        spec, _ = sample_example(rng)
        _, other = sample_example(rng)
        result = check_image(render_scene(other), spec)
        fixed = apply_reflection(result.scene, reflect(result, rng))
        assert check_image(render_scene(fixed), spec).correct, (spec.prompt, reflect(result))


def test_correct_images_get_an_empty_reflection():
    spec, scene = sample_example(np.random.default_rng(5))
    assert reflect(check_image(render_scene(scene), spec)) == ""


def test_reflections_read_like_genref():
    spec = PromptSpec("counting", (ObjectRequirement("triangle", count=2),))
    objects = tuple(ShapeObject("triangle", "red", (c + 0.5) / 3, 0.5, 0.24) for c in range(3))
    assert reflect(check_scene(Scene(objects), spec)) == "Remove one triangle."
    spec = PromptSpec("colors", (ObjectRequirement("circle", color="red"),))
    assert reflect(check_scene(Scene((ShapeObject("circle", "green", 0.5, 0.5, 0.24),)), spec)) == (
        "Change the green circle to red."
    )
    assert reflect(check_scene(Scene(), spec)) == "Add one red circle in the center."


def test_edit_sentences_round_trip():
    edits = [
        Remove(ObjectRef("circle", "red", (1, 0))),
        Remove(ObjectRef("triangle", any_one=True)),
        Remove(ObjectRef(None, "blue")),
        Change(ObjectRef("circle", "green"), color="red"),
        Change(ObjectRef("square", "red", (2, 2)), shape="circle"),
        Change(ObjectRef("square"), shape="triangle", color="yellow"),
        Add("square", "blue", cell=(1, 2)),
        Add("square", cell=(0, 0)),
        Add("triangle", "blue", relation="left of", anchor=ObjectRef("circle", "green")),
        Move(ObjectRef("circle", "red", (0, 1)), "above", ObjectRef("square", "blue", (2, 1))),
    ]
    text = reflection_text(edits)
    assert "Remove the red circle on the left. Remove one triangle. Remove the blue shape." in text
    assert "Add one blue triangle to the left of the green circle." in text
    assert parse_reflection(text) == edits


def test_unparseable_reflection_is_an_error():
    with pytest.raises(ValueError, match="cannot parse"):
        parse_reflection("Make the circle bigger.")


def test_move_makes_room_when_the_anchor_is_at_the_edge():
    spec = PromptSpec(
        "position",
        (
            ObjectRequirement("square", color="blue"),
            ObjectRequirement("circle", color="red", position=("left of", 0)),
        ),
    )
    scene = Scene(
        (ShapeObject("square", "blue", 1 / 6, 0.5, 0.24), ShapeObject("circle", "red", 5 / 6, 0.5, 0.24))
    )
    result = check_scene(scene, spec)
    assert reflect(result) == "Move the red circle to the left of the blue square."
    assert check_scene(apply_reflection(scene, reflect(result)), spec).correct


def test_an_extra_indistinguishable_from_a_kept_object_is_removed_in_its_place():
    """Two unrecognised red blobs in one cell: one stands for a square, the other is extra. 'Remove the red
    shape at the top' can only name the first; the reflection must still remove one and reshape the other."""
    spec = PromptSpec("counting", (ObjectRequirement("square", count=4),))
    squares = [ShapeObject("square", "red", x, y, 0.24) for x, y in ((1 / 6, 0.5), (0.5, 0.5), (5 / 6, 0.5))]
    blobs = [ShapeObject(None, "red", 0.45, 1 / 6, 0.2), ShapeObject(None, "red", 0.55, 1 / 6, 0.2)]
    scene = Scene((*blobs[:1], *squares, *blobs[1:]))
    result = check_scene(scene, spec)
    assert {p.kind for p in result.problems} == {"wrong_shape", "extra"}
    fixed = apply_reflection(scene, reflect(result))
    assert check_scene(fixed, spec).correct
