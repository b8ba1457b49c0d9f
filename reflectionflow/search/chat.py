"""OpenAI-compatible chat calls for the API backends: bounded concurrency, retries, accounting, no secrets.

Transport faults (429, 5xx, timeouts, dropped connections) are retried by the `openai` client itself with
its exponential backoff (`max_retries`, honouring `Retry-After`); every HTTP attempt is counted. A
malformed answer (a body that is not a chat completion, e.g. a proxy's HTML error page served with 200, or
text the caller's `parse` rejects) is asked again up to `parse_retries` times and then returned as a
failure carrying the raw text, so one bad answer never ends a run. Every text kept (answer, raw body,
error) is cut to `max_answer_chars`, counted in `Usage.truncated`: a misbehaving server can send
megabytes whatever `max_tokens` says. Errors no retry can fix (bad key, unknown model or route) raise
`FatalAPIError`.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import openai
from openai.types.chat import ChatCompletion
from PIL import Image

from reflectionflow.search.budget import Usage
from reflectionflow.search.errors import FatalAPIError
from reflectionflow.search.secrets import read_api_key

T = TypeVar("T")
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


@dataclass
class ChatAnswer(Generic[T]):
    """A parsed answer, or (ok=False) the raw text / error of the last attempt."""

    value: T | None
    ok: bool
    raw: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)


def image_part(image: Image.Image, detail: str = "auto") -> dict[str, Any]:
    """A chat content part carrying `image` as a PNG data URL (what OpenAI, vLLM and LLaMA-Factory accept)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def _attempts_of(error: openai.APIError) -> int:
    """HTTP attempts behind a failed call: the client stamps its retry count on every request it sends."""
    try:
        return int(error.request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, ValueError):
        return 1


def _completion(response) -> ChatCompletion:
    """The parsed body; ValueError when it is no chat completion: the client hands back the bare text of
    a non-JSON content type (a proxy's HTML error page served with status 200)."""
    completion = response.parse()
    if not isinstance(completion, ChatCompletion):
        content_type = response.http_response.headers.get("content-type", "none")
        raise ValueError(f"not a chat completion (content type {content_type})")
    return completion


class OpenAIChat:
    """One model behind an OpenAI-compatible endpoint (`base_url=None` = api.openai.com).

    The key is read from `$api_key_env` when the object is built, so a missing key fails before any
    model loads; it lives only in memory and is scrubbed from any raw text this class returns.
    """

    def __init__(
        self,
        model: str = "gpt-4o",
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        max_retries: int = 4,
        parse_retries: int = 2,
        timeout: float = 60.0,
        temperature: float | None = 0.0,
        max_tokens: int | None = 1024,
        image_detail: str = "auto",
        extra_body: dict[str, Any] | None = None,
        max_answer_chars: int = 16_000,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        self.model = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.parse_retries = parse_retries
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.image_detail = image_detail
        self.extra_body = dict(extra_body or {})
        self.max_concurrency = max_concurrency
        self.max_answer_chars = max_answer_chars
        self._key = read_api_key(api_key_env)
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIChat(model={self.model!r}, base_url={self.base_url!r})"

    def image(self, image: Image.Image) -> dict[str, Any]:
        return image_part(image, self.image_detail)

    def _bind(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """Client and concurrency slots of the running event loop (httpx pools cannot cross loops)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._client = openai.AsyncOpenAI(
                api_key=self._key or "EMPTY",
                base_url=self.base_url,
                max_retries=self.max_retries,
                timeout=self.timeout,
            )
            self._slots = asyncio.Semaphore(self.max_concurrency)
        return self._client, self._slots

    async def aclose(self) -> None:
        if self._loop is asyncio.get_running_loop():
            await self._client.close()
            self._loop = None

    def _kept(self, text: str | None, usage: Usage | None = None) -> str | None:
        """`text` as this class returns it: the key scrubbed, then cut to `max_answer_chars` (counted in
        `usage` when it is an answer, not an error message)."""
        if text and self._key:
            text = text.replace(self._key, "<redacted>")
        if text and len(text) > self.max_answer_chars:
            text = text[: self.max_answer_chars]
            if usage is not None:
                usage.truncated += 1
        return text

    async def ask(
        self,
        messages: list[dict[str, Any]],
        parse: Callable[[str], T],
        response_format: dict[str, Any] | None = None,
    ) -> ChatAnswer[T]:
        """Send `messages`; return `parse(answer text)`, asking again while `parse` raises ValueError."""
        client, slots = self._bind()
        usage = Usage(calls=1)
        request: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            request["temperature"] = self.temperature
        if self.max_tokens is not None:
            request["max_tokens"] = self.max_tokens
        if response_format is not None:
            request["response_format"] = response_format
        if self.extra_body:
            request["extra_body"] = self.extra_body
        async with slots:
            answer = await self._ask(client, request, parse, usage)
        usage.retries = usage.attempts - usage.calls
        if not answer.ok:
            usage.failures = 1
        answer.usage = usage
        return answer

    async def _ask(self, client, request, parse, usage: Usage) -> ChatAnswer:
        raw = error = None
        for _ in range(1 + self.parse_retries):
            try:
                response = await client.chat.completions.with_raw_response.create(**request)
            except _FATAL as err:
                message = self._kept(str(err))
                raise FatalAPIError(f"{self!r}: {type(err).__name__}: {message}") from None
            except openai.APIError as err:  # retries exhausted (or a 4xx no retry fixes): a failed answer
                usage.attempts += _attempts_of(err)
                body = getattr(err, "body", None)
                raw = self._kept(None if body is None else str(body), usage)
                return ChatAnswer(None, False, raw, self._kept(str(err)))
            usage.attempts += response.retries_taken + 1
            try:
                completion = _completion(response)
            except ValueError as err:  # the body is not the chat completion the server promised
                raw, error = (
                    self._kept(response.http_response.text, usage),
                    f"undecodable response body: {err}",
                )
                continue
            if completion.usage is not None:
                usage.tokens_in += completion.usage.prompt_tokens or 0
                usage.tokens_out += completion.usage.completion_tokens or 0
            raw = self._kept(completion.choices[0].message.content if completion.choices else None, usage)
            try:
                if not raw:
                    raise ValueError("empty answer")
                return ChatAnswer(parse(raw), True)
            except ValueError as err:
                error = f"malformed answer: {err}"
        return ChatAnswer(None, False, raw, error)
