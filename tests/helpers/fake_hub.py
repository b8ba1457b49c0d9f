"""A loopback stand-in for the Hugging Face hub (no network here): the few endpoints huggingface_hub calls
to stream a dataset's files and to create a model repository and commit files into it.

    with FakeHub() as hub:
        hub.add_file("datasets", "org/data", "genref_0.tar", data, token="hf_x")   # token: a gated repo
        env = hub.environment()                    # for a subprocess: HF_ENDPOINT, online
        hub.use_in_process(monkeypatch)            # or for huggingface_hub in this process
        ...                                        # hub.requests, hub.repos["models/org/lora"]
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

SHA = "0" * 40


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # "<type>s/<repo id>" -> {path: content}
        self.tokens: dict[str, str] = {}  # gated repos: "<type>s/<repo id>" -> the token they need
        self.created: list[dict] = []  # bodies of repo creations
        self.requests: list[Request] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_POST(self):
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def environment(self) -> dict[str, str]:
        """What a subprocess needs to reach this hub: `HF_ENDPOINT`, and not offline."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0"}

    def use_in_process(self, monkeypatch) -> None:
        """Point this process's huggingface_hub here (what `HF_ENDPOINT` does when read at its import)."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def add_file(self, kind: str, repo: str, path: str, data: bytes, token: str | None = None) -> None:
        key = f"{kind}/{repo}"
        self.repos.setdefault(key, {})[path] = data
        if token is not None:
            self.tokens[key] = token

    # ------------------------------------------------------------------------------------------ serving
    def _reply(
        self, handler, status: int, body: bytes = b"", headers: dict | None = None, head=False
    ) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _json(self, handler, data, status: int = 200) -> None:
        self._reply(handler, status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(self, handler, status: int, code: str, head=False) -> None:
        body = json.dumps({"error": code}).encode()
        self._reply(handler, status, body, {"Content-Type": "application/json", "X-Error-Code": code}, head)

    def _allowed(self, handler, key: str) -> bool:
        needed = self.tokens.get(key)
        return needed is None or handler.headers.get("Authorization") == f"Bearer {needed}"

    def _handle(self, handler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        self.requests.append(Request(method, path, handler.headers.get("Authorization")))
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        head = method == "HEAD"
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            key = f"{match[1]}/{match[2]}"
            if key not in self.repos:
                return self._error(handler, 404, "RepoNotFound")
            if not self._allowed(handler, key):
                return self._error(handler, 401, "GatedRepo")
            files = [{"rfilename": name, "size": len(data)} for name, data in self.repos[key].items()]
            return self._json(handler, {"id": match[2], "sha": SHA, "siblings": files, "private": False})
        if match := re.fullmatch(r"/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            key = f"{match[1] or 'models'}/{match[2]}"
            if key not in self.repos:
                return self._error(handler, 404, "RepoNotFound", head)
            if not self._allowed(handler, key):
                return self._error(handler, 401, "GatedRepo", head)
            data = self.repos[key].get(match[4])
            if data is None:
                return self._error(handler, 404, "EntryNotFound", head)
            start = 0
            if ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range", "")):
                start = int(ranged[1])
                end = int(ranged[2]) + 1 if ranged[2] else len(data)
                headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", "ETag": f'"{SHA}"'}
                return self._reply(handler, 206, data[start:end], headers, head)
            return self._reply(handler, 200, data, {"ETag": f'"{SHA}"', "X-Repo-Commit": SHA}, head)
        if path == "/api/repos/create" and method == "POST":
            request = json.loads(body)
            self.created.append(request)
            repo = (
                f"{request['organization']}/{request['name']}"
                if request.get("organization")
                else request["name"]
            )
            self.repos.setdefault(f"{request.get('type') or 'model'}s/{repo}", {})
            return self._json(handler, {"url": f"{self.endpoint}/{repo}", "name": repo})
        if path == "/api/validate-yaml" and method == "POST":  # the hub checks a README's front matter
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except (IndexError, yaml.YAMLError) as err:
                return self._json(handler, {"errors": [{"message": str(err)}], "warnings": []}, status=400)
            return self._json(handler, {"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/preupload/([^/]+)", path):
            files = json.loads(body)["files"]
            return self._json(
                handler,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/commit/([^/]+)", path):
            key = f"{match[1]}/{match[2]}"
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos.setdefault(key, {})[item["value"]["path"]] = base64.b64decode(
                        item["value"]["content"]
                    )
            return self._json(
                handler,
                {
                    "commitUrl": f"{self.endpoint}/{match[2]}/commit/{SHA}",
                    "commitOid": SHA,
                    "success": True,
                    "commitMessage": "",
                },
            )
        return self._error(handler, 404, "NotFound", head)
