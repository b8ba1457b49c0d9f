"""A loopback OpenAI-compatible `/v1/chat/completions` server with scripted answers, latency and faults.

Tests and benchmarks drive the real `openai` client against it. It listens on 127.0.0.1 only, handles a
bounded number of requests at once, and shuts itself down after `lifetime` seconds even if a test forgets.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("401", "429", "500", "html_page", "malformed_body", "malformed_content", "timeout")
# what a reverse proxy serves, with status 200, when the model server behind it is down
HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"

Responder = Callable[[dict], str]


def fill_schema(schema: dict, seed: str) -> Any:
    """A value satisfying a (strict, OpenAI-style) JSON schema; numbers are a stable function of `seed`."""
    kind = schema.get("type")
    if kind == "object":
        return {
            name: fill_schema(sub, f"{seed}/{name}") for name, sub in schema.get("properties", {}).items()
        }
    if kind == "array":
        return [fill_schema(schema["items"], f"{seed}/0")]
    if kind in ("integer", "number"):
        low, high = schema.get("minimum", 0), schema.get("maximum", 10)
        digest = int(hashlib.sha256(seed.encode()).hexdigest(), 16)
        return low + digest % (int(high - low) + 1)
    if kind == "boolean":
        return True
    if "enum" in schema:
        return schema["enum"][0]
    return "looks fine"


def image_urls(body: dict) -> list[str]:
    """Every image URL in a chat request, in order."""
    return [
        part["image_url"]["url"]
        for message in body.get("messages", [])
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


def default_responder(body: dict) -> str:
    """Structured requests get a schema-valid JSON object seeded by the image; others a fixed reflection."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        seed = hashlib.sha256("".join(image_urls(body)).encode()).hexdigest()
        return json.dumps(fill_schema(response_format["json_schema"]["schema"], seed))
    return "Make the main object larger. Change the background to plain white."


@dataclass
class Request:
    """What the server saw: the JSON body, the Authorization header and the fault it answered with."""

    body: dict
    authorization: str | None
    fault: str | None


@dataclass
class ScriptedChatServer:
    """Start with `with ScriptedChatServer(...) as server:`; point clients at `server.base_url`.

    `faults` are consumed one per request, in arrival order (None = answer normally); `responders` maps a
    model name to a function of the request body returning the answer text.
    """

    responders: dict[str, Responder] = field(default_factory=dict)
    latency: float = 0.0
    faults: list[str | None] = field(default_factory=list)
    timeout_sleep: float = 2.0
    max_concurrent: int = 64
    lifetime: float = 120.0
    requests: list[Request] = field(default_factory=list)
    peak_in_flight: dict[str, int] = field(default_factory=dict)  # per model: most requests open at once

    def __post_init__(self) -> None:
        unknown = [f for f in self.faults if f is not None and f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; choose from {FAULTS}")
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_concurrent)
        self._in_flight: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedChatServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._deadline = threading.Timer(self.lifetime, self.close)
        self._deadline.daemon = True
        self._deadline.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()

    def count(self, model: str | None = None, fault: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (model is None or r.body.get("model") == model) and (fault is None or r.fault == fault)
            )

    def _next(self, body: dict, authorization: str | None) -> str | None:
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
            self.requests.append(Request(body, authorization, fault))
            return fault

    def _enter(self, model: str, delta: int) -> None:
        with self._lock:
            self._in_flight[model] = self._in_flight.get(model, 0) + delta
            self.peak_in_flight[model] = max(self.peak_in_flight.get(model, 0), self._in_flight[model])

    def _answer(self, body: dict) -> str:
        responder = self.responders.get(body.get("model"), default_responder)
        return responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                with server._slots:
                    self._handle()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                fault = server._next(body, self.headers.get("Authorization"))
                model = str(body.get("model"))
                server._enter(model, +1)
                try:
                    self._reply(body, fault)
                finally:
                    server._enter(model, -1)

            def _reply(self, body: dict, fault: str | None) -> None:
                time.sleep(server.latency)
                if fault == "timeout":
                    time.sleep(server.timeout_sleep)
                    return self._send(504, {"error": {"message": "too late"}})
                if fault == "401":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if fault == "429":
                    return self._send(429, {"error": {"message": "rate limited"}}, {"retry-after-ms": "10"})
                if fault == "500":
                    return self._send(
                        500, {"error": {"message": "server exploded"}}, {"retry-after-ms": "10"}
                    )
                if fault == "html_page":
                    return self._send_raw(200, HTML_PAGE, content_type="text/html")
                if fault == "malformed_body":
                    return self._send_raw(200, b'{"id": "chatcmpl-x", "choices": [ {oops')
                content = "this is {not json" if fault == "malformed_content" else server._answer(body)
                prompt_tokens = sum(len(json.dumps(m)) // 4 for m in body.get("messages", []))
                self._send(
                    200,
                    {
                        "id": "chatcmpl-loopback",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "loopback"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": len(content) // 4 + 1,
                            "total_tokens": prompt_tokens + len(content) // 4 + 1,
                        },
                    },
                )

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                self._send_raw(status, json.dumps(payload).encode(), headers)

            def _send_raw(
                self,
                status: int,
                data: bytes,
                headers: dict | None = None,
                content_type: str = "application/json",
            ) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
                    pass

        return Handler
