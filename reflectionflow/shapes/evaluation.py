"""Checker verdicts grouped by category or edit type: the one loop the VAE, base-model and corrector recipes
share, the per-edit-type breakdown of a corrector's fixes, the per-cell split of a correction into what it was
asked to change and what it should have kept, and sheets of images with their verdicts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from reflectionflow.shapes.world import CheckResult, PromptSpec, Scene, check_image, parse_reflection
from reflectionflow.shapes.world.edits import Add, Change, Edit, Move, Remove
from reflectionflow.sheets import contact_sheet

ImagesOf = Callable[[int, Sequence[PromptSpec]], Sequence[Image.Image]]
EDIT_TYPES = ("colour change", "shape change", "removal", "addition", "move")


@dataclass(frozen=True)
class Judged:
    """An image made for `spec` and the checker's verdict on it."""

    spec: PromptSpec
    image: Image.Image
    result: CheckResult

    @property
    def correct(self) -> bool:
        return self.result.correct


def judge(specs: Sequence[PromptSpec], images_of: ImagesOf, batch: int) -> list[Judged]:
    """The checker's verdict on one image per spec; `images_of(start, chunk)` makes the images of
    `chunk = specs[start : start + batch]`."""
    judged = []
    for start in range(0, len(specs), batch):
        chunk = specs[start : start + batch]
        images = images_of(start, chunk)
        judged += [Judged(spec, image, check_image(image, spec)) for spec, image in zip(chunk, images, strict=True)]
    return judged


def rates(verdicts: Sequence[bool], groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Share of True verdicts per group (a verdict counts in every group it is in), in order of first
    appearance."""
    members: dict[str, list[bool]] = {}
    for verdict, names in zip(verdicts, groups, strict=True):
        for name in names:
            members.setdefault(name, []).append(verdict)
    return {name: float(np.mean(values)) for name, values in members.items()}


def accuracy_by_category(judged: Sequence[Judged]) -> tuple[float, dict[str, float]]:
    """Share of images the checker passes, overall and per category."""
    verdicts = [j.correct for j in judged]
    return float(np.mean(verdicts)), rates(verdicts, [[j.spec.tag] for j in judged])


def verdict_sheet(judged: Sequence[Judged], title: str, per_category: int = 4) -> Image.Image:
    """The first `per_category` images of each category, a row per category, captioned with the verdict:
    'ok' or the checker's problems, after the prompt."""
    rows: dict[str, list] = {}
    for j in judged:
        row = rows.setdefault(j.spec.tag, [])
        if len(row) < per_category:
            verdict = "ok" if j.correct else "; ".join(j.result.messages())
            row.append((j.image, f"{j.spec.prompt.removeprefix('a photo of ')} -- {verdict}"))
    return contact_sheet(list(rows.values()), cell=144, title=title, row_labels=list(rows))


def edit_type(edit: Edit) -> str:
    if isinstance(edit, Change):
        return "shape change" if edit.shape else "colour change"
    return {Remove: "removal", Add: "addition", Move: "move"}[type(edit)]


def edit_groups(reflection: str) -> tuple[list[str], str]:
    """(the edit types a reflection asks for, its number of edits as "1 edit" / "2+ edits")."""
    edits = parse_reflection(reflection)
    return sorted({edit_type(e) for e in edits}, key=EDIT_TYPES.index), "1 edit" if len(edits) == 1 else "2+ edits"


def cell_contents(scene: Scene) -> dict[tuple[int, int], frozenset[tuple[str | None, str | None]]]:
    """The objects of `scene` per grid cell, as (shape, colour) sets."""
    cells: dict[tuple[int, int], set] = {}
    for obj in scene.objects:
        cells.setdefault(obj.cell, set()).add((obj.shape, obj.color))
    return {cell: frozenset(objects) for cell, objects in cells.items()}


def cell_fidelity(flawed: Scene, target: Scene, output: Scene) -> tuple[list[bool], list[bool]]:
    """Whether `output` holds what `target` holds (the same shapes and colours, or nothing) in each cell
    where the flawed or the target scene has an object, split into the cells the reflection's edits
    change (flawed != target) and the cells it keeps: a correction can fail by not editing or by not
    copying, and the checker's one verdict does not say which. Scenes as detected (`detect_scene`, or a
    `CheckResult.scene`, which the checker has already detected)."""
    before, after, made = cell_contents(flawed), cell_contents(target), cell_contents(output)
    edited, kept = [], []
    for cell in sorted(before.keys() | after.keys()):
        wanted = after.get(cell, frozenset())
        (kept if before.get(cell, frozenset()) == wanted else edited).append(made.get(cell, frozenset()) == wanted)
    return edited, kept
