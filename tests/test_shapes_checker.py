"""Shapes world: renderer + exact checker (accuracy on clean, JPEG and degraded renders; semantics)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from reflectionflow.shapes.world import (
    ObjectRequirement,
    PromptSpec,
    Scene,
    ShapeObject,
    check_image,
    check_scene,
    detect_objects,
    render_scene,
    sample_example,
)


def _accuracy(n: int, size: int, degrade, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    correct = 0
    for _ in range(n):
        spec, scene = sample_example(rng)
        result = check_image(degrade(render_scene(scene, size), rng), spec)
        correct += result.correct and result.score == 1.0
    return correct / n


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return Image.open(buffer).convert("RGB")


def _blur_and_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    return Image.fromarray(np.clip(pixels + rng.normal(0, 15, pixels.shape), 0, 255).astype(np.uint8))


def test_checker_accepts_clean_renders():
    assert _accuracy(2000, 48, lambda image, rng: image) >= 0.99


def test_checker_accepts_clean_renders_at_64px():
    assert _accuracy(300, 64, lambda image, rng: image, seed=1) >= 0.99


def test_checker_reads_high_quality_jpeg():
    assert _accuracy(500, 48, lambda image, rng: _jpeg(image, 95), seed=2) >= 0.99


def test_checker_degrades_gracefully_on_blur_and_noise():
    assert _accuracy(500, 48, _blur_and_noise, seed=3) >= 0.95


def _obj(shape, color, cell, size=0.24):
    row, col = cell
    return ShapeObject(shape, color, (col + 0.5) / 3, (row + 0.5) / 3, size)


RED_CIRCLE = PromptSpec("colors", (ObjectRequirement("circle", color="red"),))
THREE_SQUARES = PromptSpec("counting", (ObjectRequirement("square", count=3),))
TRIANGLE_LEFT_OF_CIRCLE = PromptSpec(
    "position",
    (
        ObjectRequirement("circle", color="green"),
        ObjectRequirement("triangle", color="blue", position=("left of", 0)),
    ),
)


@pytest.mark.parametrize(
    ("spec", "objects", "kinds", "score"),
    [
        (RED_CIRCLE, [_obj("circle", "red", (1, 1))], [], 1.0),
        (RED_CIRCLE, [_obj("circle", "blue", (1, 1))], ["wrong_color"], 0.5),
        (RED_CIRCLE, [_obj("square", "red", (1, 1))], ["wrong_shape"], 0.5),
        (RED_CIRCLE, [_obj("circle", "red", (1, 1)), _obj("square", "blue", (0, 0))], ["extra"], 0.5),
        (RED_CIRCLE, [], ["missing"], 0.0),
        (
            THREE_SQUARES,
            [_obj("square", c, cell) for c, cell in [("red", (0, 0)), ("blue", (1, 1))]],
            ["missing"],
            2 / 3,
        ),
        (
            THREE_SQUARES,
            [_obj("square", "red", (r, 0)) for r in range(3)] + [_obj("square", "red", (0, 2))],
            ["extra"],
            0.75,
        ),
        (
            TRIANGLE_LEFT_OF_CIRCLE,
            [_obj("circle", "green", (1, 2)), _obj("triangle", "blue", (1, 0))],
            [],
            1.0,
        ),
        (
            TRIANGLE_LEFT_OF_CIRCLE,
            [_obj("circle", "green", (1, 0)), _obj("triangle", "blue", (1, 2))],
            ["wrong_relation"],
            0.5,
        ),
        # Colours swapped, places right: two recolours; the relation earns half (its objects half match).
        (
            TRIANGLE_LEFT_OF_CIRCLE,
            [_obj("circle", "blue", (1, 2)), _obj("triangle", "green", (1, 0))],
            ["wrong_color", "wrong_color"],
            0.5,
        ),
    ],
)
def test_check_semantics(spec, objects, kinds, score):
    result = check_scene(Scene(tuple(objects)), spec)
    assert sorted(p.kind for p in result.problems) == sorted(kinds)
    assert result.correct == (not kinds)
    assert result.score == pytest.approx(score)
    assert len(result.messages()) == len(kinds)
    assert result.to_dict()["correct"] == result.correct


def test_unknown_shapes_and_colours_are_reported_not_guessed():
    image = Image.new("RGB", (48, 48), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 20, 40, 28), fill=(220, 30, 30))  # a red bar: no shape of this world
    draw.ellipse((2, 2, 14, 14), fill=(0, 200, 200))  # a cyan disc: no colour of this world
    found = {(d.obj.shape, d.obj.color) for d in detect_objects(image)}
    assert found == {(None, "red"), ("circle", None)}
    assert not check_image(image, RED_CIRCLE).correct


def test_detection_is_independent_of_image_size():
    scene = Scene((_obj("triangle", "purple", (0, 2)), _obj("circle", "black", (2, 0), size=0.2)))
    for size in (48, 64, 96):
        detected = [d.obj for d in detect_objects(render_scene(scene, size))]
        assert [(o.shape, o.color, o.cell) for o in detected] == [
            ("triangle", "purple", (0, 2)),
            ("circle", "black", (2, 0)),
        ]
        for got, want in zip(detected, scene.objects, strict=True):
            assert (
                abs(got.x - want.x) < 0.02 and abs(got.y - want.y) < 0.02 and abs(got.size - want.size) < 0.03
            )


TRIANGLE_AND_SQUARE = PromptSpec("two_object", (ObjectRequirement("triangle"), ObjectRequirement("square")))


def test_one_connected_object_is_one_shape_whatever_its_colours():
    """A model's off-palette or two-tone object is one object (as GenEval's detector and a person see it),
    not one object per palette colour its pixels are nearest to."""
    image = render_scene(Scene((_obj("triangle", "blue", (1, 0)),)), 48)
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 14, 43, 27), fill=(110, 25, 25))  # dark red: part red, part black pixel by pixel
    draw.rectangle((34, 18, 39, 23), fill=(150, 30, 30))
    draw.rectangle((4, 34, 15, 45), fill=(20, 80, 230))  # a blue square with a yellow core
    draw.rectangle((8, 38, 11, 41), fill=(240, 200, 0))
    found = {d.obj.cell: (d.obj.shape, d.obj.color) for d in detect_objects(image)}
    assert found == {(1, 0): ("triangle", "blue"), (1, 2): ("square", None), (2, 0): ("square", "blue")}
    dark = render_scene(Scene((_obj("triangle", "green", (1, 0)),)), 48)
    ImageDraw.Draw(dark).rectangle((30, 14, 43, 27), fill=(110, 25, 25))
    result = check_image(dark, TRIANGLE_AND_SQUARE)
    assert result.correct, result.messages()  # a square of no palette colour is a square
    assert not check_image(dark, PromptSpec("colors", (ObjectRequirement("square", color="red"),))).correct
