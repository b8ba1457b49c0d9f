"""Applies edits (or the reflection sentences naming them) to a structured scene.

New and moved objects go to the centre of a free grid cell; a relation ("to the left of the blue
square") is met with RELATION_MARGIN, moving the anchor too when no free cell on the wanted side is
left, as a person making the instruction true would.
"""

from __future__ import annotations

import itertools

from reflectionflow.shapes.world.edits import Add, Change, Edit, ObjectRef, Remove, parse_reflection
from reflectionflow.shapes.world.scene import RELATION_MARGIN, Scene, ShapeObject, relation_holds
from reflectionflow.shapes.world.vocabulary import CELL, CELLS, COLORS, MARGIN, SIZE_RANGE, cell_center

NEW_OBJECT_SIZE = sum(SIZE_RANGE) / 2
DEFAULT_COLOR = next(iter(COLORS))
"""Colour of an added object whose sentence names none ('Add one square ...')."""


def apply_reflection(scene: Scene, reflection: str) -> Scene:
    return apply_edits(scene, parse_reflection(reflection))


def apply_edits(scene: Scene, edits: list[Edit]) -> Scene:
    for edit in edits:
        scene = apply_edit(scene, edit)
    return scene


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """`scene` after one edit; objects keep their order, a removed one drops out, an added one is last."""
    if isinstance(edit, Remove):
        return scene.without(resolve(scene, edit.target))
    if isinstance(edit, Change):
        index = resolve(scene, edit.target)
        old = scene.objects[index]
        return scene.replaced(
            index, ShapeObject(edit.shape or old.shape, edit.color or old.color, old.x, old.y, old.size)
        )
    if isinstance(edit, Add):
        new = ShapeObject(edit.shape, edit.color or DEFAULT_COLOR, 0.5, 0.5, NEW_OBJECT_SIZE)
        scene = scene.with_object(new)
        if edit.anchor is None:
            return _place(
                scene, len(scene) - 1, _nearest(free_cells(scene, skip={len(scene) - 1}), edit.cell)
            )
        return _place_relative(scene, len(scene) - 1, edit.relation, resolve(scene, edit.anchor))
    return _place_relative(scene, resolve(scene, edit.target), edit.relation, resolve(scene, edit.anchor))


def matches(scene: Scene, ref: ObjectRef) -> list[int]:
    """Indices of the objects `ref` describes, in scene order."""
    return [
        i
        for i, obj in enumerate(scene.objects)
        if obj.shape == ref.shape
        and (ref.color is None or obj.color == ref.color)
        and (ref.cell is None or obj.cell == ref.cell)
    ]


def resolve(scene: Scene, ref: ObjectRef) -> int:
    """The object `ref` names: the first match (the reflector names objects so that it is the one)."""
    found = matches(scene, ref)
    if not found:
        raise ValueError(f"no object in the scene is {ref.text()!r}")
    return found[0]


def free_cells(scene: Scene, skip: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Cells no object (other than those in `skip`) reaches into by more than MARGIN."""
    occupied = set()
    for i, obj in enumerate(scene.objects):
        if i in skip:
            continue
        x0, y0, x1, y1 = obj.box
        for row, col in CELLS:
            if (
                x0 < (col + 1) * CELL - MARGIN
                and x1 > col * CELL + MARGIN
                and y0 < (row + 1) * CELL - MARGIN
                and y1 > row * CELL + MARGIN
            ):
                occupied.add((row, col))
    return [cell for cell in CELLS if cell not in occupied]


def _distance(a: tuple[int, int], b: tuple[int, int]) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def _nearest(cells: list[tuple[int, int]], target: tuple[int, int]) -> tuple[int, int]:
    if not cells:
        raise ValueError("no free cell left in the scene")
    return min(cells, key=lambda cell: _distance(cell, target))


def _placed(obj: ShapeObject, cell: tuple[int, int]) -> ShapeObject:
    x, y = cell_center(cell)
    return ShapeObject(obj.shape, obj.color, x, y, min(obj.size, SIZE_RANGE[1]))


def _place(scene: Scene, index: int, cell: tuple[int, int]) -> Scene:
    return scene.replaced(index, _placed(scene.objects[index], cell))


def _place_relative(scene: Scene, index: int, relation: str, anchor: int) -> Scene:
    """Put object `index` in the free cell nearest to where it is that satisfies the relation to object
    `anchor`; failing that, move both to the pair of free cells that disturbs the anchor least."""
    mover, fixed = scene.objects[index], scene.objects[anchor]
    here = mover.cell
    cells = [
        c
        for c in free_cells(scene, skip={index})
        if relation_holds(_placed(mover, c), relation, fixed, RELATION_MARGIN)
    ]
    if cells:
        return _place(scene, index, _nearest(cells, here))
    pairs = [
        (a, m)
        for a, m in itertools.permutations(free_cells(scene, skip={index, anchor}), 2)
        if relation_holds(_placed(mover, m), relation, _placed(fixed, a), RELATION_MARGIN)
    ]
    if not pairs:
        raise ValueError(f"no room to put the {mover.describe()} {relation} the {fixed.describe()}")
    a, m = min(pairs, key=lambda pair: (_distance(pair[0], fixed.cell), _distance(pair[1], here)))
    return _place(_place(scene, anchor, a), index, m)
