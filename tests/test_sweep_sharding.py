"""Sharded inference: the shard from config / SLURM array / torchrun, disjoint files, and merging shards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
from conftest import compose_app
from helpers.cli import run_in_process
from helpers.search import deterministic_engine
from hydra.core.hydra_config import HydraConfig

import reflectionflow.infer  # noqa: F401  (registers the rf.shard_suffix resolver)
from reflectionflow.aggregate import main as aggregate_cli
from reflectionflow.search.config import Axes, SearchConfig
from reflectionflow.search.errors import SetupError
from reflectionflow.search.prompts import PromptItem, shard
from reflectionflow.search.result_file import assess, job_result, read_budget, write_result
from reflectionflow.search.run_dir import RunWriter, shard_suffix
from reflectionflow.search.runner import run_search
from reflectionflow.search.sharding import environment_shard, merge_runs, resolve_shard, sharding_environment

CONFIG = SearchConfig(width=2, depth=1, axes=Axes(noise=True, prompt=True, reflection=True))
ITEMS = [PromptItem(i, f"a photo of {i} red cubes", {"prompt": "", "tag": "counting"}) for i in range(5)]


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, (1, 4)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "6",
                "SLURM_ARRAY_TASK_MIN": "2",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_MAX": "8",
            },
            (2, 4),
        ),
        ({"RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),
        ({"RANK": "1"}, None),  # not a torchrun process without WORLD_SIZE
        (
            {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"},
            (3, 6),  # torchrun inside array task 1: shards 2 and 3 of 6
        ),
    ],
)
def test_environment_shard(environ, expected):
    assert environment_shard(environ) == expected


def test_resolve_shard_prefers_the_config_and_explains_bad_settings():
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert resolve_shard(None, None, slurm) == (1, 2)
    assert resolve_shard(0, 3, slurm) == (0, 3)
    assert resolve_shard(None, None, {}) == (0, 1)
    with pytest.raises(SetupError, match="set both shard_index and num_shards, or neither"):
        resolve_shard(None, 4, slurm)
    with pytest.raises(SetupError, match="need 0 <= shard_index < num_shards"):
        resolve_shard(2, 2, {})
    with pytest.raises(SetupError, match="not on a regular array"):
        environment_shard(
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
        )
    with pytest.raises(SetupError, match="RANK='x' is not an integer"):
        environment_shard({"RANK": "x", "WORLD_SIZE": "2"})


def test_multirun_jobs_ignore_array_variables(monkeypatch):
    """The submitit launcher runs sweep jobs as a SLURM array: its task ids are not shards."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for mode, expected in [("RUN", (1, 2)), ("MULTIRUN", (0, 1))]:
        cfg = compose_app("infer", f"hydra.mode={mode}", hydra_node=True)
        HydraConfig.instance().set_config(cfg)
        try:
            assert resolve_shard(None, None, sharding_environment()) == expected
            assert cfg.hydra.output_subdir == ".hydra" + shard_suffix(*expected)
        finally:
            HydraConfig.instance().cfg = None


def test_shard_suffix_names_the_shards_summary_file(tmp_path):
    assert shard_suffix(0, 1) == ""
    writer = RunWriter(tmp_path, 3, 12)
    assert (
        writer.summary_path.name
        == f"summary{shard_suffix(3, 12)}.json"
        == "summary.shard-00003-of-00012.json"
    )


def search_shard(run_dir: Path, shard_index: int, num_shards: int, config: SearchConfig = CONFIG) -> None:
    """What `python -m reflectionflow.infer` does for one shard, in-process and with deterministic backends."""
    engine = deterministic_engine(config)
    run_search(engine, ITEMS, run_dir, shard_index=shard_index, num_shards=num_shards, progress=False)
    mine = [item.index for item in shard(ITEMS, shard_index, num_shards)]
    overrides = [] if num_shards == 1 else [f"shard_index={shard_index}", f"num_shards={num_shards}"]
    result = job_result(
        job={"preset": "reflectionflow", "choices": {}, "overrides": overrides},
        search=config.to_dict(),
        shard={"index": shard_index, "count": num_shards},
        outcomes=assess(run_dir, mine),
        budget=read_budget(run_dir, mine),
        job_seconds={"total": 1.0},
    )
    write_result(run_dir, result, shard_suffix(shard_index, num_shards))


