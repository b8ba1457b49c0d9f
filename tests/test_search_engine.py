"""The search engine with deterministic backends: selection, provenance, budgets, seeds, resumable outputs."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from reflectionflow.search.budget import Budget
from reflectionflow.search.config import STRATEGIES, Axes, SearchConfig, planned_cost
from reflectionflow.search.engine import STRATEGY_CLASSES, SearchEngine, assign_parents
from reflectionflow.search.errors import SetupError
from reflectionflow.search.generator import DeterministicGenerator
from reflectionflow.search.noise import derive_seed, perturb_noise
from reflectionflow.search.prompts import PromptItem, file_prompts, geneval_prompts, shard, single_prompt
from reflectionflow.search.reflectors import DeterministicPromptRefiner, DeterministicReflector
from reflectionflow.search.runner import run_search
from reflectionflow.search.verifiers import DeterministicVerifier

STEPS = 7
ALL_AXES = Axes(noise=True, prompt=True, reflection=True)


def make_engine(config: SearchConfig, generator: DeterministicGenerator | None = None) -> SearchEngine:
    generator = generator or DeterministicGenerator(size=16, num_inference_steps=STEPS, micro_batch=3)
    return SearchEngine(
        generator, DeterministicVerifier(), config, DeterministicReflector(), DeterministicPromptRefiner()
    )


def search(config: SearchConfig, item: PromptItem | None = None, generator=None):
    engine = make_engine(config, generator)
    return asyncio.run(
        engine.search(item or PromptItem(3, "a photo of a red cat", {"tag": "colors"}))
    ), engine


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def test_best_of_n_returns_the_maximum():
    result, _ = search(SearchConfig(width=6, depth=0))
    values = [c.score.value for c in result.candidates]
    assert len(set(values)) == 6
    assert result.best.score.value == max(values)
    assert [c.prompt for c in result.candidates] == ["a photo of a red cat"] * 6
    assert all(c.parent is None and c.reflection is None for c in result.candidates)


def test_failed_scores_rank_below_every_ok_score():
    result, engine = search(SearchConfig(width=4, depth=0))
    result.candidates[0].score.ok = False
    result.candidates[0].score.value = 2.0
    best = max(result.candidates, key=lambda c: c.score.rank)
    assert best is not result.candidates[0]


def test_reflection_round_passes_previous_image_and_reflection_to_the_generator():
    result, engine = search(SearchConfig(width=3, depth=2, axes=ALL_AXES))
    requests = engine.generator.requests
    by_key = {(c.round, c.chain): c for c in result.candidates}
    assert len(requests) == 9
    for request, candidate in zip(requests, result.candidates, strict=True):
        if candidate.round == 0:
            assert request.condition is None and request.reflection is None
            continue
        parent = by_key[candidate.parent]
        assert candidate.parent == (candidate.round - 1, candidate.chain)
        assert pixels(request.condition) == pixels(parent.image)
        expected = f"Fix what keeps the image from matching the prompt (score {parent.score.value:.3f}). Keep the rest."
        assert request.reflection == candidate.reflection == expected
        assert (
            request.prompt == candidate.prompt == f"a photo of a red cat, precisely as described; {expected}"
        )
        assert request.original_prompt == "a photo of a red cat"


@pytest.mark.parametrize(
    "config",
    [
        SearchConfig(width=4, depth=0),
        SearchConfig(width=2, depth=3, axes=ALL_AXES),
        SearchConfig(width=3, depth=2, axes=Axes(noise=True, prompt=True)),
        SearchConfig(width=4, depth=2, axes=Axes(noise=False, reflection=True), survivors=1),
        SearchConfig(width=5, depth=2, axes=ALL_AXES, survivors=2),
        SearchConfig(width=3, depth=3, strategy="zero_order"),
    ],
    ids=["best_of_n", "reflectionflow", "noise_prompt", "one_survivor", "two_survivors", "zero_order"],
)
def test_width_by_depth_spends_exactly_the_planned_budget(config):
    result, engine = search(config)
    plan = planned_cost(config, nfe_per_image=STEPS)
    budget = result.budget
    assert (
        budget.images == plan["images"] == config.width * (config.depth + 1) == len(engine.generator.requests)
    )
    assert budget.nfe == plan["nfe"]
    assert budget.verifier.calls == plan["verifier_calls"]
    assert budget.reflector.calls == plan["reflector_calls"]
    assert budget.refiner.calls == plan["refiner_calls"]
    grid = {(r, c) for r in range(config.depth + 1) for c in range(config.width)}
    assert {(c.round, c.chain) for c in result.candidates} == grid
    assert result.best.score.value == max(c.score.value for c in result.candidates)


def test_survivors_carry_the_best_chains_forward():
    result, engine = search(SearchConfig(width=4, depth=1, axes=Axes(reflection=True), survivors=1))
    round0 = [c for c in result.candidates if c.round == 0]
    best0 = max(round0, key=lambda c: c.score.value)
    for candidate in (c for c in result.candidates if c.round == 1):
        assert candidate.parent == (0, best0.chain)
    assert result.budget.reflector.calls == 1


def test_assign_parents():
    ranks = [(True, 0.1), (True, 0.9), (False, 5.0), (True, 0.5)]
    assert assign_parents(ranks, kept=4) == [0, 1, 2, 3]
    assert assign_parents(ranks, kept=2) == [1, 1, 3, 3]
    assert assign_parents(ranks, kept=1) == [1, 1, 1, 1]
    assert assign_parents([(True, 0.5)] * 3, kept=1) == [0, 0, 0]


def test_seeds_are_a_pure_function_and_the_noise_axis_controls_them():
    assert derive_seed(0, 5, 1, 2) == derive_seed(0, 5, 1, 2)
    seeds = {derive_seed(b, p, c, r) for b in (0, 1) for p in range(3) for c in range(3) for r in range(3)}
    assert len(seeds) == 54 and all(0 <= s < 2**31 for s in seeds)
    fresh, _ = search(SearchConfig(width=2, depth=2, axes=Axes(noise=True, reflection=True)))
    kept, _ = search(SearchConfig(width=2, depth=2, axes=Axes(noise=False, reflection=True)))
    assert len({c.seed for c in fresh.candidates}) == 6
    for chain in range(2):
        assert len({c.seed for c in kept.candidates if c.chain == chain}) == 1


def test_every_configurable_strategy_has_a_search_class():
    assert set(STRATEGY_CLASSES) == set(STRATEGIES)


def test_zero_order_explores_the_neighbourhood_of_the_best_noise():
    config = SearchConfig(width=3, depth=3, strategy="zero_order", min_cosine=0.9, restart=False)
    result, engine = search(config)
    pivot = max((c for c in result.candidates if c.round == 0), key=lambda c: c.score.rank)
    for round in range(1, 4):
        neighbours = [c for c in result.candidates if c.round == round]
        for candidate in neighbours:
            assert candidate.parent == (pivot.round, pivot.chain)
            cosine = torch.nn.functional.cosine_similarity(
                candidate.noise.flatten(), pivot.noise.flatten(), dim=0
            )
            assert 0.9 - 1e-5 <= cosine <= 1 + 1e-5
            assert torch.allclose(candidate.noise.norm(), pivot.noise.norm(), rtol=1e-4)
        best = max(neighbours, key=lambda c: c.score.rank)
        if best.score.rank > pivot.score.rank:
            pivot = best


def test_perturb_noise_keeps_norm_and_bounds_the_angle():
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        near = perturb_noise(noise, seed, 0.95)
        cosine = torch.nn.functional.cosine_similarity(near.flatten(), noise.flatten(), dim=0)
        assert 0.95 - 1e-5 <= cosine <= 1.0 + 1e-5
        assert torch.allclose(near.norm(), noise.norm(), rtol=1e-5)
    assert torch.equal(perturb_noise(noise, 3, 0.95), perturb_noise(noise, 3, 0.95))
    assert not torch.equal(perturb_noise(noise, 3, 0.95), perturb_noise(noise, 4, 0.95))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 0}, "search.width"),
        ({"strategy": "beam"}, "search.strategy"),
        ({"survivors": 5, "width": 4}, "search.survivors"),
        ({"strategy": "zero_order", "axes": {"reflection": True}}, "zero_order"),
        ({"depth": 2, "axes": {"noise": False}}, "enable an axis"),
    ],
)
def test_bad_search_configs_fail_with_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_engine_needs_the_backends_its_axes_use():
    with pytest.raises(ValueError, match="reflector"):
        SearchEngine(DeterministicGenerator(), DeterministicVerifier(), SearchConfig(depth=1, axes=ALL_AXES))


# --- outputs, resume, prompt sets ----------------------------------------------------------------------
def snapshot(run_dir: Path) -> dict[str, object]:
    """Every file of a run directory; JSON without wall-clock times, which legitimately differ."""
    files = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        key = str(path.relative_to(run_dir))
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data.get("budget", {}).pop("seconds", None)
            files[key] = data
        else:
            files[key] = path.read_bytes()
    return files


class FailingGenerator(DeterministicGenerator):
    """Dies (like a killed process) on its `fail_at`-th call to `generate`."""

    fail_at: int = 0

    def generate(self, requests, on_result=None):
        self.fail_at -= 1
        if self.fail_at == 0:
            raise KeyboardInterrupt("killed")
        return super().generate(requests, on_result)


def test_interrupted_run_resumes_to_the_same_outputs(tmp_path):
    config = SearchConfig(width=2, depth=1, axes=ALL_AXES)
    items = geneval_prompts()[:5]
    run_search(make_engine(config), items, tmp_path / "straight", progress=False)

    broken = FailingGenerator(size=16, num_inference_steps=STEPS, micro_batch=3)
    broken.fail_at = 6  # two generate calls per prompt: dies in the middle of the third prompt
    with pytest.raises(KeyboardInterrupt):
        run_search(make_engine(config, broken), items, tmp_path / "resumed", progress=False)
    finished = sorted(p.parent.name for p in (tmp_path / "resumed").glob("*/search.json"))
    assert finished == ["00000", "00001"]
    leftover = tmp_path / "resumed" / "00002" / "candidates"  # as if killed while writing prompt 2
    leftover.mkdir(parents=True)
    (leftover / "r07_c07.png").write_bytes(b"partial")
    (tmp_path / "resumed" / ".summary.json.tmp-99999").write_bytes(b"{")

    rerun = make_engine(config)
    summary = run_search(rerun, items, tmp_path / "resumed", progress=False)
    assert len(rerun.generator.requests) == 3 * 4  # only the three unfinished prompts were searched
    assert summary["prompts"] == 5
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "straight")


def test_geneval_layout_and_search_json(tmp_path):
    config = SearchConfig(width=2, depth=1, axes=ALL_AXES)
    items = geneval_prompts()
    summary = run_search(make_engine(config), items[:2], tmp_path, progress=False)
    folder = tmp_path / "00001"
    assert json.loads((folder / "metadata.jsonl").read_text()) == items[1].record
    result = json.loads((folder / "search.json").read_text())
    selected = result["selected"]
    assert (folder / "samples" / "0000.png").read_bytes() == (folder / selected["file"]).read_bytes()
    assert Image.open(io.BytesIO((folder / "samples" / "0000.png").read_bytes())).size == (16, 16)
    assert len(result["candidates"]) == 4
    for candidate in result["candidates"]:
        assert (folder / candidate["file"]).is_file()
        assert {
            "round",
            "chain",
            "parent",
            "seed",
            "prompt",
            "reflection",
            "score",
            "failures",
        } <= candidate.keys()
        assert candidate["score"]["ok"] is True
    assert result["score"] == max(c["score"]["value"] for c in result["candidates"])
    total = Budget()
    for index in range(2):
        total.add(
            Budget.from_dict(json.loads((tmp_path / f"{index:05d}" / "search.json").read_text())["budget"])
        )
    assert summary["budget"]["images"] == total.images == 8
    assert summary["budget"]["reflector"]["calls"] == total.reflector.calls == 4
    assert json.loads((tmp_path / "summary.json").read_text())["prompts"] == 2


def test_hostile_prompts_stay_inside_the_run_directory(tmp_path):
    hostile = ["../../x", "/etc/passwd", "a\nb/../../c\r\n", "x" * 10_000, "..", "con", "${oc.env:HOME}"]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in hostile))
    run_dir = tmp_path / "out" / "run"
    run_search(
        make_engine(SearchConfig(width=2, depth=1, axes=ALL_AXES)),
        file_prompts(str(prompt_file)),
        run_dir,
        progress=False,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "prompts.jsonl"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["run"]
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [f"{i:05d}" for i in range(len(hostile))] + ["summary.json"]
    for index, prompt in enumerate(hostile):
        assert json.loads((run_dir / f"{index:05d}" / "search.json").read_text())["prompt"] == prompt
    for path in run_dir.rglob("*"):
        assert path.resolve().is_relative_to(run_dir.resolve())


def test_prompt_sets_and_sharding(tmp_path):
    geneval = geneval_prompts()
    assert len(geneval) == 553 and geneval[0].record["tag"] == "single_object"
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \n")
    assert [(i.index, i.prompt) for i in file_prompts(str(text))] == [(0, "a cat"), (1, "a dog")]
    assert single_prompt("a cow")[0].record == {"prompt": "a cow"}
    shards = [shard(geneval, i, 3) for i in range(3)]
    assert sorted(i.index for s in shards for i in s) == list(range(553))
    with pytest.raises(SetupError, match="prompts.path"):
        file_prompts(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(SetupError, match="record 1"):
        file_prompts(str(bad))
    with pytest.raises(SetupError, match="shard_index"):
        shard(geneval, 3, 3)


def test_shards_write_their_own_summary_and_disjoint_folders(tmp_path):
    config = SearchConfig(width=1, depth=0)
    items = geneval_prompts()[:5]
    for index in range(2):
        run_search(make_engine(config), items, tmp_path, shard_index=index, num_shards=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("0*")) == [f"{i:05d}" for i in range(5)]
    first = json.loads((tmp_path / "summary.shard-00000-of-00002.json").read_text())
    second = json.loads((tmp_path / "summary.shard-00001-of-00002.json").read_text())
    assert (first["prompts"], second["prompts"]) == (3, 2)
