"""The apps through their real command lines, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(cache: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
    """The test process's environment without API keys, one thread, W&B offline, `cache` as the cache dir."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    if cache is not None:
        env["REFLECTIONFLOW_CACHE"] = str(cache)
    return env | extra


def cli_command(app: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"reflectionflow.{app}", *overrides]


def run_cli(
    app: str,
    *overrides: str,
    cache: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: str | os.PathLike = ROOT,
) -> subprocess.CompletedProcess:
    """`python -m reflectionflow.<app> <overrides>`; `env` adds variables (e.g. an API key)."""
    return subprocess.run(
        cli_command(app, *overrides),
        cwd=cwd,
        env=cli_env(cache, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
