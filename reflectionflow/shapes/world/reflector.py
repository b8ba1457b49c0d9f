"""Rule-based reflector: a check result -> the imperative edits that make the scene correct.

Edits come in the order removals, changes, additions, moves, and each names its object as the scene
stands after the edits before it (the plan is simulated with the editor), so applying the sentences one
by one does exactly what was planned.
"""

from __future__ import annotations

import itertools

import numpy as np

from reflectionflow.shapes.world.checker import CheckResult
from reflectionflow.shapes.world.editor import apply_edit, free_cells, matches
from reflectionflow.shapes.world.edits import Add, Change, Edit, Move, ObjectRef, Remove, reflection_text
from reflectionflow.shapes.world.scene import Scene, relation_holds
from reflectionflow.shapes.world.vocabulary import INVERSE_RELATION

PREFERRED_CELLS = ((1, 1), (1, 0), (1, 2), (0, 1), (2, 1), (0, 0), (0, 2), (2, 0), (2, 2))
"""Where an unconstrained missing object is added when no rng is given: centre, sides, corners."""


def reflect(result: CheckResult, rng: np.random.Generator | None = None) -> str:
    """One sentence per edit; '' for a correct result. `rng` varies where added objects go."""
    return reflection_text(plan_edits(result, rng))


def plan_edits(result: CheckResult, rng: np.random.Generator | None = None) -> list[Edit]:
    if any(p.kind == "wrong_cell" for p in result.problems):
        raise ValueError("the reflector plans edits for the six prompt categories, not for captions' cells")
    plan = _Plan(result)
    _remove_extras(plan, result)
    _change_attributes(plan, result)
    _add_missing(plan, result, rng)
    _fix_relations(plan)
    return plan.edits


def object_ref(scene: Scene, index: int) -> ObjectRef:
    """'the red circle', or 'the red circle on the left' when there are several red circles."""
    obj = scene.objects[index]
    ref = ObjectRef(obj.shape, obj.color)
    return ref if matches(scene, ref) == [index] else ObjectRef(obj.shape, obj.color, obj.cell)


class _Plan:
    """The edits so far and the scene they lead to, with each object's identity tracked across them
    (ids are indices into the checked scene; added objects get new ones)."""

    def __init__(self, result: CheckResult) -> None:
        self.spec, self.scene = result.spec, result.scene
        self.ids = list(range(len(result.scene)))
        self.owner = {j: i for i, assigned in enumerate(result.assignment) for j in assigned}
        self.edits: list[Edit] = []
        self._new_ids = itertools.count(len(result.scene))

    def do(self, edit: Edit) -> None:
        if isinstance(edit, Remove):
            self.ids.pop(matches(self.scene, edit.target)[0])
        elif isinstance(edit, Add):
            self.ids.append(next(self._new_ids))
        self.scene = apply_edit(self.scene, edit)
        self.edits.append(edit)

    def remove(self, obj_id: int, ref: ObjectRef) -> None:
        """Remove `obj_id` by `ref`. When `ref` also fits an earlier object (an indistinguishable twin, or
        any instance of an interchangeable shape), that one goes, so the two swap ids first: the survivor
        keeps the twin's identity and requirement."""
        first, own = matches(self.scene, ref)[0], self.ids.index(obj_id)
        self.ids[first], self.ids[own] = self.ids[own], self.ids[first]
        self.do(Remove(ref))

    def name(self, obj_id: int) -> ObjectRef:
        return object_ref(self.scene, self.ids.index(obj_id))

    def standing_for(self, requirement: int) -> int | None:
        """Id of an object in the scene standing for `requirement`."""
        return next((j for j, i in self.owner.items() if i == requirement and j in self.ids), None)


def _remove_extras(plan: _Plan, result: CheckResult) -> None:
    # Instances of a requirement with no colour and no relation are interchangeable: 'Remove one square.'
    plain = {
        req.shape
        for i, req in enumerate(plan.spec.include)
        if req.color is None
        and req.position is None
        and not any(r.position and r.position[1] == i for r in plan.spec.include)
    }
    to_change = {p.obj for p in result.problems if p.kind in ("wrong_shape", "wrong_color")}
    for problem in result.problems:
        if problem.kind != "extra":
            continue
        shape = plan.scene.objects[plan.ids.index(problem.obj)].shape
        same_shape = {plan.ids[k] for k, obj in enumerate(plan.scene.objects) if obj.shape == shape}
        if shape in plain and not to_change & same_shape:
            plan.remove(problem.obj, ObjectRef(shape, any_one=True))
        else:
            plan.remove(problem.obj, plan.name(problem.obj))


def _change_attributes(plan: _Plan, result: CheckResult) -> None:
    changes: dict[int, dict[str, str]] = {}
    for problem in result.problems:
        if problem.kind in ("wrong_shape", "wrong_color"):
            changes.setdefault(problem.obj, {})[problem.kind.removeprefix("wrong_")] = problem.expected
    for obj_id, change in changes.items():
        plan.do(Change(plan.name(obj_id), **change))


def _add_missing(plan: _Plan, result: CheckResult, rng: np.random.Generator | None) -> None:
    """Add next to the object a relation ties the new one to, if it is there; else in a free cell."""
    include = plan.spec.include
    for problem in result.problems:
        if problem.kind != "missing":
            continue
        req = include[problem.requirement]
        reference = plan.standing_for(req.position[1]) if req.position else None
        subjects = [
            (k, r.position[0])
            for k, r in enumerate(include)
            if r.position and r.position[1] == problem.requirement
        ]
        subject = plan.standing_for(subjects[0][0]) if subjects else None
        if reference is not None:
            edit = Add(req.shape, req.color, relation=req.position[0], anchor=plan.name(reference))
        elif subject is not None:
            edit = Add(
                req.shape, req.color, relation=INVERSE_RELATION[subjects[0][1]], anchor=plan.name(subject)
            )
        else:
            free = [c for c in PREFERRED_CELLS if c in free_cells(plan.scene)]
            if not free:
                raise ValueError(f"no free cell to add {req.phrase()} to")
            edit = Add(
                req.shape, req.color, cell=free[int(rng.integers(len(free)))] if rng is not None else free[0]
            )
        plan.do(edit)
        plan.owner[plan.ids[-1]] = problem.requirement


def _fix_relations(plan: _Plan) -> None:
    for i, req in enumerate(plan.spec.include):
        if req.position is None:
            continue
        relation, ref = req.position
        subject, reference = plan.standing_for(i), plan.standing_for(ref)
        if subject is None or reference is None:
            continue
        objects = plan.scene.objects
        if not relation_holds(objects[plan.ids.index(subject)], relation, objects[plan.ids.index(reference)]):
            plan.do(Move(plan.name(subject), relation, plan.name(reference)))
