"""Prompt specs in GenEval's six categories, with GenEval's `include` records and phrasing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reflectionflow.shapes.world.vocabulary import (
    CAPTION,
    CATEGORIES,
    CELLS,
    COLORS,
    INVERSE_RELATION,
    LOCATIONS,
    MAX_OBJECTS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
)


@dataclass(frozen=True)
class ObjectRequirement:
    """One GenEval `include` entry: `count` objects of `shape` (and `color`, if given), optionally
    placed `position = (relation, index of the reference requirement)` or, in captions, in grid `cell`."""

    shape: str
    count: int = 1
    color: str | None = None
    position: tuple[str, int] | None = None
    cell: tuple[int, int] | None = None

    def phrase(self) -> str:
        """'a red circle', 'three squares', 'a red circle in the top left'."""
        noun = self.shape if self.count == 1 else self.shape + "s"
        words = " ".join(w for w in (self.color, noun) if w)
        where = f" {LOCATIONS[self.cell]}" if self.cell is not None else ""
        if self.count > 1:
            return f"{NUMBER_WORDS[self.count]} {words}{where}"
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}{where}"

    def to_geneval(self) -> dict[str, Any]:
        record: dict[str, Any] = {"class": self.shape, "count": self.count}
        if self.color is not None:
            record["color"] = self.color
        if self.position is not None:
            record["position"] = list(self.position)
        if self.cell is not None:
            record["cell"] = list(self.cell)
        return record


@dataclass(frozen=True)
class PromptSpec:
    """A prompt as a structure. Stricter than GenEval on purpose: scenes of this world hold only what
    the prompt names, so counts are exact and unrequested objects are errors."""

    tag: str
    include: tuple[ObjectRequirement, ...]

    def __post_init__(self) -> None:
        problem = self._invalid()
        if problem:
            raise ValueError(f"invalid shapes prompt spec {self.tag!r} {self.include!r}: {problem}")

    def _invalid(self) -> str | None:
        if self.tag not in (*CATEGORIES, CAPTION):
            return f"tag must be one of {(*CATEGORIES, CAPTION)}"
        if not self.include:
            return "no objects"
        for i, req in enumerate(self.include):
            if req.shape not in SHAPES or (req.color is not None and req.color not in COLORS):
                return f"unknown shape or colour in {req}"
            if req.cell is not None and (req.cell not in CELLS or req.count != 1):
                return f"a cell names one object in one of {CELLS}: {req}"
            if req.position is not None and (
                req.position[0] not in RELATIONS
                or req.position[1] in (i, None)
                or not 0 <= req.position[1] < len(self.include)
            ):
                return f"bad position {req.position}"
            for other in self.include[:i]:
                if (
                    other.shape == req.shape
                    and (other.color is None or req.color is None or other.color == req.color)
                    and (other.cell is None or req.cell is None or other.cell == req.cell)
                ):
                    return "two requirements can select the same object"
        if not 1 <= self.total_objects <= MAX_OBJECTS:
            return f"between 1 and {MAX_OBJECTS} objects"
        return None

    @property
    def total_objects(self) -> int:
        return sum(req.count for req in self.include)

    @property
    def prompt(self) -> str:
        """GenEval phrasing: 'a photo of a blue triangle left of a green circle'."""
        for req in self.include:
            if req.position is not None:
                relation, reference = req.position
                return f"a photo of {req.phrase()} {relation} {self.include[reference].phrase()}"
        phrases = [req.phrase() for req in self.include]
        if len(phrases) > 2:  # captions: 'a A, a B and a C'
            phrases = [", ".join(phrases[:-1]), phrases[-1]]
        return "a photo of " + " and ".join(phrases)

    @property
    def canonical_key(self) -> str:
        """Identity of the prompt up to word order ('A and B' = 'B and A', 'A left of B' = 'B right of
        A'), so a train/held-out split never puts two phrasings of one prompt on different sides."""
        for req in self.include:
            if req.position is not None:
                relation, reference = req.position
                subject, other = _describe(req), _describe(self.include[reference])
                if relation in ("right of", "below"):
                    subject, other, relation = other, subject, INVERSE_RELATION[relation]
                return f"{self.tag}:{subject}|{relation}|{other}"
        return f"{self.tag}:" + "|".join(sorted(_describe(req) for req in self.include))

    def to_geneval(self) -> dict[str, Any]:
        """A record for GenEval's metadata.jsonl."""
        record: dict[str, Any] = {"tag": self.tag, "include": [req.to_geneval() for req in self.include]}
        if self.tag == "counting":
            record["exclude"] = [{"class": req.shape, "count": req.count + 1} for req in self.include]
        record["prompt"] = self.prompt
        return record

    @classmethod
    def from_geneval(cls, record: dict[str, Any]) -> PromptSpec:
        include = tuple(
            ObjectRequirement(
                shape=entry["class"],
                count=int(entry.get("count", 1)),
                color=entry.get("color"),
                position=tuple(entry["position"]) if entry.get("position") else None,
                cell=tuple(entry["cell"]) if entry.get("cell") else None,
            )
            for entry in record["include"]
        )
        spec = cls(record["tag"], include)
        if "prompt" in record and record["prompt"] != spec.prompt:
            raise ValueError(f"record prompt {record['prompt']!r} is not the shapes phrasing {spec.prompt!r}")
        return spec


def _describe(req: ObjectRequirement) -> str:
    where = "" if req.cell is None else f" @{req.cell[0]}{req.cell[1]}"
    return f"{req.count} {req.color or 'any'} {req.shape}{where}"
