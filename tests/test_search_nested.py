"""Nested budgets: every budget of a preset read off one search at the largest equals its own search."""

from __future__ import annotations

import csv
import json

import pytest
from helpers.cli import run_in_process
from helpers.search import deterministic_engine

from reflectionflow.search.checkers import ThresholdChecker
from reflectionflow.search.config import Axes, SearchConfig
from reflectionflow.search.prompts import PromptItem
from reflectionflow.search.result_file import assess, nested_outcomes, read_budget
from reflectionflow.search.runner import run_search
from reflectionflow.search.verifiers import DeterministicVerifier

ITEMS = [PromptItem(i, f"a photo of {i} red cubes", {"prompt": f"a photo of {i} red cubes", "tag": "counting"})
         for i in range(10)]
CHECKER = ThresholdChecker(DeterministicVerifier(), threshold=0.5)
PRESETS = {
    "noise": dict(budget_width=None, axes=Axes()),
    "noise_prompt": dict(budget_width=2, axes=Axes(prompt=True)),
    "reflectionflow": dict(budget_width=8, axes=Axes(prompt=True, reflection=True)),
    "reflectionflow_deep": dict(budget_width=2, axes=Axes(prompt=True, reflection=True)),  # 2 x 3 at 8
}


def spent(budget) -> tuple:
    return budget.images, budget.nfe, budget.verifier.calls, budget.reflector.calls, budget.refiner.calls


@pytest.mark.parametrize("stop_score", [None, 0.8])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_budget_read_off_one_search_equals_its_own_search(tmp_path, preset, stop_score):
    nested = SearchConfig(budgets=(1, 2, 4, 8), stop_score=stop_score, **PRESETS[preset])
    run_search(deterministic_engine(nested), ITEMS, tmp_path / "nested", progress=False)
    indices = [item.index for item in ITEMS]
    read_off = nested_outcomes(tmp_path / "nested", indices, nested, CHECKER)
    assert [sub.budget for sub, _, _ in read_off] == [1, 2, 4, 8]
    stopped_somewhere = False
    for sub, outcomes, budget in read_off:
        alone = SearchConfig(budget=sub.budget, stop_score=stop_score, **PRESETS[preset])
        assert (sub.width, sub.depth) == (alone.width, alone.depth)
        run_dir = tmp_path / f"alone-{sub.budget}"
        run_search(deterministic_engine(alone), ITEMS, run_dir, progress=False)
        assert outcomes == assess(run_dir, indices, CHECKER), sub.budget  # selections, scores, verdicts
        assert spent(budget) == spent(read_budget(run_dir, indices)), sub.budget  # images, NFE, calls
        stopped_somewhere |= any(o.stopped for o in outcomes)
    assert stopped_somewhere == (stop_score is not None)
    if stop_score is not None:  # chains stop one by one, so the nested search spends less than 8 each
        assert read_budget(tmp_path / "nested", indices).images < 8 * len(ITEMS)


def test_budgets_that_are_no_prefix_are_refused():
    with pytest.raises(ValueError, match="chains all survive"):
        SearchConfig(budgets=(2, 4), budget_width=2, survivors=1)
    with pytest.raises(ValueError, match="chains all survive"):
        SearchConfig(budgets=(2, 4), budget_width=2, strategy="zero_order")
    with pytest.raises(ValueError, match="leave search.budget unset"):
        SearchConfig(budgets=(2, 4), budget=2)
    assert SearchConfig(budgets=(8, 2, 4), budget_width=2).budgets == (2, 4, 8)


def test_a_nested_job_gives_the_table_one_row_per_budget(tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\ntwo blue balls\n")
    done = run_in_process("infer", "-m", "progress=false", "generator=deterministic", "verifier=deterministic",
                          "reflector=deterministic", "refiner=deterministic", "checker=deterministic", "prompts=file",
                          f"prompts.path={prompts}", "search=noise,reflectionflow", "search.budgets=[1,2,4]",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", capture=capfd)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "scaling.csv").open()))
    assert sorted((r["preset"], r["budget"]) for r in rows) == sorted(
        (preset, str(n)) for preset in ("noise", "reflectionflow") for n in (1, 2, 4))
    result = json.loads((tmp_path / "sweep" / "0" / "result.json").read_text())
    assert [b["search_budget"] for b in result["budgets"]] == [1, 2, 4]
    assert all(b["per_prompt_budget"]["images"] == b["search_budget"] for b in result["budgets"])
