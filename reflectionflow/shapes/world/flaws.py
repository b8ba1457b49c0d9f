"""Typical text-to-image mistakes, made on purpose: correct scene -> flawed scene of a named kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from reflectionflow.shapes.world.checker import check_scene
from reflectionflow.shapes.world.editor import free_cells
from reflectionflow.shapes.world.sampling import place_in_cell
from reflectionflow.shapes.world.scene import RELATION_MARGIN, Scene, ShapeObject, relation_scores
from reflectionflow.shapes.world.spec import PromptSpec
from reflectionflow.shapes.world.vocabulary import COLORS, MAX_OBJECTS, SHAPES, cell_center

FLAWS = {
    "single_object": ("wrong_shape", "missing", "extra"),
    "two_object": ("wrong_shape", "missing", "extra"),
    "counting": ("wrong_count", "wrong_shape", "extra"),
    "colors": ("wrong_color", "wrong_shape", "missing", "extra"),
    "position": ("wrong_position", "swapped_colors", "wrong_color", "wrong_shape", "missing", "extra"),
    "color_attr": ("swapped_colors", "wrong_color", "wrong_shape", "missing", "extra"),
}
"""The mistakes each category invites, as GenEval's categories probe them."""

EXPECTED_PROBLEMS = {
    "wrong_shape": {"wrong_shape"},
    "missing": {"missing"},
    "extra": {"extra"},
    "wrong_count": {"missing", "extra"},
    "wrong_color": {"wrong_color"},
    # With two objects of one shape, swapped colours and swapped places are the same picture.
    "swapped_colors": {"wrong_color", "wrong_relation"},
    "wrong_position": {"wrong_relation"},
}
"""Checker problem kinds each flaw may produce."""


def applicable_flaws(spec: PromptSpec, among: Sequence[str] | None = None) -> tuple[str, ...]:
    """The flaw kinds that can be made in a scene of `spec` (only those in `among`, if given)."""
    colors = [req.color for req in spec.include if req.color is not None]
    return tuple(f for f in FLAWS[spec.tag] if (f != "swapped_colors" or len(set(colors)) == 2)
                 and (among is None or f in among))


def make_flawed(
    spec: PromptSpec, scene: Scene, rng: np.random.Generator, flaw: str | None = None
) -> tuple[Scene, str]:
    """`scene` (correct for `spec`) with one mistake of kind `flaw` (random applicable one if None)."""
    flaws = applicable_flaws(spec)
    flaw = flaw or str(rng.choice(flaws))
    if flaw not in flaws:
        raise ValueError(f"flaw {flaw!r} does not apply to {spec.prompt!r}; choose from {flaws}")
    assignment = check_scene(scene, spec).assignment
    objects = list(scene.objects)
    pick = int(rng.integers(len(objects)))

    if flaw == "wrong_shape":
        old = objects[pick]
        objects[pick] = replace(old, shape=_other(SHAPES, old.shape, rng))
    elif flaw == "missing":
        del objects[pick]
    elif flaw == "extra":
        cell = _free_cell(Scene(tuple(objects)), rng)
        # In counting, another instance of the counted shape would be a wrong count: add another shape.
        used = {req.shape for req in spec.include} if spec.tag == "counting" else set()
        shape = str(rng.choice([s for s in SHAPES if s not in used]))
        objects.append(place_in_cell(shape, str(rng.choice(list(COLORS))), cell, rng))
    elif flaw == "wrong_count":
        (req,) = spec.include
        count = int(rng.choice([n for n in range(1, MAX_OBJECTS + 2) if n != req.count]))
        rng.shuffle(objects)
        objects = objects[:count]
        while len(objects) < count:
            objects.append(
                place_in_cell(
                    req.shape, str(rng.choice(list(COLORS))), _free_cell(Scene(tuple(objects)), rng), rng
                )
            )
    elif flaw == "wrong_color":
        i = int(rng.choice([i for i, req in enumerate(spec.include) if req.color is not None]))
        j = assignment[i][0]
        objects[j] = replace(objects[j], color=_other(COLORS, objects[j].color, rng))
    elif flaw == "swapped_colors":
        a, b = (assigned[0] for assigned in assignment)
        objects[a], objects[b] = (
            replace(objects[a], color=objects[b].color),
            replace(objects[b], color=objects[a].color),
        )
    else:  # wrong_position
        objects = _misplaced(spec, objects, assignment, rng)
    return Scene(tuple(objects)), flaw


def _misplaced(
    spec: PromptSpec,
    objects: list[ShapeObject],
    assignment: tuple[tuple[int, ...], ...],
    rng: np.random.Generator,
) -> list[ShapeObject]:
    """The subject in a free cell where the relation clearly fails, or subject and reference swapped."""
    (i, req), *_ = [(i, req) for i, req in enumerate(spec.include) if req.position is not None]
    relation, ref = req.position
    s, r = assignment[i][0], assignment[ref][0]
    scene = Scene(tuple(objects))
    wrong = [
        obj
        for cell in free_cells(scene, skip={s})
        if relation_scores(obj := place_in_cell(objects[s].shape, objects[s].color, cell, rng), objects[r])[
            relation
        ]
        < 0.5 - RELATION_MARGIN
    ]
    if wrong and rng.random() < 0.5:
        objects[s] = wrong[int(rng.integers(len(wrong)))]
    else:
        objects[s], objects[r] = (
            objects[s].moved_to(*cell_center(objects[r].cell)),
            objects[r].moved_to(*cell_center(objects[s].cell)),
        )
    return objects


def _other(options, current: str | None, rng: np.random.Generator) -> str:
    return str(rng.choice([o for o in options if o != current]))


def _free_cell(scene: Scene, rng: np.random.Generator) -> tuple[int, int]:
    cells = free_cells(scene)
    return cells[int(rng.integers(len(cells)))]
