"""Structured scenes: what the renderer draws, the checker detects and the editor changes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from reflectionflow.shapes.world.vocabulary import cell_of

POSITION_THRESHOLD = 0.1
"""GenEval's allowance: box centres must differ by more than 10% of the two boxes' summed sides."""

RELATION_MARGIN = 0.15
"""Sampled and edited scenes satisfy their relations with this margin over GenEval's 0.5 (and flawed
ones miss them by it), so the checker still agrees after antialiasing, JPEG and blur move the boxes."""


@dataclass(frozen=True)
class ShapeObject:
    """One object. `shape`/`color` are None only in detected scenes (a blob of unknown shape or of a
    colour outside the palette); coordinates are fractions of the image side."""

    shape: str | None
    color: str | None
    x: float  # bounding-box centre
    y: float
    size: float  # bounding-box side

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return self.x - half, self.y - half, self.x + half, self.y + half

    @property
    def cell(self) -> tuple[int, int]:
        return cell_of(self.x, self.y)

    def describe(self) -> str:
        """'red circle', 'circle' (unknown colour), 'red shape' (unknown shape)."""
        return " ".join(word for word in (self.color, self.shape or "shape") if word)

    def moved_to(self, x: float, y: float) -> ShapeObject:
        return replace(self, x=x, y=y)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...] = ()

    def __len__(self) -> int:
        return len(self.objects)

    def replaced(self, index: int, obj: ShapeObject) -> Scene:
        objects = list(self.objects)
        objects[index] = obj
        return Scene(tuple(objects))

    def without(self, index: int) -> Scene:
        return Scene(self.objects[:index] + self.objects[index + 1 :])

    def with_object(self, obj: ShapeObject) -> Scene:
        return Scene((*self.objects, obj))


def relation_scores(a: ShapeObject, b: ShapeObject) -> dict[str, float]:
    """How strongly `a` is left of / right of / above / below `b`, exactly as GenEval measures it: the
    centre offset, shrunk by the threshold, divided by its length. A relation holds above 0.5."""
    dx, dy = a.x - b.x, a.y - b.y
    allowance = POSITION_THRESHOLD * (a.size + b.size)
    rx = math.copysign(max(abs(dx) - allowance, 0.0), dx)
    ry = math.copysign(max(abs(dy) - allowance, 0.0), dy)
    norm = math.hypot(dx, dy)
    if max(abs(rx), abs(ry)) < 1e-3 or norm == 0.0:
        return dict.fromkeys(("left of", "right of", "above", "below"), 0.0)
    rx, ry = rx / norm, ry / norm
    return {"left of": -rx, "right of": rx, "above": -ry, "below": ry}


def relation_holds(a: ShapeObject, relation: str, b: ShapeObject, margin: float = 0.0) -> bool:
    """GenEval's test `relation in relative_position(a, b)`; `margin` demands a safety distance."""
    return relation_scores(a, b)[relation] > 0.5 + margin
