"""Every prompt of the world, the deterministic train/test split, and seeded scene sampling."""

from __future__ import annotations

import hashlib
import itertools
from functools import cache

import numpy as np

from reflectionflow.shapes.world.scene import RELATION_MARGIN, Scene, ShapeObject, relation_holds
from reflectionflow.shapes.world.spec import ObjectRequirement, PromptSpec
from reflectionflow.shapes.world.vocabulary import (
    CATEGORIES,
    CELL,
    CELLS,
    COLORS,
    COUNTS,
    MARGIN,
    RELATIONS,
    SHAPES,
    SIZE_RANGE,
    cell_center,
)

HELDOUT_FRACTION = 0.25
MIN_PROMPTS_FOR_HOLDOUT = 16
"""Categories with fewer distinct prompts (single_object 3, two_object 3, counting 9) hold none out:
that would leave a shape or a count never named in training. Their test prompts are the training
prompts, as GenEval's object classes are ones every text-to-image model has seen."""


@cache
def all_specs(tag: str) -> tuple[PromptSpec, ...]:
    """Every prompt of a category, in every word order."""
    colored = [(shape, color) for shape in SHAPES for color in COLORS]
    if tag == "single_object":
        includes = [(ObjectRequirement(s),) for s in SHAPES]
    elif tag == "two_object":
        includes = [
            (ObjectRequirement(a), ObjectRequirement(b)) for a, b in itertools.permutations(SHAPES, 2)
        ]
    elif tag == "counting":
        includes = [(ObjectRequirement(s, count=n),) for s in SHAPES for n in COUNTS]
    elif tag == "colors":
        includes = [(ObjectRequirement(s, color=c),) for s, c in colored]
    elif tag == "position":
        includes = [
            (ObjectRequirement(rs, color=rc), ObjectRequirement(ss, color=sc, position=(relation, 0)))
            for (ss, sc), (rs, rc) in itertools.permutations(colored, 2)
            for relation in RELATIONS
        ]
    elif tag == "color_attr":
        includes = [
            (ObjectRequirement(a, color=ca), ObjectRequirement(b, color=cb))
            for (a, ca), (b, cb) in itertools.permutations(colored, 2)
            if a != b and ca != cb
        ]
    else:
        raise ValueError(f"unknown category {tag!r}; expected one of {CATEGORIES}")
    return tuple(PromptSpec(tag, include) for include in includes)


@cache
def _heldout_keys(tag: str) -> frozenset[str]:
    keys = sorted({spec.canonical_key for spec in all_specs(tag)})
    if len(keys) < MIN_PROMPTS_FOR_HOLDOUT:
        return frozenset()
    ranked = sorted(keys, key=lambda key: hashlib.sha256(key.encode()).hexdigest())
    return frozenset(ranked[: round(HELDOUT_FRACTION * len(keys))])


def is_heldout(spec: PromptSpec) -> bool:
    """True for prompts that never appear in training."""
    return spec.canonical_key in _heldout_keys(spec.tag)


@cache
def split_specs(tag: str, split: str) -> tuple[PromptSpec, ...]:
    """'train': prompts for training; 'test': the held-out prompts (all prompts for a category too
    small to hold any out, see MIN_PROMPTS_FOR_HOLDOUT)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    specs = all_specs(tag)
    if not _heldout_keys(tag):
        return specs
    return tuple(spec for spec in specs if is_heldout(spec) == (split == "test"))


def heldout_eval_set(n_per_category: int = 64, seed: int = 0) -> list[PromptSpec]:
    """`n_per_category` test prompts per category, distinct where the category has enough and cycled
    (each repeat is a further sample, as GenEval draws several images per prompt) where it has not."""
    rng = np.random.default_rng(seed)
    out: list[PromptSpec] = []
    for tag in CATEGORIES:
        pool = split_specs(tag, "test")
        repeats = -(-n_per_category // len(pool))
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(repeats)])[:n_per_category]
        out.extend(pool[i] for i in order)
    return out


def sample_scene(spec: PromptSpec, rng: np.random.Generator, max_tries: int = 1000) -> Scene:
    """A random scene satisfying `spec`: one object per distinct cell, jittered in position and size;
    colours the prompt leaves open are random."""
    kinds = [(req.shape, req.color) for req in spec.include for _ in range(req.count)]
    first = np.cumsum([0] + [req.count for req in spec.include]).tolist()  # first object of each requirement
    relations = [
        (first[i], req.position[0], first[req.position[1]])
        for i, req in enumerate(spec.include)
        if req.position
    ]
    for _ in range(max_tries):
        cells = rng.choice(len(CELLS), size=len(kinds), replace=False)
        objects = [
            place_in_cell(shape, color or str(rng.choice(list(COLORS))), CELLS[c], rng)
            for (shape, color), c in zip(kinds, cells, strict=True)
        ]
        if all(relation_holds(objects[i], rel, objects[ref], RELATION_MARGIN) for i, rel, ref in relations):
            return Scene(tuple(objects))
    raise RuntimeError(f"could not place {spec.prompt!r} in {max_tries} tries")


def place_in_cell(shape: str, color: str, cell: tuple[int, int], rng: np.random.Generator) -> ShapeObject:
    """An object of random size at a random spot inside `cell`, keeping MARGIN to the cell border."""
    size = float(rng.uniform(*SIZE_RANGE))
    slack = max((CELL - size) / 2 - MARGIN, 0.0)
    cx, cy = cell_center(cell)
    return ShapeObject(
        shape, color, cx + float(rng.uniform(-slack, slack)), cy + float(rng.uniform(-slack, slack)), size
    )


def sample_example(
    rng: np.random.Generator, split: str = "train", tags: tuple[str, ...] = CATEGORIES
) -> tuple[PromptSpec, Scene]:
    """A (prompt, correct scene) pair: category uniform over `tags`, prompt uniform within it."""
    specs = split_specs(str(rng.choice(tags)), split)
    spec = specs[int(rng.integers(len(specs)))]
    return spec, sample_scene(spec, rng)
