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


def main_in_process(app: str, *overrides: str) -> str | None:
    """`python -m reflectionflow.<app> <overrides>` in this process, without an interpreter's start-up (the
    imports take most of a CLI test's time); returns its exit message (None: it ended normally). Hydra's
    global state and the logging handlers it installs are put back afterwards."""
    code = exit_code(app, *overrides)
    return None if code in (None, 0) else str(code)


def exit_code(app: str, *overrides: str) -> int | str | None:
    """`main_in_process`, returning the code of the SystemExit that ended it (None: it returned)."""
    import importlib
    import logging
    from unittest import mock

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    main = importlib.import_module(f"reflectionflow.{app}").main
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with mock.patch.object(sys, "argv", [app, *overrides]):
            main()
    except SystemExit as exit_:
        return exit_.code
    finally:
        finish_wandb_run()
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    return None


def finish_wandb_run() -> None:
    """Finish a W&B run the app left open, as the interpreter's exit does (W&B's atexit hook): its records
    are written out, and the next run is a new one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run_in_process(
    app: str,
    *overrides: str,
    capture,
    cache: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike = ROOT,
) -> subprocess.CompletedProcess:
    """`run_cli`'s result, the app run by `main_in_process` in `run_cli`'s environment and working directory:
    stdout and stderr are what it printed (`capture`: pytest's capfd), an exit message last on stderr and
    the return code as the interpreter gives them (a message: 1)."""
    from unittest import mock

    capture.readouterr()  # not what the test printed before
    previous = os.getcwd()
    with mock.patch.dict(os.environ, cli_env(cache, **(env or {})), clear=True):
        os.chdir(cwd)
        try:
            code = exit_code(app, *overrides)
        finally:
            os.chdir(previous)
    stdout, stderr = capture.readouterr()
    if isinstance(code, str):
        stderr, code = f"{stderr}{code}\n", 1
    return subprocess.CompletedProcess([app, *overrides], code or 0, stdout, stderr)
