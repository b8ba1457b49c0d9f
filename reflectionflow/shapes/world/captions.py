"""Detailed captions: every object of a scene with its colour, shape and cell, as GenRef's long prompts
describe an image ("a photo of a red circle in the top left, a blue square in the center and a green
triangle at the bottom"). The base model trains on them beside the GenEval-style prompts; the checker
checks them like any prompt (`caption_spec`).

A caption is never shown for a scene that satisfies a held-out prompt: "a red circle on the left and a
blue square on the right" would teach the pairing a held-out colour-attribution prompt tests.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from reflectionflow.shapes.world.checker import check_scene
from reflectionflow.shapes.world.sampling import split_specs
from reflectionflow.shapes.world.scene import Scene
from reflectionflow.shapes.world.spec import ObjectRequirement, PromptSpec
from reflectionflow.shapes.world.vocabulary import CAPTION, CATEGORIES


def caption_spec(scene: Scene, rng: np.random.Generator | None = None) -> PromptSpec:
    """The caption of `scene` as a spec: one requirement (shape, colour, cell) per object, in raster order
    of cells, or shuffled by `rng`."""
    objects = sorted(scene.objects, key=lambda obj: obj.cell)
    if rng is not None:
        objects = [objects[i] for i in rng.permutation(len(objects))]
    return PromptSpec(CAPTION, tuple(ObjectRequirement(o.shape, color=o.color, cell=o.cell) for o in objects))


@cache
def _heldout_specs(objects: int) -> tuple[PromptSpec, ...]:
    held = {s.canonical_key: s for tag in CATEGORIES for s in split_specs(tag, "test") if s.total_objects == objects}
    train = {s.canonical_key for tag in CATEGORIES for s in split_specs(tag, "train")}
    return tuple(spec for key, spec in held.items() if key not in train)  # categories too small to hold out


def caption_allowed(scene: Scene) -> bool:
    """False when `scene` satisfies a held-out prompt (then only its GenEval-style prompt is shown)."""
    return not any(check_scene(scene, spec).correct for spec in _heldout_specs(len(scene)))
