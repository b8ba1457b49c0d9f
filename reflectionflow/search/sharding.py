"""Which shard of a prompt set a process searches, and joining shard outputs back into one run.

A shard is every `num_shards`-th prompt starting at `shard_index` (`prompts.shard`). Shards write
disjoint files: prompt folders are named by the prompt's index in the full set, and every per-process
file (the running summary, the result, Hydra's saved config, the job log) carries `run_dir.shard_suffix`.
`merge_runs` joins the shards' prompt folders into one GenEval-layout directory with the result file an
unsharded run would have written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from reflectionflow.search.budget import Budget
from reflectionflow.search.errors import SetupError
from reflectionflow.search.result_file import (
    PromptOutcome,
    job_result,
    read_budget,
    read_results,
    write_result,
)
from reflectionflow.search.run_dir import (
    PROMPT_FOLDER,
    RUN_FILE,
    SEARCH_FILE,
    RunWriter,
    differing_keys,
    read_run_record,
    read_search,
    record_run,
    shard_suffix,
)

SHARD_KEYS = ("shard_index", "num_shards")


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise SetupError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def _slurm_array_shard(environ: Mapping[str, str]) -> tuple[int, int]:
    task = _int(environ, "SLURM_ARRAY_TASK_ID")
    first = _int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    step = _int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    if "SLURM_ARRAY_TASK_COUNT" in environ:
        count = _int(environ, "SLURM_ARRAY_TASK_COUNT")
    elif "SLURM_ARRAY_TASK_MAX" in environ:
        count = (_int(environ, "SLURM_ARRAY_TASK_MAX") - first) // step + 1
    else:
        raise SetupError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor _MAX is")
    index, off_grid = divmod(task - first, step)
    if off_grid or not 0 <= index < count:
        raise SetupError(
            f"SLURM array task {task} is not on a regular array (min {first}, step {step}, {count} tasks); "
            "set shard_index and num_shards explicitly"
        )
    return index, count


def environment_shard(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(shard_index, num_shards) from a SLURM job array and/or torchrun ranks; None when neither is set.

    SLURM: task `SLURM_ARRAY_TASK_ID` of an array starting at `SLURM_ARRAY_TASK_MIN` (so `--array=1-8`
    works) with step `SLURM_ARRAY_TASK_STEP`. torchrun: `RANK` of `WORLD_SIZE`. Both set (torchrun inside
    each array task): array task a, rank r -> shard a * WORLD_SIZE + r of count * WORLD_SIZE.
    """
    parts = []
    if "SLURM_ARRAY_TASK_ID" in environ:
        parts.append(_slurm_array_shard(environ))
    if "RANK" in environ and "WORLD_SIZE" in environ:
        parts.append((_int(environ, "RANK"), _int(environ, "WORLD_SIZE")))
    if not parts:
        return None
    index, count = 0, 1
    for part_index, part_count in parts:
        index, count = index * part_count + part_index, count * part_count
    return index, count


def resolve_shard(
    shard_index: int | None, num_shards: int | None, environ: Mapping[str, str]
) -> tuple[int, int]:
    """The config's shard when both keys are set, else the environment's (`environment_shard`), else (0, 1)."""
    if (shard_index is None) != (num_shards is None):
        raise SetupError(
            "set both shard_index and num_shards, or neither (then SLURM_ARRAY_TASK_ID/_COUNT or "
            "RANK/WORLD_SIZE decide, and without them the run is unsharded)"
        )
    if shard_index is None:
        shard_index, num_shards = environment_shard(environ) or (0, 1)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SetupError(
            f"need 0 <= shard_index < num_shards, got shard_index={shard_index} num_shards={num_shards}"
        )
    return shard_index, num_shards


