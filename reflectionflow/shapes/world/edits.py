"""Scene edits and their one-sentence imperative phrasing, both ways (GenRef-style reflections).

Remove the red circle on the left.      Remove one triangle.
Change the green circle to red.         Change the red square to a circle.
Add one blue square on the right.       Add one blue triangle to the left of the green circle.
Move the red circle to the left of the blue square.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reflectionflow.shapes.world.vocabulary import COLORS, LOCATIONS, SHAPES

RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}


@dataclass(frozen=True)
class ObjectRef:
    """How a sentence names an object: 'the red circle on the left', 'one square', 'the red shape'."""

    shape: str | None  # None: an object of unknown shape ('shape')
    color: str | None = None  # None: colour not named, any will do
    cell: tuple[int, int] | None = None  # named by its location when its description is not unique
    any_one: bool = False  # 'one square': whichever matches

    def text(self) -> str:
        words = ["one" if self.any_one else "the", self.color, self.shape or "shape"]
        if self.cell is not None:
            words.append(LOCATIONS[self.cell])
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Remove:
    target: ObjectRef


@dataclass(frozen=True)
class Change:
    target: ObjectRef
    shape: str | None = None  # None: keep
    color: str | None = None  # None: keep


@dataclass(frozen=True)
class Add:
    shape: str
    color: str | None = None  # None: any colour
    cell: tuple[int, int] | None = None  # 'on the right' ...
    relation: str | None = None  # ... or 'to the left of' `anchor`
    anchor: ObjectRef | None = None


@dataclass(frozen=True)
class Move:
    target: ObjectRef
    relation: str
    anchor: ObjectRef


Edit = Remove | Change | Add | Move


def edit_text(edit: Edit) -> str:
    if isinstance(edit, Remove):
        return f"Remove {edit.target.text()}."
    if isinstance(edit, Change):
        if edit.shape is None:
            return f"Change {edit.target.text()} to {edit.color}."
        return f"Change {edit.target.text()} to {_a(edit.color, edit.shape)}."
    if isinstance(edit, Add):
        what = " ".join(w for w in ("Add one", edit.color, edit.shape) if w)
        if edit.anchor is None:
            return f"{what} {LOCATIONS[edit.cell]}."
        return f"{what} {RELATION_PHRASES[edit.relation]} {edit.anchor.text()}."
    return f"Move {edit.target.text()} {RELATION_PHRASES[edit.relation]} {edit.anchor.text()}."


def reflection_text(edits: list[Edit]) -> str:
    return " ".join(edit_text(edit) for edit in edits)


def parse_reflection(text: str) -> list[Edit]:
    """The edits a reflection written by `edit_text` asks for; any other sentence is an error."""
    edits = []
    for sentence in re.split(r"(?<=\.)\s+", text.strip()):
        if sentence:
            edits.append(_parse_sentence(sentence))
    return edits


def _a(*words: str | None) -> str:
    phrase = " ".join(w for w in words if w)
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR = _alternatives(COLORS)
_SHAPE = _alternatives(SHAPES)
_LOCATION = _alternatives(LOCATIONS.values())
_RELATION = _alternatives(RELATION_PHRASES.values())


def _ref(name: str) -> str:
    return (
        rf"(?P<{name}_article>the|one) (?:(?P<{name}_color>{_COLOR}) )?(?P<{name}_shape>{_SHAPE}|shape)"
        rf"(?: (?P<{name}_location>{_LOCATION}))?"
    )


_SENTENCES = {
    "remove": re.compile(rf"Remove {_ref('target')}\."),
    "change": re.compile(
        rf"Change {_ref('target')} to (?:(?P<color_only>{_COLOR})|an? (?:(?P<color>{_COLOR}) )?(?P<shape>{_SHAPE}))\."
    ),
    "add": re.compile(
        rf"Add one (?:(?P<color>{_COLOR}) )?(?P<shape>{_SHAPE}) (?:(?P<location>{_LOCATION})|(?P<relation>{_RELATION}) {_ref('anchor')})\."
    ),
    "move": re.compile(rf"Move {_ref('target')} (?P<relation>{_RELATION}) {_ref('anchor')}\."),
}
_CELL_OF_LOCATION = {phrase: cell for cell, phrase in LOCATIONS.items()}
_RELATION_OF_PHRASE = {phrase: relation for relation, phrase in RELATION_PHRASES.items()}


def _parse_sentence(sentence: str) -> Edit:
    for kind, pattern in _SENTENCES.items():
        match = pattern.fullmatch(sentence)
        if match is None:
            continue
        g = match.groupdict()
        if kind == "remove":
            return Remove(_parsed_ref(g, "target"))
        if kind == "change":
            return Change(_parsed_ref(g, "target"), g["shape"], g["color_only"] or g["color"])
        if kind == "add":
            if g["location"]:
                return Add(g["shape"], g["color"], cell=_CELL_OF_LOCATION[g["location"]])
            return Add(
                g["shape"],
                g["color"],
                relation=_RELATION_OF_PHRASE[g["relation"]],
                anchor=_parsed_ref(g, "anchor"),
            )
        return Move(_parsed_ref(g, "target"), _RELATION_OF_PHRASE[g["relation"]], _parsed_ref(g, "anchor"))
    raise ValueError(f"cannot parse reflection sentence {sentence!r}")


def _parsed_ref(groups: dict[str, str | None], name: str) -> ObjectRef:
    shape = groups[f"{name}_shape"]
    location = groups[f"{name}_location"]
    return ObjectRef(
        shape=None if shape == "shape" else shape,
        color=groups[f"{name}_color"],
        cell=_CELL_OF_LOCATION[location] if location else None,
        any_one=groups[f"{name}_article"] == "one",
    )
