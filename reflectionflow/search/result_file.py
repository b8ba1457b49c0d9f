"""The per-job result file: what one search job over a prompt set achieved and spent, in one JSON, assessed
from the job's run directory (`assess`, `read_budget`), built (`job_result`), written and read back.

`<run>/result.json` (`result.shard-00001-of-00004.json` for a shard) is what sweeps aggregate:

    preset, width, depth, search_budget   the search that produced it (search_budget: search.budget or null)
    job                               config choices and command-line overrides
    search                            the full search config (width/depth as resolved from a budget)
    shard                             {"index", "count"} of the prompt set this job searched
    prompts, mean_score, failed_selections
    stopped                           prompts whose search ended early at search.stop_score
    accuracy, checked                 share of prompts a checker passed (null without a checker)
    tags                              the same per GenEval tag
    budget                            what was spent (the running summary.json's): images, NFE, calls, attempts and
                                      tokens per role, seconds per stage; plus the job's own wall time in
                                      seconds.job_setup / job_search / job_assess / job_total
    per_prompt_budget                 images, NFE, calls and tokens per prompt (the scaling plot's x axes)
    per_prompt                        index, tag, score, ok, correct, stopped: enough to merge shards unchanged
    budgets                           with nested budgets (`search.budgets`): one such result per budget,
                                      read off the one search (`nested_results`)

Every wall time is under `budget.seconds`, so two runs of the same search differ only there.

Nested budgets: a chain search whose chains all survive makes, at a smaller budget, exactly the first
chains' first rounds of the search at the largest budget (seeds are per chain and round; a chain's next
inputs come from its own candidates only). Its result is therefore read off the big search's candidates:
the candidates of its width x (depth + 1) grid in (round, chain) order, up to the first reaching
`stop_score` (where its own search would stop), selected as its own search selects. Images, NFE and
logical API calls are what that search would spend; tokens and wall time are the one search's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from reflectionflow.search.budget import ROLES, Budget
from reflectionflow.search.checkers import Checker
from reflectionflow.search.config import SearchConfig
from reflectionflow.search.run_dir import SELECTED_FILE, prompt_dir, read_record, read_search, write_json

UNTAGGED = "untagged"


@dataclass(frozen=True)
class PromptOutcome:
    """One prompt's selected image: its verifier score and, with a checker, whether it is correct."""

    index: int
    tag: str | None
    score: float
    ok: bool
    correct: bool | None = None
    stopped: bool = False


def result_path(run_dir: str | os.PathLike, suffix: str = "") -> Path:
    return Path(run_dir) / f"result{suffix}.json"


def assess(run_dir: Path, indices: Iterable[int], checker: Checker | None = None) -> list[PromptOutcome]:
    """Outcomes of the finished prompts `indices`, checking each selected image when a checker is given."""
    outcomes = []
    for index in indices:
        search = read_search(run_dir, index)
        correct = None
        if checker is not None:
            with Image.open(prompt_dir(run_dir, index) / SELECTED_FILE) as image:
                correct = bool(checker.check(image.convert("RGB"), read_record(run_dir, index)))
        stopped = search.get("stopped", False)
        outcomes.append(
            PromptOutcome(index, search["tag"], search["score"], search["score_ok"], correct, stopped)
        )
    return outcomes


def read_budget(run_dir: Path, indices: Iterable[int]) -> Budget:
    """The summed budget of the finished prompts `indices` (from their search.json files)."""
    total = Budget()
    for index in indices:
        total.add(Budget.from_dict(read_search(run_dir, index)["budget"]))
    return total


def _reaches(candidate: Mapping[str, Any], stop_score: float | None) -> bool:
    score = candidate["score"]
    return stop_score is not None and score["ok"] and score["value"] >= stop_score


def prefix_search(candidates: Sequence[Mapping[str, Any]], config: SearchConfig) -> tuple[dict, Budget]:
    """(selected candidate, spending) of the search `config` (one of a nested search's budgets) read off
    the nested search's `candidates` (search.json entries)."""
    grid = [(r, c) for r in range(config.depth + 1) for c in range(config.width)]
    made = {(c["round"], c["chain"]): c for c in candidates}
    spent: list[Mapping[str, Any]] = []
    for key in grid:
        if key not in made:
            raise ValueError(f"candidate (round, chain) {key} of a {config.width} x {config.depth} search is "
                             "missing: the nested search stopped that chain without reaching the stop score")
        spent.append(made[key])
        if _reaches(made[key], config.stop_score):
            break
    selected = max(spent, key=lambda c: (c["score"]["ok"], c["score"]["value"]))  # first of equals
    budget = Budget(images=len(spent), nfe=sum(c["nfe"] for c in spent))
    budget.verifier.calls = len(spent)
    advised = sum(1 for c in spent if c["round"] < config.depth and not _reaches(c, config.stop_score))
    budget.reflector.calls = advised if config.reflects else 0
    budget.refiner.calls = advised if config.refines else 0
    return dict(selected), budget


