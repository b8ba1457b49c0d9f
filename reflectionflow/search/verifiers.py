"""Verifiers: `await verifier.score(images, prompt, meta) -> list[Score]`, higher `value` = better match.

Backends: `OpenAIVerifier` (any OpenAI-compatible chat API with images; per-aspect JSON ratings chosen by
the GenEval tag in `meta`), `PaperRubricVerifier` (the paper's GPT-4o verifier: its per-tag rubric, ranked
by `overall_score`), `reflectionflow.search.vlm.VLMVerifier` (P("yes") of a local vision-language model),
`reflectionflow.search.nvila.RemoteCodeYesNoVerifier` (NVILA-style remote-code yes/no verifiers) and
`DeterministicVerifier` (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from PIL import Image

from reflectionflow.search.budget import Usage
from reflectionflow.search.chat import OpenAIChat
from reflectionflow.search.errors import SetupError
from reflectionflow.search.instructions import (
    PAPER_OVERALL,
    VERIFIER_SYSTEM,
    aspects_for,
    paper_rubrics,
    paper_verifier_aspects,
    paper_verifier_system,
    verifier_request,
    verifier_schema,
)


@dataclass
class Score:
    """A verdict on one image. Failed verdicts (ok=False) keep the raw answer and rank below every ok one."""

    value: float
    details: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    raw: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def rank(self) -> tuple[bool, float]:
        return (self.ok, self.value)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"value": self.value, "ok": self.ok, "details": self.details}
        if not self.ok:
            data.update(raw=self.raw, error=self.error)
        return data


class Verifier(Protocol):
    async def score(
        self, images: Sequence[Image.Image], prompt: str, meta: Mapping[str, Any]
    ) -> list[Score]: ...


def _json_object(text: str) -> dict[str, Any]:
    """The JSON object in a model's answer, tolerating a Markdown code fence around it."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_ratings(text: str, aspects: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`{aspect: {"score": int 0-10, "explanation": str}}` from an answer; ValueError if anything is off."""
    obj = _json_object(text)
    ratings = {}
    for name in aspects:
        rating = obj.get(name)
        if not isinstance(rating, dict) or isinstance(rating.get("score"), bool):
            raise ValueError(f"aspect {name!r} missing or not an object")
        score = rating.get("score")
        if not isinstance(score, int | float) or not 0 <= score <= 10:
            raise ValueError(f"aspect {name!r}: score {score!r} is not a number in [0, 10]")
        ratings[name] = {"score": score, "explanation": str(rating.get("explanation", ""))}
    return ratings


class OpenAIVerifier:
    """Rates each image on GenEval-tag aspects (0-10) through a chat model; value = mean rating / 10.

    `structured=True` sends a strict JSON schema (`response_format=json_schema`, as OpenAI and vLLM
    support); `False` describes the JSON shape in the prompt for servers without guided decoding.
    """

    def __init__(self, chat: OpenAIChat, structured: bool = True):
        self.chat = chat
        self.structured = structured

    async def score(self, images: Sequence[Image.Image], prompt: str, meta: Mapping[str, Any]) -> list[Score]:
        return list(await asyncio.gather(*(self._score(image, prompt, meta) for image in images)))

    async def _score(self, image: Image.Image, prompt: str, meta: Mapping[str, Any]) -> Score:
        aspects = aspects_for(meta)
        messages = [
            {"role": "system", "content": VERIFIER_SYSTEM},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": verifier_request(prompt, meta, structured=self.structured)},
                    self.chat.image(image),
                ],
            },
        ]
        response_format = None
        if self.structured:
            schema = verifier_schema(aspects)
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "image_evaluation", "schema": schema, "strict": True},
            }
        answer = await self.chat.ask(messages, partial(parse_ratings, aspects=aspects), response_format)
        if not answer.ok:
            return Score(0.0, ok=False, raw=answer.raw, error=answer.error, usage=answer.usage)
        ratings = answer.value
        value = sum(r["score"] for r in ratings.values()) / (10 * len(ratings))
        return Score(value, {"aspects": ratings}, usage=answer.usage)

    async def aclose(self) -> None:
        await self.chat.aclose()


class PaperRubricVerifier:
    """ReflectionFlow's GPT-4o verifier for GenEval prompts (`tts/verifiers/openai_verifier.py` with
    `geneval_detailed_verifier_prompt.json`): the system message is the rubric of the prompt's GenEval tag
    (three aspects and `overall_score`, each 0-10; `reflectionflow/assets/paper_verifier_rubrics.json`), the
    user message the bare prompt then the image, the answer `{aspect: {score, explanation}}` through a strict
    JSON schema (score first, as the paper's pydantic model), and value = overall_score / 10. Model and
    temperature are the chat's (`verifier=openai_paper`: gpt-4o-2024-11-20 at temperature 1)."""

    def __init__(self, chat: OpenAIChat):
        self.chat = chat

    async def score(self, images: Sequence[Image.Image], prompt: str, meta: Mapping[str, Any]) -> list[Score]:
        return list(await asyncio.gather(*(self._score(image, prompt, meta) for image in images)))

    async def _score(self, image: Image.Image, prompt: str, meta: Mapping[str, Any]) -> Score:
        tag = str(meta.get("tag"))
        aspects = paper_verifier_aspects(tag)
        if aspects is None:
            raise SetupError(
                f"verifier=openai_paper rates GenEval prompts by tag; {prompt!r} has tag {meta.get('tag')!r}, "
                f"not one of {sorted(paper_rubrics()['tags'])}; use verifier=openai for other prompts"
            )
        messages = [
            {"role": "system", "content": paper_verifier_system(tag)},
            {"role": "user", "content": [{"type": "text", "text": prompt}, self.chat.image(image)]},
        ]
        schema = verifier_schema(aspects, order=("score", "explanation"))
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": f"grading_{tag}", "schema": schema, "strict": True},
        }
        answer = await self.chat.ask(messages, partial(parse_ratings, aspects=aspects), response_format)
        if not answer.ok:
            return Score(0.0, ok=False, raw=answer.raw, error=answer.error, usage=answer.usage)
        ratings = answer.value
        return Score(ratings[PAPER_OVERALL]["score"] / 10, {"aspects": ratings}, usage=answer.usage)

    async def aclose(self) -> None:
        await self.chat.aclose()


class DeterministicVerifier:
    """A stable pseudo-random score in [0, 1) per (image pixels, prompt): distinct, repeatable, free."""

    async def score(self, images: Sequence[Image.Image], prompt: str, meta: Mapping[str, Any]) -> list[Score]:
        scores = []
        for image in images:
            digest = hashlib.sha256(image.tobytes() + prompt.encode()).digest()
            value = int.from_bytes(digest[:6], "little") / 2**48
            scores.append(Score(value, {"hash_score": value}, usage=Usage(calls=1, attempts=1)))
        return scores
