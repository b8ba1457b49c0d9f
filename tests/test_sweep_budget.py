"""Budget-matched presets (`search.budget=N`) and the sweep configs that run them."""

from __future__ import annotations

import asyncio

import pytest
from conftest import compose_app
from hydra.types import RunMode
from hydra.utils import instantiate

import reflectionflow.infer  # noqa: F401  (registers the rf.shard_suffix resolver the config uses)
from reflectionflow.search.config import SearchConfig, planned_cost, split_budget
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.generator import DeterministicGenerator
from reflectionflow.search.prompts import PromptItem
from reflectionflow.search.reflectors import DeterministicPromptRefiner, DeterministicReflector
from reflectionflow.search.verifiers import DeterministicVerifier

PRESET_SPLITS_AT_8 = {
    "noise": (8, 0),
    "noise_prompt": (2, 3),
    "reflectionflow": (4, 1),
    "reflectionflow_no_reflection": (4, 1),
    "reflectionflow_no_condition": (4, 1),
    "reflectionflow_condition_only": (4, 1),
    "zero_order": (2, 3),
}


@pytest.mark.parametrize(
    "budget, budget_width, split",
    [
        (8, None, (8, 0)),
        (1, None, (1, 0)),
        (1, 2, (1, 0)),  # one image: round 0 only
        (2, 2, (1, 1)),  # one base image + one corrected image
        (3, 2, (1, 2)),
        (4, 2, (2, 1)),
        (8, 2, (2, 3)),
        (32, 2, (2, 15)),
        (32, 8, (8, 3)),
        (6, 4, (3, 1)),  # width capped at budget // 2
    ],
)
def test_split_budget_spends_exactly_the_budget(budget, budget_width, split):
    width, depth = split_budget(budget, budget_width)
    assert (width, depth) == split
    assert width * (depth + 1) == budget


@pytest.mark.parametrize(
    "budget, budget_width, message",
    [
        (5, 2, r"search.budget=5 cannot be split into rounds of 2 images"),
        (20, 8, r"search.budget=20 cannot be split into rounds of 8 images"),
        (0, None, "positive number of images"),
        (True, None, "positive number of images"),
        (4, 0, "search.budget_width"),
    ],
)
def test_budgets_a_preset_cannot_match_fail_with_the_key(budget, budget_width, message):
    with pytest.raises(ValueError, match=message):
        split_budget(budget, budget_width)
    with pytest.raises(ValueError, match=message):
        SearchConfig(budget=budget, budget_width=budget_width)


def test_budget_replaces_width_and_depth_and_is_recorded():
    config = SearchConfig(width=7, depth=5, budget=8, budget_width=2)
    assert config.to_dict() | {"axes": None} == {
        "width": 2,
        "depth": 3,
        "budget": 8,
        "budget_width": 2,
        "strategy": "chains",
        "axes": None,
        "survivors": None,
        "seed": 0,
        "min_cosine": 0.95,
        "stop_score": None,
        "corrector_input": "full",
        "budgets": None,
        "neighbour_cosine": "exact",
        "restart": True,
        "base_images": 32,
        "final_pick_includes_base": False,
    }
    with pytest.raises(ValueError, match="search.survivors=2 must be in"):
        SearchConfig(budget=2, budget_width=2, survivors=2)  # budget 2 -> width 1


@pytest.mark.parametrize("preset", sorted(PRESET_SPLITS_AT_8))
def test_budget_8_gives_every_preset_8_images(preset):
    cfg = compose_app("infer", f"search={preset}", "search.budget=8")
    search: SearchConfig = instantiate(cfg.search, _convert_="all")
    assert (search.width, search.depth) == PRESET_SPLITS_AT_8[preset]
    assert planned_cost(search)["images"] == 8

    generator = DeterministicGenerator(size=16, num_inference_steps=3)
    engine = SearchEngine(
        generator, DeterministicVerifier(), search, DeterministicReflector(), DeterministicPromptRefiner()
    )
    result = asyncio.run(engine.search(PromptItem(0, "a red cube", {"tag": "colors"})))
    assert result.budget.images == len(generator.requests) == len(result.candidates) == 8
    assert result.budget.nfe == 8 * 3


def test_sweep_configs_start_a_multirun_over_their_grid():
    budget = compose_app("infer", "sweep=budget", hydra_node=True)
    matched = compose_app("infer", "sweep=matched", hydra_node=True)
    assert budget.hydra.mode == RunMode.MULTIRUN == matched.hydra.mode
    assert dict(budget.hydra.sweeper.params) == {"search.width": "1,2,4,8", "search.depth": "0,1,2,4"}
    assert dict(matched.hydra.sweeper.params) == {
        "search": "noise,noise_prompt,reflectionflow,zero_order",
        "search.budget": "1,2,4,8,16,32",
    }
    assert [c._target_ for c in budget.hydra.callbacks.values()] == [
        "reflectionflow.config.RedactSavedConfigs",  # before the aggregate reads the saved configs
        "reflectionflow.search.aggregation.AggregateCallback",
    ]
    for preset in matched.hydra.sweeper.params.search.split(","):  # every budget of the grid is matchable
        cfg = compose_app("infer", f"search={preset}")
        for budget_n in map(int, matched.hydra.sweeper.params["search.budget"].split(",")):
            config = SearchConfig(budget=budget_n, budget_width=cfg.search.budget_width)
            assert planned_cost(config)["images"] == budget_n
