"""(flawed image, reflection, correct image) triplets of the shapes world; `shapes.triplets` writes them as
GenRef shards.

Subsets, as GenRef's sources: `editing` when the good image is the flawed scene with exactly the
reflection's edits applied (same layout, as GenRef's editing pairs); `rule` when it is another sample of
the same prompt that the checker passes (GenRef's rule-based pairs of a rejected and an accepted
generation); `general` when it is an independent correct render of the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from reflectionflow.shapes.world.checker import CheckResult, check_image, check_scene
from reflectionflow.shapes.world.editor import apply_edits, free_cells
from reflectionflow.shapes.world.edits import Change, Move, reflection_text
from reflectionflow.shapes.world.flaws import applicable_flaws, make_flawed
from reflectionflow.shapes.world.reflector import object_ref, plan_edits
from reflectionflow.shapes.world.render import render_scene
from reflectionflow.shapes.world.sampling import place_in_cell, sample_example, sample_scene
from reflectionflow.shapes.world.scene import RELATION_MARGIN, Scene, relation_holds
from reflectionflow.shapes.world.spec import PromptSpec
from reflectionflow.shapes.world.vocabulary import CATEGORIES, COLORS, DEFAULT_SIZE, RELATIONS


@dataclass(frozen=True)
class Triplet:
    prompt: str
    reflection: str
    bad: Image.Image
    good: Image.Image
    subset: str  # editing | rule | general
    meta: dict[str, Any] = field(default_factory=dict)  # GenEval record, flaw kind, problems found


def make_triplet(
    spec: PromptSpec,
    bad: Image.Image,
    rng: np.random.Generator,
    *,
    editing: bool,
    size: int = DEFAULT_SIZE,
    meta: dict[str, Any] | None = None,
    checked: CheckResult | None = None,
    good: Image.Image | None = None,
) -> Triplet | None:
    """Check `bad` (a flawed render or a model sample; `checked`: its check, if the caller has it),
    reflect on it and pair it with a good image: `good` if given (a passing sample: subset `rule`), else
    the edited scene or a fresh correct scene. None when there is nothing to learn: `bad` is already
    correct, or the good image would not pass (e.g. the edit keeps an object of a colour outside the palette)."""
    result = checked or check_image(bad, spec)
    if result.correct:
        return None
    edits = plan_edits(result, rng)
    subset = "rule" if good is not None else "editing" if editing else "general"
    if good is None:
        try:
            good = render_scene(apply_edits(result.scene, edits) if editing else sample_scene(spec, rng), size)
        except ValueError:
            return None
    if not check_image(good, spec).correct:
        return None
    info = {
        "geneval": spec.to_geneval(),
        "problems": result.messages(),
        "bad_score": result.score,
        **(meta or {}),
    }
    return Triplet(spec.prompt, reflection_text(edits), bad, good, subset, info)


def rendered_triplets(
    n: int,
    *,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    editing_fraction: float = 0.5,
    split: str = "train",
    tags: tuple[str, ...] = CATEGORIES,
    flaws: tuple[str, ...] | None = None,
    tag_weights: Sequence[float] | None = None,
    compound: float = 0.0,
) -> Iterator[Triplet]:
    """`n` triplets whose flawed images are renders of correct scenes with a typical mistake, of the
    categories `tags` (uniform, or in the proportions `tag_weights`) and (if given) only of the flaw kinds
    `flaws` (e.g. one edit type at a time). A share `compound` of the scenes get a second mistake of
    another kind, as a model's failures often have two (a swapped colour and a wrong place)."""
    rng = np.random.default_rng(seed)
    p = None if tag_weights is None else np.asarray(tag_weights, dtype=float) / np.sum(tag_weights)
    made = 0
    for _ in range(20 * n + 100):
        if made == n:
            return
        category = tags if p is None else (tags[int(rng.choice(len(tags), p=p))],)
        spec, scene = sample_example(rng, split, category)
        allowed = applicable_flaws(spec, flaws)
        if not allowed:
            continue
        flawed, flaw = make_flawed(spec, scene, rng, None if flaws is None else str(rng.choice(allowed)))
        if compound > 0 and rng.random() < compound:
            flawed, flaw = _second_flaw(spec, flawed, flaw, allowed, rng)
        editing = bool(rng.random() < editing_fraction)
        triplet = make_triplet(
            spec, render_scene(flawed, size), rng, editing=editing, size=size, meta={"flaw": flaw}
        )
        if triplet is not None:
            made += 1
            yield triplet
    raise RuntimeError(f"only {made} of {n} flawed renders gave usable triplets")


