"""Budget sweeps through the real command line (in this process; the joblib launcher's in a real interpreter):
a Hydra multirun, its automatic aggregation, W&B offline, launchers."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import compose_app
from helpers.chat_server import ScriptedChatServer
from helpers.cli import ROOT, cli_command, run_in_process
from hydra.types import RunMode
from PIL import Image

import reflectionflow.infer  # noqa: F401  (registers the rf.shard_suffix resolver)
from reflectionflow.search.aggregation import load_rows, plot_scaling

KEY = "sk-proj-RFTEST-9c2e41d7aa-never-in-wandb"
PLANTED = "planted-secret-0d7f3b"
DETERMINISTIC_ADVICE = ["reflector=deterministic", "refiner=deterministic"]


def multirun(
    sweep_dir: Path, *overrides: str, capfd, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m reflectionflow.infer -m ...` in this process (`capfd`: pytest's fixture)."""
    done = run_in_process(
        "infer", "-m", "progress=false", f"hydra.sweep.dir={sweep_dir}", *overrides, capture=capfd, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def multirun_in_interpreter(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m reflectionflow.infer -m ...` in a new interpreter (for launchers that start processes)."""
    environment = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run(
        cli_command("infer", "-m", "progress=false", f"hydra.sweep.dir={sweep_dir}", *overrides),
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def prompt_file(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    records = [{"prompt": "a red cube", "tag": "colors"}, {"prompt": "two blue spheres", "tag": "counting"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tiny_flux_2x2_multirun_writes_results_table_and_plot(tmp_path, tiny_flux_path, capfd):
    sweep = tmp_path / "sweep"
    multirun(
        sweep,
        "generator=flux_tiny",
        f"weights.path={tiny_flux_path}",
        "verifier=deterministic",
        "checker=deterministic",
        *DETERMINISTIC_ADVICE,
        "search=reflectionflow",
        "search.width=1,2",
        "search.depth=0,1",
        "prompts=file",
        f"prompts.path={prompt_file(tmp_path)}",
        capfd=capfd,
    )
    files = sorted(sweep.glob("*/result.json"))
    assert [p.parent.name for p in files] == ["0", "1", "2", "3"]
    results = {p.parent.name: json.loads(p.read_text()) for p in files}
    assert sorted((r["width"], r["depth"]) for r in results.values()) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for result in results.values():
        images = result["width"] * (result["depth"] + 1)
        assert result["budget"]["images"] == 2 * images and result["per_prompt_budget"]["images"] == images
        assert result["budget"]["nfe"] == 2 * images * 8  # flux_tiny: 8 steps, no true CFG
        assert result["budget"]["reflector"]["calls"] == 2 * result["width"] * result["depth"]
        assert set(result["tags"]) == {"colors", "counting"} and result["prompts"] == 2
        assert result["accuracy"] == sum(o["score"] >= 0.5 for o in result["per_prompt"]) / 2
        assert result["preset"] == "reflectionflow" and result["search_budget"] is None

    table = list(csv.DictReader(io.StringIO((sweep / "scaling.csv").read_text())))
    assert sorted(line["job"] for line in table) == sorted(results)
    for line in table:
        result = results[line["job"]]
        assert float(line["mean_score"]) == result["mean_score"]
        assert float(line["accuracy"]) == result["accuracy"]
        assert float(line["images"]) == result["per_prompt_budget"]["images"]
        assert float(line["nfe"]) == result["per_prompt_budget"]["nfe"]
        assert (int(line["width"]), int(line["depth"])) == (result["width"], result["depth"])
    markdown = (sweep / "scaling.md").read_text()
    for result in results.values():
        assert f"{result['mean_score']:.4f}" in markdown

    with Image.open(sweep / "scaling.png") as image:
        image.verify()
    with Image.open(sweep / "scaling.png") as image:
        assert image.size == (1000, 800)
    score_vs_images = plot_scaling(load_rows(sweep)[0]).axes[0]
    plotted = sorted(map(tuple, score_vs_images.collections[0].get_offsets().tolist()))
    assert plotted == sorted((r["per_prompt_budget"]["images"], r["mean_score"]) for r in results.values())


def test_wandb_offline_runs_per_job_grouped_with_table_and_scaling_plot(tmp_path, capfd):
    sweep = tmp_path / "grid-5d1e"
    wandb_home = tmp_path / "wandb_home"
    env = {
        "WANDB_MODE": "offline",
        "OPENAI_API_KEY": KEY,
        **{f"WANDB_{name}_DIR": str(wandb_home / name) for name in ("CACHE", "CONFIG", "DATA")},
    }
    with ScriptedChatServer() as server:
        multirun(
            sweep,
            "generator=deterministic",
            "verifier=openai",
            f"verifier.chat.base_url={server.base_url}",
            *DETERMINISTIC_ADVICE,
            "search=reflectionflow",
            "search.budget=2,4",
            "prompts=file",
            f"prompts.path={prompt_file(tmp_path)}",
            "wandb.enabled=true",
            f"+hydra.job.env_set.API_TOKEN={PLANTED}",  # W&B records the command line
            capfd=capfd,
            env=env,
        )
        assert server.requests and all(r.authorization == f"Bearer {KEY}" for r in server.requests)

    for job, (width, depth) in {"0": (1, 1), "1": (2, 1)}.items():
        result = json.loads((sweep / job / "result.json").read_text())
        assert (result["width"], result["depth"], result["search_budget"]) == (width, depth, 2 * width)
        assert result["wandb"]["settings"]["group"] == "grid-5d1e"
        assert result["budget"]["verifier"]["tokens_in"] > 0
        assert PLANTED not in json.dumps(result)
        [run_dir] = (sweep / job / "wandb").glob("offline-run-*")
        [table_file] = (run_dir / "files" / "media" / "table").glob("per_prompt_*.table.json")
        table = json.loads(table_file.read_text())
        assert table["columns"][:5] == ["index", "tag", "prompt", "selected", "score"]
        assert [c for c in table["columns"] if c.startswith("round") and c.endswith("reflections")] == [
            f"round {r} reflections" for r in range(depth + 1)
        ]
        assert [row[2] for row in table["data"]] == ["a red cube", "two blue spheres"]
        scores = [row[table["columns"].index("score")] for row in table["data"]]
        assert scores == [o["score"] for o in result["per_prompt"]]
        assert any(row[table["columns"].index("round 1 reflections")] for row in table["data"])
        [records] = run_dir.glob("run-*.wandb")
        assert b"\x09grid-5d1e" in records.read_bytes()  # a protobuf string field equal to the group

    [aggregate_run] = (sweep / "wandb").glob("offline-run-*")
    assert list((aggregate_run / "files" / "media" / "images" / "scaling").glob("plot_*.png"))
    [scaling_table] = (aggregate_run / "files" / "media" / "table" / "scaling").glob("table_*.table.json")
    assert len(json.loads(scaling_table.read_text())["data"]) == 2
    # native W&B line plots, one per panel of scaling.png: a line per preset through its best job per budget
    charts = aggregate_run / "files" / "media" / "table" / "scaling"
    [score_vs_images] = charts.glob("mean_score_vs_images_table_*.table.json")
    results = [json.loads((sweep / job / "result.json").read_text()) for job in ("0", "1")]
    assert json.loads(score_vs_images.read_text())["data"] == [
        [r["search_budget"], "reflectionflow", r["mean_score"]] for r in results
    ]
    assert len(list(charts.glob("mean_score_vs_nfe_table_*.table.json"))) == 1

    for path in sweep.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert KEY.encode() not in data and b"9c2e41d7aa" not in data, path
            if "wandb" in path.parts or path.name == "result.json":
                assert PLANTED.encode() not in data, path


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    sweep = tmp_path / "sweep"
    multirun_in_interpreter(
        sweep,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "generator=deterministic",
        "verifier=deterministic",
        "search=noise",
        "search.budget=1,2",
        "prompt=a red cube",
    )
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert [r["budget"]["images"] for r in results] == [1, 2]
    assert [line.split(",")[0] for line in (sweep / "scaling.csv").read_text().splitlines()[1:]] == ["0", "1"]


@pytest.mark.parametrize(
    "launcher, target, extra",
    [
        (
            "joblib",
            "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
            ["hydra.launcher.n_jobs=2"],
        ),
        (
            "submitit_slurm",
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
            [
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=1",
                "hydra.launcher.timeout_min=720",
            ],
        ),
        ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", []),
    ],
)
def test_launcher_configs_compose(launcher, target, extra):
    cfg = compose_app("infer", f"hydra/launcher={launcher}", "sweep=budget", *extra, hydra_node=True)
    assert cfg.hydra.launcher._target_ == target
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.runtime.choices["hydra/launcher"] == launcher
    if launcher == "submitit_slurm":
        assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.gpus_per_node) == ("gpu", 1)
        assert cfg.hydra.launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
