"""Cached training recipes: model products built by an explicit step, never inside a config resolver.

A train experiment with a `recipe:` node (`name`, expected `minutes` on 2 CPU cores) exports its product (the
module's `export(dir)`) to `<cache_dir>/recipes/<name>-<hash>/`, the hash taken over everything that shapes
the weights (model, data, trainer, weight-averaging callbacks, seed and `RECIPE_VERSION`); a second run with the same config
trains nothing. Other configs name a product by the plain string `recipe://<name>[/<path inside>]`, so
`--cfg job`, `--help` and `--info` show the reference and train nothing. An app resolves the references of
its config before it loads any model (`resolve_references`): each missing product is announced in one line
and built by a child `python -m reflectionflow.train experiment=<name>` whose run directory is
`<product>/run`, dependencies first. `python -m reflectionflow.recipes build <name>` does the same by
hand after printing the plan; `python -m reflectionflow.recipes list` shows what is built.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from reflectionflow.config import compose

log = logging.getLogger(__name__)

REFERENCE = "recipe://"
DONE = "DONE"
TRAIN_CONFIG_MODULE = "reflectionflow.conf.train"

RECIPE_VERSION = 2
"""Part of every product's key; bumped when code changes what the same config trains (2: T5 vocabulary
without sentence punctuation), so stale products are rebuilt instead of reused. (Correctors built before
LoRAs carried their settings file are keyed by a base model whose config has changed since, so they are
never reused: no bump was needed for it.)"""


class RecipeError(RuntimeError):
    """A recipe that does not exist or whose training failed; the message names the command."""


@dataclass(frozen=True)
class Recipe:
    """A recipe as the current configs define it: where its product goes and whether it is there."""

    name: str
    product: Path
    minutes: float | None

    @property
    def built(self) -> bool:
        return is_built(self.product)

    def describe(self) -> str:
        minutes = f"~{self.minutes:g} min" if self.minutes is not None else "time unknown"
        return f"{self.name} ({minutes}) -> {self.product}"


def recipes_dir() -> Path:
    from reflectionflow.models.loading import cache_dir

    return cache_dir() / "recipes"


def weight_shaping_callbacks(callbacks: dict[str, Any]) -> dict[str, Any]:
    """The callbacks that change the trained weights (Lightning's weight averaging, e.g. EMA): the only
    ones a product's key holds, so a logging callback (learning rate, throughput) never invalidates one."""
    from hydra.utils import get_class
    from lightning.pytorch.callbacks import WeightAveraging

    return {name: node for name, node in callbacks.items()
            if node and issubclass(get_class(node["_target_"]), WeightAveraging)}


def product_dir(cfg: DictConfig) -> Path | None:
    """Where a train config's product goes, or None for a run without `recipe`; references resolved."""
    recipe = cfg.get("recipe")
    if not recipe:
        return None
    keyed = {  # everything that shapes the weights
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "callbacks": weight_shaping_callbacks(OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True)),
        "seed": cfg.get("seed"),
        "version": RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return recipes_dir() / f"{recipe.name}-{digest}"


def is_built(product: Path) -> bool:
    return (product / DONE).is_file()


def mark_built(product: Path) -> None:
    """Seal a finished product: only a sealed product is ever reused."""
    (product / DONE).write_text("")


# ------------------------------------------------------------------------------------------------------
# References


def references(cfg: DictConfig) -> list[tuple[str, str]]:
    """(dotted key, `recipe://...` string) of every literal reference in `cfg` (interpolations that point
    at one follow it once it is replaced), outside the `hydra` node."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        elif isinstance(node, str) and node.startswith(REFERENCE):
            found.append((key, node))

    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    walk(container, "")
    return found


def split_reference(reference: str) -> tuple[str, str]:
    """`recipe://shapes_corrector/lora` -> ("shapes_corrector", "lora")."""
    name, _, inside = reference.removeprefix(REFERENCE).partition("/")
    if not name:
        raise RecipeError(f"{reference!r} names no recipe; expected recipe://<name>[/<path>]")
    return name, inside


def _set(cfg: DictConfig, key: str, value: str) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)


def resolve_references(cfg: DictConfig, build: bool = True) -> list[Recipe]:
    """Replace every `recipe://` reference in `cfg` by its product path; with `build`, first train each
    missing product (dependencies first), announcing each in one line. Returns the recipes, in build order."""
    found = references(cfg)
    known: dict[str, Recipe] = {}
    needed = plan([split_reference(value)[0] for _, value in found], known)
    if build:
        build_missing(needed)
    for key, value in found:
        name, inside = split_reference(value)
        _set(cfg, key, str(known[name].product / inside) if inside else str(known[name].product))
    return needed


# ------------------------------------------------------------------------------------------------------
# Planning and building


def train_experiments() -> list[str]:
    from importlib import resources

    folder = resources.files(TRAIN_CONFIG_MODULE).joinpath("experiment")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def compose_experiment(name: str) -> DictConfig:
    """The train config of `experiment=<name>`, references not yet resolved."""
    if name not in train_experiments():
        raise RecipeError(f"no train experiment {name!r}; experiments: {', '.join(train_experiments())}")
    return compose("train", [f"experiment={name}"])


def plan(names: list[str], known: dict[str, Recipe] | None = None) -> list[Recipe]:
    """The recipes `names` as the configs define them now, and everything they depend on, dependencies
    first, each once (no training). `known` collects every recipe met, by name."""
    known = {} if known is None else known
    ordered: list[Recipe] = []

    def visit(name: str) -> Recipe:
        if name not in known:
            cfg = compose_experiment(name)
            if not cfg.get("recipe"):
                raise RecipeError(f"train experiment {name!r} is not a recipe (it has no recipe: node)")
            for key, value in references(cfg):
                dependency, inside = split_reference(value)
                product = visit(dependency).product
                _set(cfg, key, str(product / inside) if inside else str(product))
            known[name] = Recipe(name, product_dir(cfg), cfg.recipe.get("minutes"))
        if known[name] not in ordered:
            ordered.append(known[name])
        return known[name]

    for name in names:
        visit(name)
    return ordered


def recipe(name: str) -> Recipe:
    """One recipe as configured now (its product path; nothing is trained)."""
    return plan([name])[-1]


def built_product(name: str) -> Path:
    """The product of recipe `name` as configured now; RecipeError (naming the build command) if missing."""
    item = recipe(name)
    if not item.built:
        raise RecipeError(f"{name} is not built ({item.product}): python -m reflectionflow.recipes build {name}")
    return item.product


@contextlib.contextmanager
def _build_lock(product: Path) -> Iterator[None]:
    """One builder per product across processes (parallel sweep jobs): the others wait, then reuse it."""
    product.parent.mkdir(parents=True, exist_ok=True)
    with open(product.with_name(product.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_missing(recipes: list[Recipe]) -> None:
    """Train every recipe of `recipes` whose product is missing, in order, in child processes."""
    for item in recipes:
        if item.built:
            continue
        log.warning("training missing recipe %s", item.describe())
        with _build_lock(item.product):
            if item.built:  # another process built it while this one waited
                continue
            command = [sys.executable, "-m", "reflectionflow.train", f"experiment={item.name}",
                       f"hydra.run.dir={item.product / 'run'}"]
            done = subprocess.run(command, check=False)
            if done.returncode or not item.built:
                raise RecipeError(f"recipe {item.name} failed (exit {done.returncode}): {' '.join(command)}")


# ------------------------------------------------------------------------------------------------------
# python -m reflectionflow.recipes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reflectionflow.recipes", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train a recipe's missing products (dependencies first)")
    build.add_argument("names", nargs="+", help="recipes, e.g. shapes_corrector")
    commands.add_parser("list", help="every recipe, its product directory and whether it is built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "list":
            for name in train_experiments():
                if compose_experiment(name).get("recipe"):
                    item = recipe(name)
                    print(f"{'built  ' if item.built else 'missing'}  {item.describe()}")
            return
        needed = plan(args.names)
        missing = [item for item in needed if not item.built]
        for item in needed:
            print(f"{'train' if not item.built else 'reuse'}  {item.describe()}")
        if missing:
            total = sum(item.minutes or 0 for item in missing)
            print(f"training {len(missing)} recipe(s), about {total:g} minutes on 2 CPU cores")
        build_missing(needed)
        print(needed[-1].product)
    except RecipeError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