def _second_flaw(
    spec: PromptSpec, flawed: Scene, first: str, allowed: tuple[str, ...], rng: np.random.Generator, tries: int = 4
) -> tuple[Scene, str]:
    """`flawed` with a mistake of another kind too ("first+second") that the checker sees as one more
    problem (not a change to the object the first mistake already spoiled, which it would hide), or as it
    is when no such mistake is found in `tries`."""
    others = [f for f in allowed if f != first]
    if not others:
        return flawed, first
    problems = len(check_scene(flawed, spec).problems)
    for _ in range(tries):
        second = str(rng.choice(others))
        try:
            twice, _ = make_flawed(spec, flawed, rng, second)
        except (IndexError, ValueError):  # a flaw that needs an object the first mistake removed
            continue
        if len(check_scene(twice, spec).problems) > problems:
            return twice, f"{first}+{second}"
    return flawed, first


INSTRUCTION_KINDS = ("colour", "move")


def instruction_triplets(
    n: int, *, seed: int = 0, size: int = DEFAULT_SIZE, split: str = "train"
) -> Iterator[Triplet]:
    """`n` editing triplets whose flawed image already satisfies its prompt, with a reflection that asks for
    an edit the prompt leaves open: recolour an object the prompt gives no colour, or move an object
    relative to another where the prompt places neither. As the instruction-editing pairs of GenRef's
    editing subset, only the reflection says what to change, so a corrector trained on them must read it
    (on a fix of a prompt's violation the prompt and the image together already say most of it)."""
    rng = np.random.default_rng([seed, 4])
    made = 0
    for _ in range(20 * n + 100):
        if made == n:
            return
        spec, good = sample_example(rng, split)
        kind = str(rng.choice(INSTRUCTION_KINDS))
        edit = _colour_instruction(spec, good, rng) if kind == "colour" else _move_instruction(spec, good, rng)
        if edit is None:
            continue
        flawed, instruction = edit
        try:
            edited = apply_edits(flawed, [instruction])
        except ValueError:
            continue
        bad, target = render_scene(flawed, size), render_scene(edited, size)
        if not (check_image(bad, spec).correct and check_image(target, spec).correct):
            continue
        made += 1
        yield Triplet(spec.prompt, reflection_text([instruction]), bad, target, "editing",
                      {"geneval": spec.to_geneval(), "flaw": f"instruction_{kind}", "problems": []})
    raise RuntimeError(f"only {made} of {n} instruction edits could be made")


def _colour_instruction(spec: PromptSpec, good: Scene, rng: np.random.Generator):
    """(flawed scene, the Change that restores `good`): an object whose colour the prompt leaves open,
    recoloured."""
    assignment = check_scene(good, spec).assignment
    free = [j for i, req in enumerate(spec.include) if req.color is None for j in assignment[i]]
    if not free:
        return None
    j = int(rng.choice(free))
    original = good.objects[j]
    flawed = good.replaced(j, replace(original, color=str(rng.choice([c for c in COLORS if c != original.color]))))
    return flawed, Change(object_ref(flawed, j), color=original.color)


def _move_instruction(spec: PromptSpec, good: Scene, rng: np.random.Generator):
    """(flawed scene, the Move that restores a relation of `good`): where the prompt places nothing, an
    object moved to a free cell where its relation to another object no longer holds."""
    if any(req.position is not None for req in spec.include) or len(good) < 2:
        return None
    a, b = (int(k) for k in rng.choice(len(good), 2, replace=False))
    mover, anchor = good.objects[a], good.objects[b]
    held = [r for r in RELATIONS if relation_holds(mover, r, anchor, RELATION_MARGIN)]
    if not held:
        return None
    relation = str(rng.choice(held))
    away = [moved for cell in free_cells(good, skip={a})
            if not relation_holds(moved := place_in_cell(mover.shape, mover.color, cell, rng), relation, anchor)]
    if not away:
        return None
    flawed = good.replaced(a, away[int(rng.integers(len(away)))])
    return flawed, Move(object_ref(flawed, a), relation, object_ref(flawed, b))
