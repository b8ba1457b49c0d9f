"""Cross-prompt batching, early stop and the corrector-input ablations: concurrent prompt searches share the
generator's calls yet give each prompt exactly what a one-at-a-time search gives it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import run_in_process
from helpers.search import deterministic_engine
from PIL import Image

from reflectionflow.search.budget import Usage
from reflectionflow.search.config import Axes, SearchConfig, planned_cost
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.generator import DeterministicGenerator, FluxGenerator
from reflectionflow.search.prompts import PromptItem
from reflectionflow.search.runner import run_search
from reflectionflow.search.verifiers import DeterministicVerifier, Score

ALL_AXES = Axes(noise=True, prompt=True, reflection=True)
PROMPTS = [PromptItem(i, f"a photo of {n} red cats", {"tag": "counting"}) for i, n in enumerate(range(2, 9))]


class CallLog:
    """Wraps a generator, recording how many requests (and from how many prompts) each call carried."""

    def __init__(self, generator):
        self.generator = generator
        self.calls: list[tuple[int, int]] = []

    def initial_noise(self, seed):
        return self.generator.initial_noise(seed)

    def generate(self, requests, on_result=None):
        self.calls.append((len(requests), len({r.original_prompt for r in requests})))
        return self.generator.generate(requests, on_result)


class BrightnessVerifier:
    """A smooth score (mean brightness), so float-level differences between batchings stay float-level."""

    async def score(self, images, prompt, meta):
        return [Score(float(np.asarray(im, dtype=np.float64).mean() / 255), usage=Usage(1, 1)) for im in images]


class ThresholdVerifier(DeterministicVerifier):
    """The hash score, but 1.0 (a 'correct' image, as the shapes checker gives) above `threshold`."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    async def score(self, images, prompt, meta):
        scores = await super().score(images, prompt, meta)
        for score in scores:
            score.value = 1.0 if score.value >= self.threshold else score.value
        return scores


def run(tmp_path: Path, name: str, config: SearchConfig, concurrency: int, generator=None, verifier=None):
    log = CallLog(generator or DeterministicGenerator(size=16, num_inference_steps=3, micro_batch=4))
    engine = deterministic_engine(config, log, verifier)
    run_search(engine, PROMPTS, tmp_path / name, progress=False, concurrency=concurrency)
    return tmp_path / name, log.calls


def searches(run_dir: Path) -> dict[int, dict]:
    """Every prompt's search.json without wall times."""
    found = {}
    for path in sorted(run_dir.glob("*/search.json")):
        data = json.loads(path.read_text())
        data["budget"].pop("seconds")
        found[data["index"]] = data
    return found


def images(run_dir: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(run_dir)): np.asarray(Image.open(p)) for p in sorted(run_dir.rglob("*.png"))}


@pytest.mark.parametrize(
    "config",
    [
        SearchConfig(width=3, depth=2, axes=ALL_AXES),
        SearchConfig(width=3, depth=2, axes=ALL_AXES, survivors=1),
        SearchConfig(width=2, depth=2, strategy="zero_order"),
    ],
)
def test_concurrent_prompts_give_the_same_outputs_as_one_at_a_time(tmp_path, config):
    one, one_calls = run(tmp_path, "one", config, concurrency=1)
    many, many_calls = run(tmp_path, "many", config, concurrency=4)
    assert searches(one) == searches(many) and len(searches(one)) == len(PROMPTS)
    assert {k: v.tobytes() for k, v in images(one).items()} == {k: v.tobytes() for k, v in images(many).items()}
    assert max(prompts for _, prompts in one_calls) == 1
    assert many_calls[0][1] == 4  # the first call waits for every search in flight: 4 prompts' round 0
    assert max(prompts for _, prompts in many_calls) == 4
    assert sum(n for n, _ in many_calls) == sum(n for n, _ in one_calls) == 7 * planned_cost(config)["images"]
    assert len(many_calls) < len(one_calls)
    summary = [json.loads((d / "summary.json").read_text()) for d in (one, many)]
    for s in summary:
        s["budget"].pop("seconds")
    assert summary[0] == summary[1]