def test_merge_refuses_incomplete_or_mixed_shards(tmp_path):
    for index in range(2):
        search_shard(tmp_path / f"s{index}", index, 2)
    with pytest.raises(
        SetupError, match=r"do not form one complete set: found \(index, count\) \[\(0, 2\)\]"
    ):
        merge_runs([tmp_path / "s0"], tmp_path / "out")

    other = tmp_path / "other_seed"
    search_shard(other, 1, 2, SearchConfig(width=2, depth=1, seed=1, axes=CONFIG.axes))
    with pytest.raises(SetupError, match="comes from a different search"):
        merge_runs([tmp_path / "s0", other], tmp_path / "out")

    twice = tmp_path / "twice"
    shutil.copytree(tmp_path / "s1", twice)
    shutil.copytree(tmp_path / "s0" / "00000", twice / "00000")
    with pytest.raises(SetupError, match="prompt 00000 is in both"):
        merge_runs([tmp_path / "s0", twice], tmp_path / "out")

    (twice / "00000" / "search.json").unlink()
    with pytest.raises(SetupError, match="00000 are unfinished; re-run that shard"):
        merge_runs([tmp_path / "s0", twice], tmp_path / "out")

    stray = tmp_path / "stray"
    shutil.copytree(tmp_path / "s0" / "00002", stray / "00007")
    with pytest.raises(SetupError, match="already holds prompt folders of another run"):
        merge_runs([tmp_path / "s0", tmp_path / "s1"], stray)
    assert not (tmp_path / "out").exists()  # nothing written by a refused merge


def run_files(run_dir: Path) -> dict[str, object]:
    """Every file of a run except Hydra's saved configs and logs (which name the shard), JSON parsed, with
    the wall times (`budget.seconds` of search.json, summary.json and result.json) set to None."""
    files: dict[str, object] = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(run_dir)
        if relative.parts[0].startswith(".hydra") or path.suffix == ".log":
            continue
        if path.suffix != ".json":
            files[str(relative)] = path.read_bytes()
            continue
        data = json.loads(path.read_text())
        if "budget" in data:  # not run.json
            data["budget"]["seconds"] = None
        files[str(relative)] = data
    return files


def infer(capfd, *args: str, env: dict[str, str] | None = None) -> None:
    """`python -m reflectionflow.infer ...` in this process, outside any SLURM array or torchrun (`env` adds
    variables); `capfd`: pytest's fixture."""
    with mock.patch.dict(os.environ):
        for name in [k for k in os.environ if k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))]:
            del os.environ[name]
        done = run_in_process("infer", "progress=false", *args, capture=capfd, env=env)
    assert done.returncode == 0, done.stderr


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in run_dir.rglob("*")
        if p.is_file()
    }


def test_two_array_shards_then_merge_equal_one_unsharded_run(tmp_path, capfd):
    """Shards of a SLURM array (task ids 4 and 5 of `--array=4-5`) share one run directory; neither touches
    a file of the other; merged, they equal an unsharded run file for file: images byte-equal, JSON equal
    except for wall times and the merged result's `merged_from` (which shards it joined)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of {n} red cubes\n" for n in range(5)))
    common = [
        "generator=deterministic",
        "verifier=deterministic",
        "reflector=deterministic",
        "refiner=deterministic",
        "checker=deterministic",
        "search=reflectionflow",
        "search.budget=4",
        "prompts=file",
        f"prompts.path={prompts}",
    ]
    shared, single = tmp_path / "shared", tmp_path / "single"
    array = {"SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"}
    infer(capfd, *common, f"hydra.run.dir={single}")
    infer(capfd, *common, f"hydra.run.dir={shared}", env=array | {"SLURM_ARRAY_TASK_ID": "4"})
    first = snapshot(shared)
    infer(capfd, *common, f"hydra.run.dir={shared}", env=array | {"SLURM_ARRAY_TASK_ID": "5"})

    after = snapshot(shared)
    assert {name: after[name] for name in first} == first  # shard 1 rewrote nothing of shard 0
    second = set(after) - set(first)
    suffixes = {".shard-00000-of-00002": set(first), ".shard-00001-of-00002": second}
    for suffix, names in suffixes.items():
        assert {f"result{suffix}.json", f"infer{suffix}.log"} <= names
        assert f"summary{suffix}.json" not in names  # the result file replaced the running summary
        assert f".hydra{suffix}/config.yaml" in names
    assert {n.split("/")[0] for n in first if n[0].isdigit()} == {"00000", "00002", "00004"}
    assert {n.split("/")[0] for n in second if n[0].isdigit()} == {"00001", "00003"}

    merged = tmp_path / "merged"
    aggregate_cli(["--merge", str(shared), "--out", str(merged)])
    assert "merged 2 shards, 5 prompts" in capfd.readouterr().out

    expected, actual = run_files(single), run_files(merged)
    assert sorted(expected) == sorted(actual)
    assert sum(name.endswith(".png") for name in actual) == 5 * (4 + 2)  # 4 candidates, the sample, the sheet
    merged_from = actual["result.json"].pop("merged_from")
    assert [m["shard"] for m in merged_from] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    assert actual == expected
    result = expected["result.json"]
    assert (result["prompts"], result["width"], result["depth"], result["search_budget"]) == (5, 2, 1, 4)
    assert result["accuracy"] == sum(o["score"] >= 0.5 for o in result["per_prompt"]) / 5
