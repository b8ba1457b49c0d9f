"""`search=paper` (the paper's own reflection search: N base images, top-k chains, the pick among corrected
images) and zero-order search with tt-scale-flux's restart and exact-threshold neighbours."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hydra.utils import instantiate

from reflectionflow.search.config import Axes, SearchConfig, planned_cost
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.generator import DeterministicGenerator, FluxGenerator
from reflectionflow.search.prompts import PromptItem
from reflectionflow.search.reflectors import DeterministicPromptRefiner, DeterministicReflector
from reflectionflow.search.verifiers import DeterministicVerifier

ITEM = PromptItem(2, "a photo of a red cat", {"tag": "colors"})
REFLECTION = Axes(noise=True, prompt=True, reflection=True)


def search(config: SearchConfig, generator=None):
    generator = generator or DeterministicGenerator(size=16, num_inference_steps=5, micro_batch=3)
    engine = SearchEngine(
        generator, DeterministicVerifier(), config, DeterministicReflector(), DeterministicPromptRefiner()
    )
    return asyncio.run(engine.search(ITEM)), generator


def check_plan(result, config: SearchConfig, requests: list, nfe_per_image: int) -> None:
    plan = planned_cost(config, nfe_per_image)
    budget = result.budget
    assert budget.images == plan["images"] == len(requests) == len(result.candidates)
    assert budget.base_images == plan["base_images"] == sum(r.condition is None for r in requests)
    assert budget.corrected_images == plan["corrected_images"] == sum(r.condition is not None for r in requests)
    assert budget.nfe == plan["nfe"]
    assert budget.verifier.calls == plan["verifier_calls"]
    assert budget.reflector.calls == plan["reflector_calls"]
    assert budget.refiner.calls == plan["refiner_calls"]


@pytest.mark.parametrize("base_images, width, depth", [(32, 2, 16), (6, 3, 2), (1, 1, 1)])
def test_paper_search_spends_the_plan_and_picks_among_corrected_images(base_images, width, depth):
    config = SearchConfig(strategy="paper", base_images=base_images, width=width, depth=depth, axes=REFLECTION)
    result, generator = search(config)
    check_plan(result, config, generator.requests, 5)
    assert planned_cost(config)["images"] == base_images + width * depth
    base = [c for c in result.candidates if c.round == 0]
    assert len(base) == base_images and all(c.parent is None for c in base)
    top = sorted(base, key=lambda c: c.score.rank, reverse=True)[:width]
    for round_index in range(1, depth + 1):
        made = [c for c in result.candidates if c.round == round_index]
        assert [c.chain for c in made] == list(range(width))
        for candidate in made:
            first = top[candidate.chain]
            expected = (first.round, first.chain) if round_index == 1 else (round_index - 1, candidate.chain)
            assert candidate.parent == expected and candidate.reflection is not None
    corrected = [c for c in result.candidates if c.round > 0]
    assert result.best.round > 0
    assert result.best.score.value == max(c.score.value for c in corrected)


def test_the_base_images_can_compete_in_the_final_pick():
    kwargs = dict(strategy="paper", base_images=32, width=1, depth=1, axes=REFLECTION)
    only_corrected, _ = search(SearchConfig(**kwargs))
    everything, _ = search(SearchConfig(**kwargs, final_pick_includes_base=True))
    assert only_corrected.best.round == 1  # 1 corrected image against 32 base ones: a base image is better
    assert everything.best.round == 0
    assert everything.best.score.value == max(c.score.value for c in everything.candidates)
    assert only_corrected.budget.to_dict() | {"seconds": None} == everything.budget.to_dict() | {"seconds": None}


def test_the_reflector_sees_the_prompt_and_reflection_that_made_each_image():
    seen = []

    class RecordingReflector(DeterministicReflector):
        async def reflect(self, image, prompt, evaluation, meta, *, image_prompt=None, image_reflection=None):
            seen.append((image_prompt, image_reflection))
            return await super().reflect(image, prompt, evaluation, meta)

    config = SearchConfig(strategy="paper", base_images=4, width=2, depth=3, axes=REFLECTION)
    engine = SearchEngine(DeterministicGenerator(size=16), DeterministicVerifier(), config, RecordingReflector(),
                          DeterministicPromptRefiner())
    result = asyncio.run(engine.search(ITEM))
    base = [c for c in result.candidates if c.round == 0]
    reflected = sorted(base, key=lambda c: c.score.rank, reverse=True)[:2]  # the top base images ...
    reflected += [c for c in result.candidates if 0 < c.round < 3]  # ... and every corrected one but the last
    assert sorted(seen, key=str) == sorted(((c.prompt, c.reflection) for c in reflected), key=str)
    assert (ITEM.prompt, None) in seen and any(reflection is not None for _, reflection in seen)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"axes": {"prompt": True}}, "search.axes.reflection=true"),
        ({"budget": 8}, "search.budget does not apply"),
        ({"survivors": 1}, "search.survivors does not apply"),
        ({"stop_score": 1.0}, "search.stop_score does not apply"),
        ({"width": 3, "base_images": 2}, "needs width <= base_images"),
        ({"depth": 0}, "depth >= 1"),
        ({"base_images": 0}, "search.base_images must be a positive int"),
    ],
)
def test_bad_paper_configs_fail_with_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**({"strategy": "paper", "axes": REFLECTION.__dict__, "width": 2, "depth": 1} | kwargs))


def test_search_paper_preset_is_the_papers_plan(compose_config):
    cfg = compose_config("infer", "search=paper")
    config = instantiate(cfg.search, _convert_="all")
    assert (config.strategy, config.base_images, config.width, config.depth) == ("paper", 32, 2, 16)
    assert planned_cost(config) == {"images": 64, "base_images": 32, "corrected_images": 32,
                                    "verifier_calls": 64, "reflector_calls": 32, "refiner_calls": 32}


def test_paper_search_on_the_tiny_model_spends_exactly_the_planned_images(tiny_flux_path):
    generator = FluxGenerator(str(tiny_flux_path), height=64, width=64, num_inference_steps=2, condition_size=32,
                              micro_batch=4)
    requests = []
    generate = generator.generate

    def recording(batch, on_result=None):
        requests.extend(batch)
        return generate(batch, on_result)

    generator.generate = recording
    config = SearchConfig(strategy="paper", base_images=5, width=2, depth=2, axes=REFLECTION)
    result, _ = search(config, generator)
    check_plan(result, config, requests, 2)
    assert (result.budget.base_images, result.budget.corrected_images) == (5, 4)
    assert result.best.round > 0 and result.best.parent is not None
    assert len({c.image.tobytes() for c in result.candidates}) == 9


# --- zero-order search: tt-scale-flux's options ---------------------------------------------------------
def test_zero_order_neighbours_sit_exactly_at_the_threshold_and_restarts_follow_a_failed_round():
    config = SearchConfig(width=2, depth=12, strategy="zero_order", min_cosine=0.8)
    result, _ = search(config)
    by_round = [[c for c in result.candidates if c.round == r] for r in range(13)]
    pivot = max(by_round[0], key=lambda c: c.score.rank)
    restarting, restarts = False, 0
    for made in by_round[1:]:
        if restarting:
            assert all(c.parent is None for c in made)
            restarts += 1
        else:
            for c in made:
                assert c.parent == (pivot.round, pivot.chain)
                cosine = torch.nn.functional.cosine_similarity(c.noise.flatten().double(),
                                                               pivot.noise.flatten().double(), dim=0)
                assert cosine.item() == pytest.approx(0.8, abs=1e-5)
        best = max(made, key=lambda c: c.score.rank)
        if restarting or best.score.rank > pivot.score.rank:
            pivot, restarting = best, False
        else:
            restarting = True
    assert restarts > 0  # the run exercised a restart
    assert result.budget.images == planned_cost(config)["images"] == 26


def test_zero_order_without_restart_stays_at_its_pivot():
    config = SearchConfig(width=2, depth=12, strategy="zero_order", restart=False, neighbour_cosine="uniform")
    result, _ = search(config)
    assert all(c.parent is not None for c in result.candidates if c.round > 0)
    with pytest.raises(ValueError, match="search.neighbour_cosine"):
        SearchConfig(strategy="zero_order", neighbour_cosine="gaussian")
