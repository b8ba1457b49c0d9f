"""The texts we send to multimodal models: verifier aspects chosen by GenEval tag, the paper's per-tag
verifier rubric, reflector and refiner message templates, and how an evaluation is described to them."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

ASPECTS: dict[str, str] = {
    "object_presence": "every object the prompt names is present, complete and recognisable",
    "count": "each object appears exactly as many times as the prompt says, no more and no fewer",
    "color": "each object has the colour the prompt gives it",
    "position": "the objects are placed relative to each other as the prompt says (left of, right of, above, below)",
    "color_attribution": "each colour belongs to the object the prompt attaches it to; colours are not swapped or shared",
    "attributes": "colours, sizes, materials and other attributes match the prompt",
    "spatial_relations": "the layout and relations between objects match the prompt",
    "overall": "how well the image as a whole matches the prompt",
}

# GenEval tags -> aspects that decide GenEval's verdict; "overall" is always added.
ASPECTS_BY_TAG: dict[str, tuple[str, ...]] = {
    "single_object": ("object_presence",),
    "two_object": ("object_presence",),
    "counting": ("object_presence", "count"),
    "colors": ("object_presence", "color"),
    "position": ("object_presence", "position"),
    "color_attr": ("object_presence", "color_attribution"),
}
GENERIC_ASPECTS = ("object_presence", "count", "attributes", "spatial_relations")

VERIFIER_SYSTEM = (
    "You are a strict judge of text-to-image results. You look at one generated image and the prompt it was "
    "generated from, and rate how faithfully the image follows the prompt. Judge only what is visible. For each "
    "aspect, first explain briefly what you see, then give an integer score from 0 (completely wrong) to 10 "
    "(perfect). Answer with a single JSON object and nothing else."
)

NO_CHANGE = "No change needed."
"""What a reflector answers when the image already matches its prompt (accepted as is, never retried)."""

REFLECTOR_SYSTEM = (
    "You review images made by a text-to-image model. Given the prompt, the image, the prompt and reflection "
    "the image was made from, and an evaluation of the image, write a reflection: a few short imperative "
    "instructions that would turn this image into one that matches the prompt exactly, for example 'Change "
    "the car's colour to red.', 'Add a second dog on the left.', 'Move the cup above the book.', 'Remove the "
    "extra chair.'. Mention only what must change, most important first, at most four instructions. Answer "
    f"with the instructions only; if the image already matches the prompt exactly, answer '{NO_CHANGE}'"
)

REFINER_SYSTEM = (
    "You improve prompts for a text-to-image model. Given the goal prompt, the prompt that produced the image, "
    "the image, its evaluation and the instructions for fixing it, write a new prompt that makes the model more "
    "likely to produce an image that matches the goal prompt exactly. Keep every object, count, colour and "
    "spatial relation of the goal prompt; make the problematic ones explicit and unambiguous; do not add "
    "objects the goal prompt does not ask for. Answer with the new prompt only, in one line."
)


def aspects_for(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The aspects to rate for a prompt: chosen by its GenEval tag, plus `overall`."""
    return (*ASPECTS_BY_TAG.get(str(meta.get("tag", "")), GENERIC_ASPECTS), "overall")


def _object_phrase(spec: Mapping[str, Any]) -> str:
    count = spec.get("count", 1)
    color = f"{spec['color']} " if spec.get("color") else ""
    where = ""
    if spec.get("position"):
        relation, anchor = spec["position"]
        where = f" ({relation} object #{anchor + 1})"
    return f"{count} x {color}{spec.get('class', 'object')}{where}"


def expectations(meta: Mapping[str, Any]) -> str:
    """GenEval's object spec in words, so the judge checks exactly what GenEval will check."""
    lines = []
    for number, spec in enumerate(meta.get("include", []), start=1):
        lines.append(f"object #{number}: {_object_phrase(spec)}")
    for spec in meta.get("exclude", []):
        lines.append(f"must NOT show {spec.get('count', 1)} or more x {spec.get('class', 'object')}")
    return "\n".join(lines)


def verifier_request(prompt: str, meta: Mapping[str, Any], *, structured: bool) -> str:
    aspects = aspects_for(meta)
    lines = [f'Prompt: "{prompt}"']
    if spec := expectations(meta):
        lines += ["Expected content:", spec]
    lines.append("Rate these aspects:")
    lines += [f"- {name}: {ASPECTS[name]}" for name in aspects]
    if not structured:
        keys = ", ".join(f'"{name}": {{"explanation": "...", "score": 0-10}}' for name in aspects)
        lines.append(f"Answer with JSON of exactly this shape: {{{keys}}}")
    return "\n".join(lines)


def verifier_schema(
    aspects: tuple[str, ...], order: tuple[str, str] = ("explanation", "score")
) -> dict[str, Any]:
    """Strict JSON schema (OpenAI structured outputs): per aspect an explanation and an integer score, in
    `order` (ours: explain, then score; the paper's pydantic model: score, then explanation)."""
    kinds = {"explanation": {"type": "string"}, "score": {"type": "integer"}}
    rating = {
        "type": "object",
        "properties": {name: kinds[name] for name in order},
        "required": list(order),
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {name: rating for name in aspects},
        "required": list(aspects),
        "additionalProperties": False,
    }


