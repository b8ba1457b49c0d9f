"""Cached training recipes: a training run whose product (a model directory) is reused when its config is
unchanged, and recipes that depend on each other through the `${rf.recipe:<experiment>}` resolver.

An experiment with a `recipe: <name>` key writes its product (the module's `export(dir)`) to
`<cache_dir>/recipes/<name>-<hash of model/data/trainer/callbacks/seed config>/`; a second run with the same config
finds it there and trains nothing. `${rf.recipe:shapes_vae}` in a config resolves to the product of
`python -m reflectionflow.train experiment=shapes_vae`, running it first (in a child process, with its own
progress bar) if it is not cached, so `python -m reflectionflow.infer experiment=shapes` chains every
recipe it needs. A dependency's product directory name carries its own hash, so a changed dependency
changes the key of everything built on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DONE = "DONE"

RECIPE_VERSION = 2
"""Part of every product's key; bumped when code changes what the same config trains (2: T5 vocabulary
without sentence punctuation), so stale products are rebuilt instead of reused."""


def recipes_dir() -> Path:
    from reflectionflow.models.loading import cache_dir

    return cache_dir() / "recipes"


def product_dir(cfg: DictConfig) -> Path | None:
    """Where this run's product goes, or None for a run without `recipe`."""
    name = cfg.get("recipe")
    if not name:
        return None
    keyed = {  # everything that shapes the weights, callbacks included (weight averaging)
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "callbacks": OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True),
        "seed": cfg.get("seed"),
        "version": RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return recipes_dir() / f"{name}-{digest}"


def is_built(product: Path) -> bool:
    return (product / DONE).is_file()


def latest_product(name: str) -> Path | None:
    """The product `${rf.recipe:<name>}` returns now (the last one built or reused), None before any."""
    marker = recipes_dir() / f"{name}.latest"
    return Path(marker.read_text().strip()) if marker.is_file() else None


def mark_built(name: str, product: Path) -> None:
    """Seal a finished product and make it the recipe's latest (what `${rf.recipe:name}` returns)."""
    (product / DONE).write_text("")
    (recipes_dir() / f"{name}.latest").write_text(str(product))


@functools.cache
def build_recipe(experiment: str) -> str:
    """The product directory of `experiment=<experiment>`, trained first if not cached (child process)."""
    command = [sys.executable, "-m", "reflectionflow.train", f"experiment={experiment}"]
    log.info("recipe %s: %s", experiment, " ".join(command))
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise RuntimeError(f"recipe {experiment} failed (exit {done.returncode}): {' '.join(command)}")
    return str(latest_product(experiment))


OmegaConf.register_new_resolver("rf.recipe", build_recipe, replace=True)
