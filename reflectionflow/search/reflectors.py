"""Reflectors (image, prompt, evaluation -> imperative edit instructions) and prompt refiners
(image, prompt, evaluation, reflection -> new prompt).

`OpenAIReflector` / `OpenAIPromptRefiner` work with GPT-4o or any OpenAI-compatible server, e.g. a locally
hosted Qwen2.5-VL reflection model (`chat.base_url=http://host:8000/v1`). Deterministic backends serve tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from reflectionflow.search.budget import Usage
from reflectionflow.search.chat import ChatAnswer, OpenAIChat
from reflectionflow.search.instructions import (
    NO_CHANGE,
    REFINER_CONTENT,
    REFINER_FIELDS,
    REFINER_SYSTEM,
    REFLECTOR_CONTENT,
    REFLECTOR_FIELDS,
    REFLECTOR_SYSTEM,
    describe_evaluation,
    evaluation_json,
    message_template,
)
from reflectionflow.search.verifiers import Score


@dataclass
class TextAnswer:
    """A reflection or refined prompt; on failure (ok=False) `text` is None and the raw answer is kept."""

    text: str | None
    ok: bool = True
    raw: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def from_chat(cls, answer: ChatAnswer[str]) -> TextAnswer:
        return cls(answer.value, answer.ok, None if answer.ok else answer.raw, answer.error, answer.usage)


class Reflector(Protocol):
    async def reflect(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        meta: Mapping[str, Any],
        *,
        image_prompt: str | None = None,
        image_reflection: str | None = None,
    ) -> TextAnswer:
        """Edit instructions for `image` against the original `prompt`; `image_prompt` / `image_reflection`:
        the prompt and reflection the image was made from (None: unknown, or a base-model image)."""
        ...


class PromptRefiner(Protocol):
    async def refine(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        reflection: str | None,
        *,
        goal: str,
        meta: Mapping[str, Any],
    ) -> TextAnswer: ...


def _strip_quotes(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _is_no_change(text: str) -> bool:
    return text.strip().strip(".!").lower() == NO_CHANGE.strip(".").lower()


def parse_reflection(text: str) -> str:
    """The reflection without surrounding quotes; an explicit "no change needed" is `NO_CHANGE`."""
    reflection = _strip_quotes(text)
    if not reflection:
        raise ValueError("empty reflection")
    return NO_CHANGE if _is_no_change(reflection) else reflection


def parse_prompt(text: str) -> str:
    """The first non-empty line, without a `New prompt:` style label or quotes."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    head, sep, tail = line.partition(":")
    if sep and head.strip().lower() in {"prompt", "new prompt", "refined prompt", "improved prompt"}:
        line = tail
    prompt = _strip_quotes(line)
    if not prompt:
        raise ValueError("empty prompt")
    return prompt


def parse_whole_prompt(text: str) -> str:
    """The whole answer as the prompt (the paper's refiner uses its answer verbatim), quotes stripped."""
    prompt = _strip_quotes(text)
    if not prompt:
        raise ValueError("empty prompt")
    return prompt


PROMPT_PARSERS = {"first_line": parse_prompt, "whole": parse_whole_prompt}
EVALUATION_FORMATS = ("text", "json")


def _evaluation(evaluation: Score, form: str) -> str:
    """The verifier's verdict as the reflector / refiner reads it: `text` (per-aspect lines) or `json` (the
    verifier's answer, as the paper passes it)."""
    if not evaluation.ok:
        return "No evaluation is available."
    if form == "json":
        return evaluation_json(evaluation.details, evaluation.value)
    return describe_evaluation(evaluation.details, evaluation.value)


def _check(key: str, value: str, options) -> None:
    if value not in options:
        raise ValueError(f"{key}={value!r}; expected one of {tuple(options)}")


class OpenAIReflector:
    """Reflections from a chat model, in a configurable message layout (`system`, `content`: text parts with
    `{prompt}`, `{image_prompt}`, `{image_reflection}`, `{evaluation}` and the image's place; None = ours).
    `reflector=reflection_generator` replays the format the paper's fine-tuned reflection model was trained
    on; our default also shows the prompt and reflection that produced the image and the evaluation."""

    def __init__(
        self,
        chat: OpenAIChat,
        system: str | None = None,
        content: list[str] | None = None,
        evaluation: str = "text",
    ):
        _check("reflector.evaluation", evaluation, EVALUATION_FORMATS)
        self.chat = chat
        self.template = message_template(system, content, REFLECTOR_SYSTEM, REFLECTOR_CONTENT, REFLECTOR_FIELDS)
        self.evaluation = evaluation

    async def reflect(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        meta: Mapping[str, Any],
        *,
        image_prompt: str | None = None,
        image_reflection: str | None = None,
    ) -> TextAnswer:
        messages = self.template.messages(
            self.chat.image(image),
            prompt=prompt,
            image_prompt=image_prompt or prompt,
            image_reflection=image_reflection or "(none)",
            evaluation=_evaluation(evaluation, self.evaluation),
        )
        return TextAnswer.from_chat(await self.chat.ask(messages, parse_reflection))

    async def aclose(self) -> None:
        await self.chat.aclose()


class OpenAIPromptRefiner:
    """Prompt refinement by a chat model, in a configurable message layout (`system`, `content`: text parts
    with `{goal}`, `{prompt}`, `{reflection}`, `{evaluation}` and the image's place; None = ours); `answer`:
    `first_line` (ours: one prompt line) or `whole` (the paper's: the answer verbatim)."""

    def __init__(
        self,
        chat: OpenAIChat,
        system: str | None = None,
        content: list[str] | None = None,
        evaluation: str = "text",
        answer: str = "first_line",
    ):
        _check("refiner.evaluation", evaluation, EVALUATION_FORMATS)
        _check("refiner.answer", answer, PROMPT_PARSERS)
        self.chat = chat
        self.template = message_template(system, content, REFINER_SYSTEM, REFINER_CONTENT, REFINER_FIELDS)
        self.evaluation = evaluation
        self.parse = PROMPT_PARSERS[answer]

    async def refine(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        reflection: str | None,
        *,
        goal: str,
        meta: Mapping[str, Any],
    ) -> TextAnswer:
        messages = self.template.messages(
            self.chat.image(image),
            goal=goal,
            prompt=prompt,
            reflection=reflection or "(none)",
            evaluation=_evaluation(evaluation, self.evaluation),
        )
        return TextAnswer.from_chat(await self.chat.ask(messages, self.parse))

    async def aclose(self) -> None:
        await self.chat.aclose()


class DeterministicReflector:
    """A fixed-form reflection that depends on the score, so different images get different reflections."""

    async def reflect(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        meta: Mapping[str, Any],
        *,
        image_prompt: str | None = None,
        image_reflection: str | None = None,
    ) -> TextAnswer:
        text = f"Fix what keeps the image from matching the prompt (score {evaluation.value:.3f}). Keep the rest."
        return TextAnswer(text, usage=Usage(calls=1, attempts=1))


class DeterministicPromptRefiner:
    """Rewrites the goal prompt with the reflection attached (never grows across rounds)."""

    async def refine(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        reflection: str | None,
        *,
        goal: str,
        meta: Mapping[str, Any],
    ) -> TextAnswer:
        text = f"{goal}, precisely as described" + (f"; {reflection}" if reflection else "")
        return TextAnswer(text, usage=Usage(calls=1, attempts=1))