def describe_evaluation(details: Mapping[str, Any] | None, value: float | None) -> str:
    """An evaluation as text for the reflector and refiner (per-aspect lines when the verifier gave them)."""
    if not details and value is None:
        return "No evaluation is available."
    aspects = (details or {}).get("aspects")
    if aspects:
        return "\n".join(
            f"- {name}: {rating['score']}/10. {rating.get('explanation', '')}".rstrip()
            for name, rating in aspects.items()
        )
    return f"Overall match score: {value:.2f} (0 = no match, 1 = perfect)."


def evaluation_json(details: Mapping[str, Any] | None, value: float | None) -> str:
    """An evaluation as the paper hands it to its reflector and refiner: the verifier's answer as JSON
    (`{aspect: {score, explanation}}`), or the score details of a verifier without aspects."""
    if not details and value is None:
        return "{}"
    aspects = (details or {}).get("aspects")
    return json.dumps(aspects if aspects else {**(details or {}), "value": value})


# --- message templates ----------------------------------------------------------------------------------
IMAGE = "<image>"
"""Marks the image's place among a template's content parts; every other part is a text part."""

REFLECTOR_FIELDS = ("prompt", "image_prompt", "image_reflection", "evaluation")
"""What a reflector template can use: the original prompt, the prompt and reflection the image was made
from (the reflection is "(none)" for a base-model image), the verifier's evaluation of the image."""
REFINER_FIELDS = ("goal", "prompt", "reflection", "evaluation")
"""What a refiner template can use: the original (goal) prompt, the prompt that produced the image, the
reflection just written on it ("(none)" without one), the verifier's evaluation."""

REFLECTOR_CONTENT = (
    'Prompt: "{prompt}"\nThe image was generated from: "{image_prompt}"\nReflection it was corrected '
    "with: {image_reflection}\nEvaluation of the image:\n{evaluation}\nWrite the reflection.",
    IMAGE,
)
REFINER_CONTENT = (
    'Goal prompt: "{goal}"\nPrompt that produced the image: "{prompt}"\nEvaluation of the image:\n'
    "{evaluation}\nInstructions for fixing it: {reflection}\nWrite the new prompt.",
    IMAGE,
)


@dataclass(frozen=True)
class MessageTemplate:
    """A chat request about one image: the system text and the user content parts in order, text parts
    with `{field}` placeholders from `fields` and the image where `IMAGE` stands (exactly once)."""

    system: str
    content: tuple[str, ...]
    fields: tuple[str, ...]

    def __post_init__(self) -> None:
        if list(self.content).count(IMAGE) != 1:
            raise ValueError(f"a message template needs {IMAGE!r} exactly once among its content parts")
        for part in (self.system, *self.content):
            for _, name, _, _ in string.Formatter().parse(part):
                if name is not None and name not in self.fields:
                    raise ValueError(f"unknown placeholder {{{name}}} in a message template; use {self.fields}")

    def messages(self, image_part: dict[str, Any], **context: str) -> list[dict[str, Any]]:
        content = [
            image_part if part == IMAGE else {"type": "text", "text": part.format(**context)}
            for part in self.content
        ]
        return [
            {"role": "system", "content": self.system.format(**context)},
            {"role": "user", "content": content},
        ]


def message_template(
    system: str | None, content: Sequence[str] | None, default_system: str, default_content: tuple[str, ...],
    fields: tuple[str, ...],
) -> MessageTemplate:
    """A configured template; None parts take the built-in ones."""
    return MessageTemplate(
        default_system if system is None else system,
        default_content if content is None else tuple(content),
        fields,
    )


# --- the paper's GenEval verifier rubric -----------------------------------------------------------------
@cache
def paper_rubrics() -> dict[str, Any]:
    """`reflectionflow/assets/paper_verifier_rubrics.json`: per GenEval tag the paper's three aspects."""
    return json.loads(resources.files("reflectionflow.assets").joinpath("paper_verifier_rubrics.json").read_text())


PAPER_OVERALL = "overall_score"


def paper_verifier_aspects(tag: str) -> tuple[str, ...] | None:
    """The paper's aspects for a GenEval tag, `overall_score` last (None: a tag the rubric has no entry for)."""
    aspects = paper_rubrics()["tags"].get(tag)
    return None if aspects is None else (*aspects, PAPER_OVERALL)


def paper_verifier_system(tag: str) -> str:
    """The system message of the paper's verifier for a GenEval tag: the task, the answer's keys, each
    aspect's criterion and scale, then the overall score."""
    rubric = paper_rubrics()
    aspects = paper_verifier_aspects(tag)
    keys = ", ".join(f"`{name}`" for name in aspects)
    lines = [rubric["intro"].format(keys=keys), ""]
    lines += [f"{name}: {text}" for name, text in rubric["tags"][tag].items()]
    lines.append(rubric["overall"])
    return "\n".join(lines)
