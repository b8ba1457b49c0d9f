"""The world's exact verifier: detected scene vs prompt spec -> correct, graded score, problems.

Detected objects are matched to the spec's requirements by the best assignment (most matching shapes
and colours, then most relations satisfied, then most shapes right); leftover objects fill leftover
slots as wrong-shape/colour instances, and whatever is still unmatched is missing or extra. Every
problem is one edit away from fixed, which is what the reflector turns into sentences.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from reflectionflow.shapes.world.detect import detect_scene
from reflectionflow.shapes.world.scene import Scene, ShapeObject, relation_holds
from reflectionflow.shapes.world.spec import ObjectRequirement, PromptSpec
from reflectionflow.shapes.world.vocabulary import LOCATIONS

MAX_CANDIDATES = 8
"""Per requirement, only the best-matching objects enter the exhaustive assignment (keeps a cluttered
generated image cheap; the rest become extras)."""


@dataclass(frozen=True)
class Problem:
    kind: str  # missing | extra | wrong_color | wrong_shape | wrong_cell | wrong_relation
    requirement: int | None = None  # index into spec.include
    obj: int | None = None  # index into the detected scene
    expected: str | None = None  # the colour, shape, location phrase or relation the spec asks for
    reference: int | None = None  # wrong_relation: the object the relation is measured against


@dataclass(frozen=True)
class CheckResult:
    spec: PromptSpec
    scene: Scene  # as detected
    assignment: tuple[tuple[int, ...], ...]  # per requirement, the scene objects standing for it
    problems: tuple[Problem, ...]
    score: float  # 1.0 exactly when correct; partial credit for ranking otherwise

    @property
    def correct(self) -> bool:
        return not self.problems

    def messages(self) -> list[str]:
        return [_message(p, self.spec, self.scene) for p in self.problems]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.spec.prompt,
            "tag": self.spec.tag,
            "correct": self.correct,
            "score": self.score,
            "detected": [asdict(obj) for obj in self.scene.objects],
            "problems": [
                dict(asdict(p), message=m) for p, m in zip(self.problems, self.messages(), strict=True)
            ],
        }


def check_image(image: Image.Image, spec: PromptSpec) -> CheckResult:
    return check_scene(detect_scene(image), spec)


def check_scene(scene: Scene, spec: PromptSpec) -> CheckResult:
    objects = scene.objects
    sims = [[similarity(req, obj) for obj in objects] for req in spec.include]
    assignment = _with_leftovers(spec, objects, _best_match(spec, objects, sims))
    object_term = sum(sims[i][j] for i, chosen in enumerate(assignment) for j in chosen)
    n_relations = sum(req.position is not None for req in spec.include)
    score = (
        object_term / max(spec.total_objects, len(objects))
        + _relation_credit(spec, assignment, objects, sims)
    ) / (1 + n_relations)
    return CheckResult(spec, scene, assignment, _problems(spec, objects, assignment), score)


def similarity(req: ObjectRequirement, obj: ShapeObject) -> float:
    """1 for a perfect instance; else the share of the asked-for attributes (shape, and colour and cell
    when given) that are right."""
    right = [obj.shape == req.shape]
    if req.color is not None:
        right.append(obj.color == req.color)
    if req.cell is not None:
        right.append(obj.cell == req.cell)
    return sum(right) / len(right)


def _best_match(
    spec: PromptSpec, objects: tuple[ShapeObject, ...], sims: list[list[float]]
) -> tuple[tuple[int, ...], ...]:
    """Exhaustive search (at most 4 slots in this world) over which partly matching objects stand for
    which requirement: most similarity, then most relation credit, then most right shapes."""
    options = []
    for i, req in enumerate(spec.include):
        candidates = sorted((j for j in range(len(objects)) if sims[i][j] > 0), key=lambda j: -sims[i][j])
        candidates = candidates[:MAX_CANDIDATES]
        options.append([c for k in range(req.count + 1) for c in itertools.combinations(candidates, k)])
    best_key, best = None, None
    for choice in itertools.product(*options):
        used = [j for chosen in choice for j in chosen]
        if len(used) != len(set(used)):
            continue
        key = (
            sum(sims[i][j] for i, chosen in enumerate(choice) for j in chosen),
            _relation_credit(spec, choice, objects, sims),
            sum(objects[j].shape == spec.include[i].shape for i, chosen in enumerate(choice) for j in chosen),
        )
        if best_key is None or key > best_key:
            best_key, best = key, choice
    assert best is not None  # choosing nothing is always an option
    return best


def _with_leftovers(
    spec: PromptSpec, objects: tuple[ShapeObject, ...], matched: tuple[tuple[int, ...], ...]
) -> tuple[tuple[int, ...], ...]:
    """Unmatched objects, in scene order, stand in for unfilled slots: they are to be changed, not
    removed and replaced."""
    leftovers = [j for j in range(len(objects)) if all(j not in chosen for chosen in matched)]
    assignment = []
    for req, chosen in zip(spec.include, matched, strict=True):
        free = req.count - len(chosen)
        assignment.append(tuple(sorted(chosen + tuple(leftovers[:free]))))
        leftovers = leftovers[free:]
    return tuple(assignment)


def _problems(
    spec: PromptSpec, objects: tuple[ShapeObject, ...], assignment: tuple[tuple[int, ...], ...]
) -> tuple[Problem, ...]:
    problems = []
    for i, (req, assigned) in enumerate(zip(spec.include, assignment, strict=True)):
        for j in assigned:
            if objects[j].shape != req.shape:
                problems.append(Problem("wrong_shape", i, j, req.shape))
            if req.color is not None and objects[j].color != req.color:
                problems.append(Problem("wrong_color", i, j, req.color))
            if req.cell is not None and objects[j].cell != req.cell:
                problems.append(Problem("wrong_cell", i, j, LOCATIONS[req.cell]))
        problems.extend(Problem("missing", i) for _ in range(req.count - len(assigned)))
    assigned_anywhere = {j for assigned in assignment for j in assigned}
    problems.extend(Problem("extra", obj=j) for j in range(len(objects)) if j not in assigned_anywhere)
    for i, req in enumerate(spec.include):
        if req.position is not None and assignment[i] and assignment[req.position[1]]:
            relation, ref = req.position
            subject, reference = assignment[i][0], assignment[ref][0]
            if not relation_holds(objects[subject], relation, objects[reference]):
                problems.append(Problem("wrong_relation", i, subject, relation, reference))
    return tuple(problems)


def _relation_credit(
    spec: PromptSpec,
    assignment: tuple[tuple[int, ...], ...],
    objects: tuple[ShapeObject, ...],
    sims: list[list[float]],
) -> float:
    """Per relation that holds, the mean similarity of its two objects (a relation between the wrong
    objects earns little)."""
    credit = 0.0
    for i, req in enumerate(spec.include):
        if req.position is None:
            continue
        relation, ref = req.position
        if assignment[i] and assignment[ref]:
            subject, reference = assignment[i][0], assignment[ref][0]
            if relation_holds(objects[subject], relation, objects[reference]):
                credit += (sims[i][subject] + sims[ref][reference]) / 2
    return credit


def _message(problem: Problem, spec: PromptSpec, scene: Scene) -> str:
    def the(j: int) -> str:
        obj = scene.objects[j]
        return f"the {obj.describe()} {LOCATIONS[obj.cell]}"

    if problem.kind == "missing":
        req = spec.include[problem.requirement]
        return f"missing {ObjectRequirement(req.shape, 1, req.color).phrase()}"
    if problem.kind == "extra":
        return f"unexpected {the(problem.obj)[4:]}"
    if problem.kind == "wrong_color":
        return f"{the(problem.obj)} should be {problem.expected}"
    if problem.kind == "wrong_shape":
        return f"{the(problem.obj)} should be a {problem.expected}"
    if problem.kind == "wrong_cell":
        return f"{the(problem.obj)} should be {problem.expected}"
    return f"{the(problem.obj)} should be {problem.expected} {the(problem.reference)}"
