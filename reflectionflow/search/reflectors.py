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
    REFINER_SYSTEM,
    REFLECTOR_SYSTEM,
    describe_evaluation,
    refiner_request,
    reflector_request,
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
        self, image: Image.Image, prompt: str, evaluation: Score, meta: Mapping[str, Any]
    ) -> TextAnswer: ...


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


def parse_reflection(text: str) -> str:
    reflection = _strip_quotes(text)
    if not reflection:
        raise ValueError("empty reflection")
    return reflection


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


def _evaluation_text(evaluation: Score) -> str:
    return (
        describe_evaluation(evaluation.details, evaluation.value)
        if evaluation.ok
        else "No evaluation is available."
    )


async def _ask_about_image(chat: OpenAIChat, system: str, text: str, image: Image.Image, parse) -> TextAnswer:
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": text}, chat.image(image)]},
    ]
    return TextAnswer.from_chat(await chat.ask(messages, parse))


class OpenAIReflector:
    def __init__(self, chat: OpenAIChat):
        self.chat = chat

    async def reflect(
        self, image: Image.Image, prompt: str, evaluation: Score, meta: Mapping[str, Any]
    ) -> TextAnswer:
        text = reflector_request(prompt, _evaluation_text(evaluation))
        return await _ask_about_image(self.chat, REFLECTOR_SYSTEM, text, image, parse_reflection)

    async def aclose(self) -> None:
        await self.chat.aclose()


class OpenAIPromptRefiner:
    def __init__(self, chat: OpenAIChat):
        self.chat = chat

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
        text = refiner_request(goal, prompt, _evaluation_text(evaluation), reflection)
        return await _ask_about_image(self.chat, REFINER_SYSTEM, text, image, parse_prompt)

    async def aclose(self) -> None:
        await self.chat.aclose()


class DeterministicReflector:
    """A fixed-form reflection that depends on the score, so different images get different reflections."""

    async def reflect(
        self, image: Image.Image, prompt: str, evaluation: Score, meta: Mapping[str, Any]
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
