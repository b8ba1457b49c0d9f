"""The texts we send to multimodal models: verifier aspects chosen by GenEval tag, reflector and refiner
instructions, and how an evaluation is described to the reflector."""

from __future__ import annotations

from collections.abc import Mapping
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

REFLECTOR_SYSTEM = (
    "You review images made by a text-to-image model. Given the prompt, the image and an evaluation of the "
    "image, write a reflection: a few short imperative instructions that would turn this image into one that "
    "matches the prompt exactly, for example 'Change the car's colour to red.', 'Add a second dog on the "
    "left.', 'Move the cup above the book.', 'Remove the extra chair.'. Mention only what must change, most "
    "important first, at most four instructions. Answer with the instructions only."
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


def verifier_schema(aspects: tuple[str, ...]) -> dict[str, Any]:
    """Strict JSON schema (OpenAI structured outputs): explanation before score, per aspect."""
    rating = {
        "type": "object",
        "properties": {"explanation": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["explanation", "score"],
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


def reflector_request(prompt: str, evaluation: str) -> str:
    return f'Prompt: "{prompt}"\nEvaluation of the image:\n{evaluation}\nWrite the reflection.'


def refiner_request(goal: str, current: str, evaluation: str, reflection: str | None) -> str:
    fix = reflection or "(none given)"
    return (
        f'Goal prompt: "{goal}"\nPrompt that produced the image: "{current}"\n'
        f"Evaluation of the image:\n{evaluation}\nInstructions for fixing it: {fix}\nWrite the new prompt."
    )
