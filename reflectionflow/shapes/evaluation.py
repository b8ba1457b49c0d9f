"""Checker verdicts grouped by category or edit type: the one loop the VAE, base-model and corrector recipes
share, and the per-edit-type breakdown of a corrector's fixes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from reflectionflow.shapes.world import PromptSpec, check_image, parse_reflection
from reflectionflow.shapes.world.edits import Add, Change, Edit, Move, Remove

ImagesOf = Callable[[int, Sequence[PromptSpec]], Sequence[Image.Image]]
EDIT_TYPES = ("colour change", "shape change", "removal", "addition", "move")


def checker_verdicts(specs: Sequence[PromptSpec], images_of: ImagesOf, batch: int) -> list[bool]:
    """Whether the checker passes each image; `images_of(start, chunk)` makes one image per spec of
    `chunk = specs[start : start + batch]`."""
    verdicts = []
    for start in range(0, len(specs), batch):
        chunk = specs[start : start + batch]
        images = images_of(start, chunk)
        verdicts += [check_image(image, spec).correct for spec, image in zip(chunk, images, strict=True)]
    return verdicts


def rates(verdicts: Sequence[bool], groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Share of True verdicts per group (a verdict counts in every group it is in), in order of first
    appearance."""
    members: dict[str, list[bool]] = {}
    for verdict, names in zip(verdicts, groups, strict=True):
        for name in names:
            members.setdefault(name, []).append(verdict)
    return {name: float(np.mean(values)) for name, values in members.items()}


def accuracy_by_category(
    specs: Sequence[PromptSpec], images_of: ImagesOf, batch: int
) -> tuple[float, dict[str, float]]:
    """Share of images the checker passes, overall and per category."""
    verdicts = checker_verdicts(specs, images_of, batch)
    return float(np.mean(verdicts)), rates(verdicts, [[spec.tag] for spec in specs])


def edit_type(edit: Edit) -> str:
    if isinstance(edit, Change):
        return "shape change" if edit.shape else "colour change"
    return {Remove: "removal", Add: "addition", Move: "move"}[type(edit)]


def edit_groups(reflection: str) -> tuple[list[str], str]:
    """(the edit types a reflection asks for, its number of edits as "1 edit" / "2+ edits")."""
    edits = parse_reflection(reflection)
    return sorted({edit_type(e) for e in edits}, key=EDIT_TYPES.index), "1 edit" if len(edits) == 1 else "2+ edits"