def sharding_environment() -> Mapping[str, str]:
    """`os.environ`, except in a Hydra multirun: its jobs are sweep points (the submitit launcher runs them
    as a SLURM array), so array variables there say nothing about sharding; shard a sweep point with
    explicit `shard_index`/`num_shards` overrides instead."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return {}
    return os.environ


def shard_suffix_resolver(shard_index: int | None, num_shards: int | None) -> str:
    """OmegaConf resolver `rf.shard_suffix` (registered by the infer app) for Hydra's per-job file names.

    Bad shard settings resolve to "" here: Hydra would bury the error in a traceback, while the app
    reports it as one line right after Hydra's set-up.
    """
    try:
        return shard_suffix(*resolve_shard(shard_index, num_shards, sharding_environment()))
    except SetupError:
        return ""


# --- merging -------------------------------------------------------------------------------------------
def _prompt_folders(source: Path) -> dict[int, Path]:
    folders = {int(p.name): p for p in source.iterdir() if p.is_dir() and PROMPT_FOLDER.fullmatch(p.name)}
    unfinished = sorted(p.name for p in folders.values() if not (p / SEARCH_FILE).is_file())
    if unfinished:
        raise SetupError(
            f"{source}: prompt folders {', '.join(unfinished[:5])} are unfinished; re-run that shard into "
            "the same directory (finished prompts are skipped) before merging"
        )
    return folders


def _comparable(result: Mapping[str, Any]) -> dict[str, Any]:
    """What must agree between shards of one run: the job without sharding overrides, and the search."""
    job = dict(result["job"])
    job["overrides"] = [o for o in job["overrides"] if o.split("=", 1)[0].lstrip("+~") not in SHARD_KEYS]
    return {"job": job, "search": result["search"]}


def merge_runs(sources: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Join shard run directories into `out` (may be one of them, e.g. shards that shared a run dir).

    Copies every finished prompt folder and the shards' `run.json`, then writes `result.json` over all
    prompts (the result file replaces the summary `RunWriter` keeps), from the shards' search.json files and
    per-prompt verdicts. Refuses unfinished prompts, a prompt found twice, missing shards and shards of
    different searches.
    """
    roots = list(dict.fromkeys(Path(s).resolve() for s in sources))
    out = Path(out).resolve()
    for root in roots:
        if not root.is_dir():
            raise SetupError(f"{root} is not a directory")
    folders: dict[int, Path] = {}
    shard_results: list[tuple[Path, dict[str, Any]]] = []
    for root in roots:
        for index, folder in _prompt_folders(root).items():
            if index in folders:
                raise SetupError(f"prompt {folder.name} is in both {folders[index].parent} and {root}")
            folders[index] = folder
        found = [
            (path, result)
            for path, result in read_results(root)
            if path.parent == root and "merged_from" not in result  # not an earlier merge into root
        ]
        if not found:
            raise SetupError(
                f"{root} has no result*.json: that shard did not finish; re-run it before merging"
            )
        shard_results += found
    if out.is_dir():
        strays = sorted(set(_prompt_folders(out)) - set(folders))
        if strays:
            raise SetupError(f"{out} already holds prompt folders of another run ({strays[0]:05d}, ...)")

    reference = _comparable(shard_results[0][1])
    for path, result in shard_results[1:]:
        if _comparable(result) != reference:
            raise SetupError(f"{path} comes from a different search than {shard_results[0][0]}")
    records = [(root, record) for root in roots if (record := read_run_record(root)) is not None]
    for root, record in records[1:]:
        if differ := differing_keys(records[0][1], record):
            raise SetupError(
                f"{root / RUN_FILE} differs from {records[0][0] / RUN_FILE} in {', '.join(differ)}"
            )
    counts = {result["shard"]["count"] for _, result in shard_results}
    present = {result["shard"]["index"] for _, result in shard_results}
    if len(counts) != 1 or present != set(range(counts.pop())):
        shards = sorted((r["shard"]["index"], r["shard"]["count"]) for _, r in shard_results)
        raise SetupError(f"shards do not form one complete set: found (index, count) {shards}")

    outcomes = {o["index"]: o for _, result in shard_results for o in result["per_prompt"]}
    if set(outcomes) != set(folders):
        missing = sorted(set(folders) ^ set(outcomes))
        raise SetupError(f"prompt folders and the shards' results disagree about prompts {missing[:5]}")
    for index, folder in folders.items():
        if read_search(folder.parent, index)["score"] != outcomes[index]["score"]:
            raise SetupError(f"{folder}: search.json and its shard's result disagree on the score")

    out.mkdir(parents=True, exist_ok=True)
    if records:  # the merged run was made with what its shards were
        record_run(out, records[0][1])
    for folder in (folders[index] for index in sorted(folders)):
        target = out / folder.name
        if folder != target:
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(folder, target)
    writer = RunWriter(out)
    for index in sorted(folders):  # index order, as an unsharded run sums them
        writer.finished(index)
    writer.write_summary()

    job_seconds: dict[str, float] = {}  # summed over the shards: compute spent, not elapsed time
    for _, result in shard_results:
        for stage, value in result["budget"]["seconds"].items():
            if stage.startswith("job_"):
                job_seconds[stage[4:]] = job_seconds.get(stage[4:], 0.0) + value
    first = shard_results[0][1]
    common = {"job": reference["job"], "shard": {"index": 0, "count": 1}, "job_seconds": job_seconds}
    result = job_result(
        search=first["search"],
        outcomes=[PromptOutcome(**outcomes[i]) for i in sorted(outcomes)],
        budget=read_budget(out, sorted(folders)),
        merged_from=[
            {"dir": str(path.parent), "shard": result["shard"]}
            for path, result in sorted(shard_results, key=lambda pr: pr[1]["shard"]["index"])
        ],
        budgets=_merged_budgets([result for _, result in shard_results], common),
        **common,
    )
    write_result(out, result)
    return result


def _merged_budgets(shards: Sequence[Mapping[str, Any]], common: Mapping[str, Any]) -> list[dict] | None:
    """A nested-budget search's per-budget results over all shards: their prompts joined, their spending
    summed (each shard read its budgets off its own prompts' candidates)."""
    if not shards[0].get("budgets"):
        return None
    merged = []
    for parts in zip(*(shard["budgets"] for shard in shards), strict=True):
        spent = Budget()
        for part in parts:
            spent.add(Budget.from_dict(part["budget"]))
        prompts = sorted((o for part in parts for o in part["per_prompt"]), key=lambda o: o["index"])
        merged.append(job_result(search=parts[0]["search"], outcomes=[PromptOutcome(**o) for o in prompts],
                                 budget=spent, **common))
    return merged