def nested_outcomes(
    run_dir: Path, indices: Sequence[int], config: SearchConfig, checker: Checker | None = None
) -> list[tuple[SearchConfig, list[PromptOutcome], Budget]]:
    """Per budget of `config.budgets`: (that budget's search config, its outcomes, what it spends), read
    off the nested search's candidates in `run_dir` (see the module docstring)."""
    searches = {index: read_search(run_dir, index) for index in indices}
    found = []
    for budget_n in config.budgets:
        sub = config.at_budget(budget_n)
        outcomes, spent = [], Budget()
        for index, search in searches.items():
            selected, cost = prefix_search(search["candidates"], sub)
            correct = None
            if checker is not None:
                with Image.open(prompt_dir(run_dir, index) / selected["file"]) as image:
                    correct = bool(checker.check(image.convert("RGB"), read_record(run_dir, index)))
            score = selected["score"]
            outcomes.append(PromptOutcome(index, search["tag"], score["value"], score["ok"], correct,
                                          _reaches(selected, sub.stop_score)))
            spent.add(cost)
        found.append((sub, outcomes, spent))
    return found


def _scores(outcomes: Sequence[PromptOutcome]) -> dict[str, Any]:
    scores = [o.score for o in outcomes]
    verdicts = [o.correct for o in outcomes if o.correct is not None]
    return {
        "prompts": len(outcomes),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "accuracy": sum(verdicts) / len(verdicts) if verdicts else None,
        "checked": len(verdicts),
    }


def per_prompt_budget(budget: Budget, prompts: int) -> dict[str, float] | None:
    """Mean spending per prompt: the x axes of scaling plots (images, NFE) and the API cost."""
    if prompts == 0:
        return None
    return {
        "images": budget.images / prompts,
        "nfe": budget.nfe / prompts,
        **{f"{role}_calls": budget.role(role).calls / prompts for role in ROLES},
        "tokens_in": sum(budget.role(role).tokens_in for role in ROLES) / prompts,
        "tokens_out": sum(budget.role(role).tokens_out for role in ROLES) / prompts,
    }


def job_result(
    *,
    job: Mapping[str, Any],
    search: Mapping[str, Any],
    shard: Mapping[str, int],
    outcomes: Sequence[PromptOutcome],
    budget: Budget,
    job_seconds: Mapping[str, float],
    wandb: Mapping[str, Any] | None = None,
    merged_from: Sequence[Mapping[str, Any]] | None = None,
    budgets: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The result file's content (see the module docstring); `outcomes` in prompt-index order,
    `job_seconds` the job's wall time by stage (setup, search, assess, total), `budgets` the nested
    budgets' results."""
    tags: dict[str, list[PromptOutcome]] = {}
    for outcome in outcomes:
        tags.setdefault(outcome.tag or UNTAGGED, []).append(outcome)
    spent = budget.to_dict()
    spent["seconds"].update({f"job_{stage}": value for stage, value in job_seconds.items()})
    result = {
        "preset": job["preset"],
        "width": search["width"],
        "depth": search["depth"],
        "search_budget": search.get("budget"),
        "job": dict(job),
        "search": dict(search),
        "shard": dict(shard),
        **_scores(outcomes),
        "failed_selections": sum(1 for o in outcomes if not o.ok),
        "stopped": sum(1 for o in outcomes if o.stopped),
        "tags": {tag: _scores(members) for tag, members in sorted(tags.items())},
        "budget": spent,
        "per_prompt_budget": per_prompt_budget(budget, len(outcomes)),
        "wandb": None if wandb is None else dict(wandb),
        "per_prompt": [asdict(o) for o in outcomes],
    }
    if merged_from is not None:
        result["merged_from"] = [dict(m) for m in merged_from]
    if budgets is not None:
        result["budgets"] = [dict(b) for b in budgets]
    return result


def write_result(run_dir: str | os.PathLike, result: Mapping[str, Any], suffix: str = "") -> Path:
    """Write the result file; it replaces the running summary of the same shard (`summary<suffix>.json`,
    a subset of it), so a finished run has one run-level file."""
    path = result_path(run_dir, suffix)
    write_json(path, result)
    (Path(run_dir) / f"summary{suffix}.json").unlink(missing_ok=True)
    return path


def read_results(root: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """Every result file under `root` (a run, a multirun or a tree of them), in path order."""
    found = []
    for path in sorted(Path(root).rglob("result*.json")):
        if path.name == "result.json" or path.name.startswith("result.shard-"):
            found.append((path, json.loads(path.read_text(encoding="utf-8"))))
    return found