def test_concurrent_run_resumes_and_shards_like_a_sequential_one(tmp_path):
    config = SearchConfig(width=2, depth=1, axes=ALL_AXES)
    reference, _ = run(tmp_path, "reference", config, concurrency=1)
    engine = deterministic_engine(config)
    run_search(engine, PROMPTS[:3], tmp_path / "resumed", progress=False, concurrency=3)
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("*/search.json")}
    run_search(engine, PROMPTS, tmp_path / "resumed", progress=False, concurrency=3)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished prompts are skipped
    assert searches(tmp_path / "resumed") == searches(reference)
    for index in range(2):
        run_search(engine, PROMPTS, tmp_path / "sharded", shard_index=index, num_shards=2, progress=False,
                   concurrency=3)
    assert searches(tmp_path / "sharded") == searches(reference)


def test_a_failing_search_stops_the_run_with_its_error(tmp_path):
    class Broken(DeterministicGenerator):
        def generate(self, requests, on_result=None):
            if any("5 red" in r.prompt for r in requests):
                raise RuntimeError("out of memory")
            return super().generate(requests, on_result)

    engine = SearchEngine(Broken(size=16), DeterministicVerifier(), SearchConfig(width=2))
    with pytest.raises(RuntimeError, match="out of memory"):
        run_search(engine, PROMPTS, tmp_path / "broken", progress=False, concurrency=3)


@pytest.mark.parametrize(
    "config",
    [
        SearchConfig(width=8, depth=0),
        SearchConfig(width=2, depth=3, axes=ALL_AXES),
        SearchConfig(width=2, depth=3, strategy="zero_order"),
    ],
)
def test_stop_score_spends_less_and_selects_the_same_image(tmp_path, config):
    verifier = ThresholdVerifier(0.85)
    stopping = SearchConfig(**{**config.to_dict(), "stop_score": 1.0})
    full, _ = run(tmp_path, "full", config, concurrency=1, verifier=verifier)
    stopped, _ = run(tmp_path, "stopped", stopping, concurrency=3, verifier=verifier)
    full, stopped = searches(full), searches(stopped)
    assert any(s["stopped"] for s in stopped.values()) and not all(s["stopped"] for s in stopped.values())
    for index, search in stopped.items():
        reference = full[index]
        assert search["selected"] == reference["selected"] and search["score"] == reference["score"]
        made = [(c["round"], c["chain"]) for c in search["candidates"]]
        perfect = [(c["round"], c["chain"]) for c in reference["candidates"] if c["score"]["value"] == 1.0]
        assert search["stopped"] == bool(perfect)
        if perfect:  # ends at the first perfect image, the one the full search selects (ties keep the first)
            assert made[-1] == perfect[0] == (reference["selected"]["round"], reference["selected"]["chain"])
        assert search["candidates"] == reference["candidates"][: len(made)]
        assert search["budget"]["images"] == len(made) <= reference["budget"]["images"]
        assert search["budget"]["verifier"]["calls"] == len(made)
    assert sum(s["budget"]["images"] for s in stopped.values()) < sum(s["budget"]["images"] for s in full.values())


def test_stop_score_is_recorded_in_the_result(tmp_path):
    from reflectionflow.search.budget import Budget
    from reflectionflow.search.result_file import assess, job_result

    config = SearchConfig(width=8, stop_score=1.0)
    run_dir, _ = run(tmp_path, "run", config, concurrency=2, verifier=ThresholdVerifier(0.75))
    outcomes = assess(run_dir, [item.index for item in PROMPTS])
    stopped = sum(searches(run_dir)[o.index]["stopped"] for o in outcomes)
    result = job_result(
        job={"preset": "noise"}, search=config.to_dict(), shard={"index": 0, "count": 1}, outcomes=outcomes,
        budget=Budget(), job_seconds={},
    )
    assert result["stopped"] == stopped > 0
    assert [p["stopped"] for p in result["per_prompt"]] == [o.stopped for o in outcomes]


