"""Rule-based reflector: a check result -> the imperative edits that make the scene correct.

Edits come in the order removals, changes, additions, moves, and each names its object as the scene
stands after the edits before it (the plan is simulated with the editor), so applying the sentences one
by one does exactly what was planned.
"""

from __future__ import annotations

import itertools

import numpy as np

from reflectionflow.data.shapes.checker import CheckResult
from reflectionflow.data.shapes.editor import apply_edit, free_cells, matches
from reflectionflow.data.shapes.edits import Add, Change, Edit, Move, ObjectRef, Remove, reflection_text
from reflectionflow.data.shapes.scene import Scene, relation_holds
from reflectionflow.data.shapes.world import INVERSE_RELATION

PREFERRED_CELLS = ((1, 1), (1, 0), (1, 2), (0, 1), (2, 1), (0, 0), (0, 2), (2, 0), (2, 2))
"""Where an unconstrained missing object is added when no rng is given: centre, sides, corners."""


def reflect(result: CheckResult, rng: np.random.Generator | None = None) -> str:
    """One sentence per edit; '' for a correct result. `rng` varies where added objects go."""
    return reflection_text(plan_edits(result, rng))


def plan_edits(result: CheckResult, rng: np.random.Generator | None = None) -> list[Edit]:
    spec, scene = result.spec, result.scene
    ids = list(range(len(scene)))  # ids[k] = identity of the scene's k-th object (added ones: new ids)
    new_ids = itertools.count(len(scene))
    owner = {j: i for i, assigned in enumerate(result.assignment) for j in assigned}
    edits: list[Edit] = []

    def do(edit: Edit) -> None:
        nonlocal scene
        before = scene
        scene = apply_edit(scene, edit)
        edits.append(edit)
        if isinstance(edit, Remove):
            ids.pop(matches(before, edit.target)[0])
        elif isinstance(edit, Add):
            ids.append(next(new_ids))

    # Interchangeable objects: instances of a requirement with no colour, no relation and no pending change.
    plain = {
        req.shape: i
        for i, req in enumerate(spec.include)
        if req.color is None
        and req.position is None
        and not any(r.position and r.position[1] == i for r in spec.include)
    }
    pending = {p.obj for p in result.problems if p.kind in ("wrong_shape", "wrong_color")}

    for problem in result.problems:
        if problem.kind != "extra":
            continue
        obj = scene.objects[ids.index(problem.obj)]
        same_shape = [ids[k] for k in range(len(scene)) if scene.objects[k].shape == obj.shape]
        if obj.shape in plain and not pending.intersection(same_shape):
            removed = ids[matches(scene, ObjectRef(obj.shape, any_one=True))[0]]
            do(Remove(ObjectRef(obj.shape, any_one=True)))
            if removed in owner:  # another instance went; this one takes its place
                owner[problem.obj] = owner.pop(removed)
        else:
            do(Remove(_name(scene, ids.index(problem.obj))))

    changes: dict[int, dict[str, str]] = {}
    for problem in result.problems:
        if problem.kind in ("wrong_shape", "wrong_color"):
            changes.setdefault(problem.obj, {})["shape" if problem.kind == "wrong_shape" else "color"] = (
                problem.expected
            )
    for j, change in changes.items():
        do(Change(_name(scene, ids.index(j)), **change))

    def present(requirement: int) -> int | None:
        """Scene index of an object standing for `requirement` (count-1 requirements: the one)."""
        for j, i in owner.items():
            if i == requirement and j in ids:
                return ids.index(j)
        return None

    for problem in result.problems:
        if problem.kind != "missing":
            continue
        i = problem.requirement
        req = spec.include[i]
        subjects = [
            (k, r.position[0]) for k, r in enumerate(spec.include) if r.position and r.position[1] == i
        ]
        if req.position is not None and present(req.position[1]) is not None:
            edit = Add(
                req.shape, req.color, relation=req.position[0], anchor=_name(scene, present(req.position[1]))
            )
        elif subjects and present(subjects[0][0]) is not None:
            subject, relation = subjects[0]
            edit = Add(
                req.shape,
                req.color,
                relation=INVERSE_RELATION[relation],
                anchor=_name(scene, present(subject)),
            )
        else:
            free = [c for c in PREFERRED_CELLS if c in free_cells(scene)]
            if not free:
                raise ValueError(f"no free cell to add {req.phrase()} to")
            cell = free[int(rng.integers(len(free)))] if rng is not None else free[0]
            edit = Add(req.shape, req.color, cell=cell)
        do(edit)
        owner[ids[-1]] = i

    for i, req in enumerate(spec.include):
        if req.position is None:
            continue
        relation, ref = req.position
        subject, reference = present(i), present(ref)
        if subject is not None and reference is not None:
            if not relation_holds(scene.objects[subject], relation, scene.objects[reference]):
                do(Move(_name(scene, subject), relation, _name(scene, reference)))
    return edits


def _name(scene: Scene, index: int) -> ObjectRef:
    """'the red circle', or 'the red circle on the left' when there are several red circles."""
    obj = scene.objects[index]
    ref = ObjectRef(obj.shape, obj.color)
    if matches(scene, ref) == [index]:
        return ref
    return ObjectRef(obj.shape, obj.color, obj.cell)
