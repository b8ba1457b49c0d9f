"""Configuration helpers shared by the apps: composing an app's config, the user-error type, option checks
and secret redaction."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|authorization)$", re.IGNORECASE)
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the config key to change."""


def check_option(key: str, value: str, options: tuple[str, ...]) -> None:
    """One clear line for a setting outside its options; `key` names it as the caller's user sets it."""
    if value not in options:
        raise ConfigError(f"{key}: expected one of {options}, got {value!r}")


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config with the values of secret-looking keys replaced (for logs and W&B).

    Keys naming where a secret comes from (`api_key_env`) are kept: they hold a variable name, not a secret.
    """
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v else redact_secrets(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_secrets(v) for v in value]
    return value


def redact_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides (`key=value`, `+key=value`, ...) with the values of secret-looking keys replaced."""
    redacted = []
    for override in overrides:
        key, sep, _ = override.partition("=")
        redacted.append(f"{key}={REDACTED}" if sep and SECRET_KEY.search(key.lstrip("+~")) else override)
    return redacted


def compose(app: str, overrides: Sequence[str] = (), hydra_node: bool = False) -> DictConfig:
    """The config `python -m reflectionflow.<app> <overrides>` runs with (`app`: "train" or "infer"; with
    `hydra_node`, the `hydra` node too). Works inside a running Hydra app, whose global state is set
    aside and restored."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    global_hydra = GlobalHydra.instance()
    running = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_module(f"reflectionflow.conf.{app}", version_base="1.3"):
            return hydra_compose(app, overrides=list(overrides), return_hydra_config=hydra_node)
    finally:
        global_hydra.clear()
        if running is not None:
            global_hydra.initialize(running)
