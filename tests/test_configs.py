"""The apps' config roots and the package layout: every experiment composes in its own app and only there,
recipes are an explicit step (printing a config trains nothing), the core never imports the miniature."""

from __future__ import annotations

import ast
import logging
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from helpers.cli import run_in_process
from hydra.errors import MissingConfigException

import reflectionflow
from reflectionflow import recipes
from reflectionflow.config import check_top_level_keys

APPS = ("train", "infer")
PACKAGE = Path(reflectionflow.__file__).parent


def experiments(app: str) -> list[str]:
    folder = resources.files(f"reflectionflow.conf.{app}").joinpath("experiment")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


PAIRS = [(app, name) for app in APPS for name in experiments(app)]


def test_each_app_has_the_experiments_it_documents():
    assert experiments("train") == ["genref", "shapes_base", "shapes_corrector", "shapes_text", "shapes_vae", "tiny"]
    assert experiments("infer") == ["geneval", "geneval_paper", "shapes", "tiny"]


@pytest.mark.parametrize(("app", "experiment"), PAIRS)
def test_every_experiment_composes_in_its_app(compose_config, app, experiment):
    cfg = compose_config(app, f"experiment={experiment}")
    assert ("model" if app == "train" else "weights") in cfg
    assert ("weights" if app == "train" else "model") not in cfg
    check_top_level_keys(cfg, app)


@pytest.mark.parametrize("app", APPS)
def test_an_unknown_top_level_key_fails_in_one_line(tmp_path, capfd, app):
    """`+serach.width=4` (a typo) would otherwise add a node nothing reads."""
    done = run_in_process(app, "experiment=tiny", "+serach.width=4", capture=capfd, cache=tmp_path, cwd=tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown top-level config key 'serach'" in errors[0], done.stderr[-2000:]
    assert "seed" in errors[0] if app == "train" else "search" in errors[0]


@pytest.mark.parametrize(("app", "experiment"), [("infer", "genref"), ("infer", "shapes_base"), ("train", "geneval"),
                                                 ("train", "shapes")])
def test_an_experiment_of_the_other_app_is_not_found(compose_config, app, experiment):
    with pytest.raises(MissingConfigException, match=f"Could not find 'experiment/{experiment}'"):
        compose_config(app, f"experiment={experiment}")


def test_the_cli_names_the_valid_experiments(tmp_path, capfd):
    done = run_in_process("infer", "experiment=genref", capture=capfd, cache=tmp_path)
    assert done.returncode != 0
    assert "Could not find 'experiment/genref'" in done.stderr
    assert all(name in done.stderr for name in experiments("infer"))


def test_printing_or_helping_trains_no_recipe(tmp_path, capfd):
    cache = tmp_path / "cache"
    for flags in (["--cfg", "job"], ["--help"], ["--info", "defaults"]):
        done = run_in_process("infer", "experiment=shapes", *flags, capture=capfd, cache=cache, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    printed = run_in_process("infer", "experiment=shapes", "--cfg", "job", capture=capfd, cache=cache,
                             cwd=tmp_path).stdout
    assert "path: recipe://shapes_base" in printed and "lora_path: recipe://shapes_corrector/lora" in printed
    assert not cache.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_help_lists_only_the_apps_own_groups(capfd):
    train, infer = (run_in_process(app, "--help", capture=capfd).stdout for app in APPS)
    assert "trainer: " in train and "verifier: " not in train
    assert "verifier: " in infer and "trainer: " not in infer


def test_missing_recipes_are_built_in_order_under_their_product_directories(
    compose_config, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("REFLECTIONFLOW_CACHE", str(tmp_path))
    commands: list[list[str]] = []

    def child(command, check):  # stands in for `python -m reflectionflow.train experiment=...`
        commands.append(command)
        run_dir = Path(next(arg for arg in command if arg.startswith("hydra.run.dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True)
        recipes.mark_built(run_dir.parent)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(recipes.subprocess, "run", child)
    cfg = compose_config("infer", "experiment=shapes", "search=noise", "weights.lora_path=null")
    with caplog.at_level(logging.WARNING, logger="reflectionflow.recipes"):
        built = recipes.resolve_references(cfg)
    assert [item.name for item in built] == ["shapes_vae", "shapes_text", "shapes_base"]
    assert [c[3] for c in commands] == ["experiment=shapes_vae", "experiment=shapes_text", "experiment=shapes_base"]
    assert [c[4] for c in commands] == [f"hydra.run.dir={item.product / 'run'}" for item in built]
    assert cfg.weights.path == str(built[-1].product) and cfg.generator.model_path == cfg.weights.path
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"training missing recipe {name}" for name in ("shapes_vae", "shapes_text", "shapes_base")]
    again = compose_config("infer", "experiment=shapes", "search=noise", "weights.lora_path=null")
    recipes.resolve_references(again)  # built now: nothing more is trained
    assert len(commands) == 3 and again.weights.path == cfg.weights.path


def test_recipes_list_shows_every_recipe_without_training(tmp_path, capfd):
    done = run_in_process("recipes", "list", capture=capfd, cache=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["shapes_base", "shapes_corrector", "shapes_text", "shapes_vae"]
    assert all(line.startswith("missing") and str(tmp_path / "recipes") in line for line in lines)
    assert not (tmp_path / "recipes").exists()


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_shapes_miniature():
    core = [p for p in PACKAGE.rglob("*.py") if "shapes" not in p.relative_to(PACKAGE).parts]
    assert {p.relative_to(PACKAGE).parts[0] for p in core} >= {"data", "models", "search", "train.py"}
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if "shapes" in m)
                 for p in core}
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_shapes_world_is_torch_free():
    world = PACKAGE / "shapes" / "world"
    heavy = {str(p.name): sorted(m for m in imported_modules(p) if m.split(".")[0] in ("torch", "webdataset",
                                                                                       "lightning", "diffusers"))
             for p in world.glob("*.py")}
    assert {name: mods for name, mods in heavy.items() if mods} == {}