@pytest.mark.parametrize(
    "mode, expect",
    [
        ("full", lambda req, parent, advice: (advice.prompt, advice.reflection, parent)),
        ("no_reflection", lambda req, parent, advice: (advice.prompt, None, parent)),
        ("no_condition", lambda req, parent, advice: (advice.prompt, advice.reflection, "black")),
        ("condition_only", lambda req, parent, advice: ("", None, parent)),
    ],
)
def test_corrector_input_ablations_change_only_what_the_corrector_sees(mode, expect):
    generator = DeterministicGenerator(size=16, num_inference_steps=3)
    config = SearchConfig(width=2, depth=1, axes=ALL_AXES, corrector_input=mode)
    engine = deterministic_engine(config, generator)
    result = asyncio.run(engine.search(PROMPTS[0]))
    by_key = {(c.round, c.chain): c for c in result.candidates}
    corrected = [(r, c) for r, c in zip(generator.requests, result.candidates, strict=True) if c.round == 1]
    assert len(corrected) == 2
    for request, candidate in corrected:
        parent = by_key[candidate.parent]
        assert candidate.reflection and candidate.prompt != PROMPTS[0].prompt  # the chain's advice is kept
        prompt, reflection, condition = expect(request, parent.image, candidate)
        assert request.prompt == prompt and request.reflection == reflection
        assert request.original_prompt == PROMPTS[0].prompt
        if condition == "black":
            assert request.condition.size == parent.image.size and not np.asarray(request.condition).any()
        else:
            assert request.condition.tobytes() == parent.image.tobytes()
    for request, candidate in zip(generator.requests, result.candidates, strict=True):
        if candidate.round == 0:
            assert request.condition is None and request.prompt == PROMPTS[0].prompt


def test_unknown_corrector_input_names_the_key():
    with pytest.raises(ValueError, match="search.corrector_input='none'"):
        SearchConfig(corrector_input="none")


@pytest.fixture(scope="module")
def flux_generator(tiny_flux_path):
    return FluxGenerator(
        model_path=str(tiny_flux_path), height=64, width=64, num_inference_steps=2, condition_size=32, micro_batch=8
    )


def test_tiny_flux_concurrent_prompts_match_one_at_a_time(tmp_path, flux_generator):
    config = SearchConfig(width=2, depth=1, axes=ALL_AXES)
    one, one_calls = run(tmp_path, "one", config, 1, flux_generator, BrightnessVerifier())
    many, many_calls = run(tmp_path, "many", config, 4, flux_generator, BrightnessVerifier())
    assert max(n for n, _ in one_calls) == 2 and max(n for n, _ in many_calls) == 8
    first, second = searches(one), searches(many)
    assert first.keys() == second.keys()
    for index in first:
        a, b = first[index], second[index]
        assert a["selected"] == b["selected"] and a["budget"] == b["budget"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
        assert [c["prompt"] for c in a["candidates"]] == [c["prompt"] for c in b["candidates"]]
    pictures = [images(one), images(many)]
    assert pictures[0].keys() == pictures[1].keys()
    for name, picture in pictures[0].items():
        assert np.abs(picture.astype(int) - pictures[1][name].astype(int)).max() <= 2, name


def test_bad_concurrent_prompts_is_one_clear_error(tmp_path, capfd):
    result = run_in_process("infer", "concurrent_prompts=0", "prompt=a red cube", "generator=deterministic",
                            "verifier=deterministic", "search=noise", f"hydra.run.dir={tmp_path / 'run'}",
                            capture=capfd, cache=tmp_path / "cache")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: concurrent_prompts must be a positive int, got 0"
