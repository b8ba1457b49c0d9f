"""The generator adapters: the deterministic backend and FluxGenerator over the tiny FLUX pipeline."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from reflectionflow.search.config import Axes, SearchConfig
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.generator import DeterministicGenerator, FluxGenerator, GenerationRequest
from reflectionflow.search.prompts import PromptItem
from reflectionflow.search.reflectors import DeterministicPromptRefiner, DeterministicReflector
from reflectionflow.search.verifiers import DeterministicVerifier


def request(**kwargs) -> GenerationRequest:
    return GenerationRequest(**({"prompt": "a red cat", "original_prompt": "a red cat", "seed": 1} | kwargs))


def test_deterministic_generator_depends_on_every_input():
    generator = DeterministicGenerator(size=16, micro_batch=2)
    base = request()
    condition = Image.new("RGB", (16, 16), (1, 2, 3))
    variants = [
        base,
        request(seed=2),
        request(prompt="a blue cat"),
        request(reflection="make it blue"),
        request(condition=condition),
        request(noise=generator.initial_noise(1) * 0.5),
    ]
    images = [r.image.tobytes() for r in generator.generate(variants)]
    assert len(set(images)) == len(variants)
    assert generator.generate([request(noise=generator.initial_noise(1))])[0].image.tobytes() == images[0]


@pytest.fixture(scope="module")
def flux_generator(tiny_flux_path):
    return FluxGenerator(
        model_path=str(tiny_flux_path),
        height=64,
        width=64,
        num_inference_steps=2,
        condition_size=32,
        micro_batch=2,
    )


def test_flux_generator_reports_each_image_and_honours_noise(flux_generator):
    seen = []
    condition = Image.new("RGB", (64, 64), (200, 30, 30))
    requests = [
        request(seed=1),
        request(seed=2, condition=condition, reflection="make the cat blue"),
        request(seed=3),
    ]
    results = flux_generator.generate(requests, lambda i, r: seen.append(i))
    assert sorted(seen) == [0, 1, 2] and seen[-1] == 1  # base micro-batch first, then the corrector
    assert all(r.image.size == (64, 64) and r.nfe == 2 for r in results)
    assert results[2].image.tobytes() != results[0].image.tobytes()
    by_seed = flux_generator.generate([request(seed=1)])[0].image.tobytes()
    by_noise = flux_generator.generate([request(seed=1, noise=flux_generator.initial_noise(1))])[
        0
    ].image.tobytes()
    assert by_noise == by_seed
    assert flux_generator.initial_noise(5).shape == (16, 64)
    assert torch.equal(flux_generator.initial_noise(5), flux_generator.initial_noise(5))


def test_reflection_search_runs_on_tiny_flux(flux_generator):
    config = SearchConfig(width=2, depth=1, axes=Axes(noise=True, prompt=True, reflection=True))
    engine = SearchEngine(
        flux_generator,
        DeterministicVerifier(),
        config,
        DeterministicReflector(),
        DeterministicPromptRefiner(),
    )
    result = asyncio.run(engine.search(PromptItem(0, "a photo of a red bench", {})))
    assert result.budget.images == 4 and result.budget.nfe == 8
    assert len({c.image.tobytes() for c in result.candidates}) == 4
