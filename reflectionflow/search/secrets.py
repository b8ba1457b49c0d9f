"""API keys come only from the environment; configs hold the variable's *name* (`api_key_env`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from reflectionflow.config import SECRET_KEY, is_variable_name
from reflectionflow.search.errors import MissingAPIKeyError, SetupError


def read_api_key(env_name: str | None, where: str = "api_key_env") -> str | None:
    """The key in `$env_name` (None when no variable is named, e.g. a local server without auth)."""
    if not env_name:
        return None
    if not is_variable_name(env_name):  # never echoed: it is most likely the key itself
        raise SetupError(
            f"{where} must name an environment variable, and its value looks like a key: export the key "
            f"(export OPENAI_API_KEY=...) and set {where}=OPENAI_API_KEY"
        )
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise MissingAPIKeyError(
            f"environment variable {env_name} is not set ({where}={env_name}); export it, or set {where}=null "
            "for a server that needs no key"
        )
    return key


def check_api_keys(nodes: Mapping[str, Any]) -> None:
    """Fail with one clear line if any `api_key_env` under the given config nodes names an unset variable,
    or a node holds a key itself (`+verifier.chat.api_key=...`)."""
    for path, node in nodes.items():
        _check(node, path)


def _check(node: Any, path: str) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if SECRET_KEY.search(key):
                raise SetupError(
                    f"{path}.{key}: API keys are read from the environment only: export the key "
                    f"(export OPENAI_API_KEY=...) and set {path}.api_key_env=OPENAI_API_KEY"
                )
            if key == "api_key_env":
                read_api_key(value, f"{path}.api_key_env")
            else:
                _check(value, f"{path}.{key}")
