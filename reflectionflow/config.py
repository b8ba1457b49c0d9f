"""Configuration helpers shared by the apps: composing an app's config, the user-error type, option checks
and the one secret rule with everything that applies it.

The rule: a config key or environment variable whose name ends like `api_key`, `token`, `secret`,
`password` or `authorization` holds a secret. Its value is redacted wherever a config or the command line is
written (Hydra's saved `.hydra/` files, result files, W&B's config and recorded command line); a key naming
where a secret comes from (`api_key_env`) must hold a variable name, else it is redacted too and refused;
and a secret variable is never interpolated into a config (`${oc.env:OPENAI_API_KEY}` fails in one line),
so its value cannot reach anything a run writes.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue
from omegaconf.resolvers import oc

SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|authorization)$", re.IGNORECASE)
SECRET_SOURCE_SUFFIX = "_env"  # `api_key_env`: the name of the variable holding the secret
VARIABLE_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the config key to change."""


class SecretInterpolationError(InterpolationResolutionError):
    """`${oc.env:NAME}` of a secret variable (OmegaConf passes this type through, adding the key)."""


def check_option(key: str, value: str, options: tuple[str, ...]) -> None:
    """One clear line for a setting outside its options; `key` names it as the caller's user sets it."""
    if value not in options:
        raise ConfigError(f"{key}: expected one of {options}, got {value!r}")


def is_variable_name(value: str) -> bool:
    """An environment variable's name (upper case, or one that is set), not a key typed in its place."""
    return bool(VARIABLE_NAME.fullmatch(value)) or value in os.environ


def is_secret(key: str, value: Any) -> bool:
    """Whether `value` under config key `key` must never be written (the rule, module docstring)."""
    name = str(key).rsplit(".", 1)[-1]
    if name.endswith(SECRET_SOURCE_SUFFIX) and SECRET_KEY.search(name.removesuffix(SECRET_SOURCE_SUFFIX)):
        return isinstance(value, str) and not is_variable_name(value)
    return bool(SECRET_KEY.search(name)) and value not in (None, "")


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config with its secret values replaced (for files, logs and W&B)."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret(k, v) else redact_secrets(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_secrets(v) for v in value]
    return value


def redact_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides (`key=value`, `+key=value`, ...) with their secret values replaced."""
    redacted = []
    for override in overrides:
        key, sep, value = override.partition("=")
        redacted.append(f"{key}={REDACTED}" if sep and is_secret(key.lstrip("+~"), value) else override)
    return redacted


@contextmanager
def redacted_argv() -> Iterator[None]:
    """`sys.argv` with its secret values replaced, while a library that records the command line (W&B's
    run metadata) starts."""
    argv = sys.argv
    sys.argv = [argv[0], *redact_overrides(argv[1:])]
    try:
        yield
    finally:
        sys.argv = argv


def _env(name: str, *default: Any) -> Any:
    """OmegaConf's `oc.env`, refusing secret variables: their values would be written with the config."""
    if SECRET_KEY.search(name):
        raise SecretInterpolationError(
            f"${{oc.env:{name}}} would write the secret in {name} into the run's files: configs name a "
            f"secret's variable (api_key_env={name}) and the code reads it from the environment"
        )
    return oc.env(name, *default)


OmegaConf.register_new_resolver("oc.env", _env, replace=True)


def check_secret_interpolations(cfg: DictConfig, literal: Sequence[str] = ()) -> None:
    """Resolve every value once, so that an interpolated secret fails at the start, in one line naming its
    key; other resolution errors are left to where the value is used. `literal`: top-level keys that are
    never resolved (infer's `prompt`)."""
    for key in cfg.keys():
        if key not in literal:
            _resolve_each(cfg, key, str(key))


def _resolve_each(node: DictConfig | ListConfig, key: Any, path: str) -> None:
    try:
        value = node[key]
    except SecretInterpolationError as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    except (InterpolationResolutionError, MissingMandatoryValue):
        return
    if isinstance(value, DictConfig | ListConfig):
        keys = value.keys() if isinstance(value, DictConfig) else range(len(value))
        for child in keys:
            _resolve_each(value, child, f"{path}.{child}")


class RedactSavedConfigs(Callback):
    """Hydra callback (both apps' `hydra.callbacks`): Hydra saves the job's config, its own and the
    overrides (`<run dir>/<hydra.output_subdir>/`, a sweep's `multirun.yaml`) before the job starts; this
    rewrites them with their secrets redacted, and redacts the overrides Hydra prints when a job fails."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is not None:
            saved = Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                _redact_saved(saved / name)
        if config.hydra.mode == RunMode.MULTIRUN:
            _redact_saved(Path(config.hydra.sweep.dir) / "multirun.yaml")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        job_return.overrides = redact_overrides(job_return.overrides or [])


def _redact_saved(path: Path) -> None:
    """Rewrite a saved config (a config, optionally with its `hydra` node, or a list of overrides)."""
    if not path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if isinstance(saved, list):
        redacted = redact_overrides(saved)
    else:
        redacted = redact_secrets(saved)
        if "hydra" in saved:
            redacted["hydra"] = _redact_hydra_node(saved["hydra"], redacted["hydra"])
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # a sweep's jobs may rewrite one file
    partial.write_text(OmegaConf.to_yaml(OmegaConf.create(redacted)), encoding="utf-8")
    partial.replace(path)


def _redact_hydra_node(saved: dict[str, Any], redacted: dict[str, Any]) -> dict[str, Any]:
    """The `hydra` node with its override lists and `job.override_dirname` (the task overrides joined)
    redacted too."""
    task = saved["overrides"]["task"]
    redacted["overrides"] = {group: redact_overrides(lines) for group, lines in saved["overrides"].items()}
    kv_sep = saved["job"]["config"]["override_dirname"]["kv_sep"]
    dirname = saved["job"]["override_dirname"]
    for line, safe in zip(task, redacted["overrides"]["task"], strict=True):
        dirname = dirname.replace(line.replace("=", kv_sep), safe.replace("=", kv_sep))
    redacted["job"]["override_dirname"] = dirname
    return redacted


def check_top_level_keys(cfg: DictConfig, app: str) -> None:
    """An unknown top-level key (`+sede=1`, `+serach.width=4`) fails in one line instead of changing
    nothing. Known: the keys of the app's primary config (`conf/<app>/<app>.yaml`) and its config groups."""
    primary = OmegaConf.load(Path(__file__).parent / "conf" / app / f"{app}.yaml")
    groups = {next(iter(entry)).split("@")[0] for entry in primary.defaults if not isinstance(entry, str)}
    known = (set(primary) | groups) - {"defaults", "hydra"}
    unknown = sorted(set(cfg) - known - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level config key {', '.join(map(repr, unknown))}; the {app} app reads "
                          f"{', '.join(sorted(k for k in known if ' ' not in k))}")


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
