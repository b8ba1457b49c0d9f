"""Wall time of one prompt's reflection search (width 4, depth 3) against a loopback verifier/reflector
with 0.3 s latency per call: the engine (concurrent calls, overlapped with generation) vs the same calls
made one after another. Goal: engine <= 0.5x of sequential.

    python benchmarks/search.py [--latency 0.3] [--generator deterministic|tiny_flux]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("BENCH_API_KEY", "sk-loopback")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.chat_server import ScriptedChatServer  # noqa: E402

from reflectionflow.search.chat import OpenAIChat  # noqa: E402
from reflectionflow.search.config import Axes, SearchConfig  # noqa: E402
from reflectionflow.search.engine import SearchEngine  # noqa: E402
from reflectionflow.search.generator import DeterministicGenerator, FluxGenerator, GenerationRequest  # noqa: E402
from reflectionflow.search.noise import derive_seed  # noqa: E402
from reflectionflow.search.prompts import geneval_prompts  # noqa: E402
from reflectionflow.search.reflectors import OpenAIReflector  # noqa: E402
from reflectionflow.search.verifiers import OpenAIVerifier  # noqa: E402


def make_generator(kind: str):
    if kind == "tiny_flux":
        return FluxGenerator(
            "tiny", height=128, width=128, num_inference_steps=8, condition_size=64, micro_batch=4
        )
    return DeterministicGenerator(size=256, num_inference_steps=28, micro_batch=2, seconds_per_image=0.05)


async def sequential(generator, verifier, reflector, item, config: SearchConfig) -> tuple[float, int]:
    """The same search with every generation and API call awaited one after another."""
    reflections: list[str | None] = [None] * config.width
    conditions = [None] * config.width
    best, calls = float("-inf"), 0
    for round in range(config.depth + 1):
        requests = [
            GenerationRequest(
                prompt=item.prompt,
                original_prompt=item.prompt,
                seed=derive_seed(config.seed, item.index, chain, round),
                condition=conditions[chain],
                reflection=reflections[chain],
            )
            for chain in range(config.width)
        ]
        images = [result.image for result in generator.generate(requests)]
        scores = []
        for image in images:
            [score] = await verifier.score([image], item.prompt, item.record)
            scores.append(score)
            calls += 1
        best = max([best] + [s.value for s in scores])
        if round < config.depth:
            for chain, (image, score) in enumerate(zip(images, scores, strict=True)):
                reflections[chain] = (await reflector.reflect(image, item.prompt, score, item.record)).text
                conditions[chain] = image
                calls += 1
    return best, calls


async def main(args: argparse.Namespace) -> None:
    config = SearchConfig(width=4, depth=3, axes=Axes(noise=True, reflection=True))
    item = geneval_prompts()[args.prompt]
    generator = make_generator(args.generator)
    with ScriptedChatServer(latency=args.latency) as server:
        chats = [
            OpenAIChat(model=role, base_url=server.base_url, api_key_env="BENCH_API_KEY")
            for role in ("v", "r")
        ]
        verifier, reflector = OpenAIVerifier(chats[0]), OpenAIReflector(chats[1])
        engine = SearchEngine(generator, verifier, config, reflector)
        await engine.search(item)  # warm-up: connections, text encoders, caches

        start = time.perf_counter()
        result = await engine.search(item)
        concurrent = time.perf_counter() - start
        engine_calls = result.budget.verifier.calls + result.budget.reflector.calls

        start = time.perf_counter()
        best, sequential_calls = await sequential(generator, verifier, reflector, item, config)
        one_by_one = time.perf_counter() - start
        for chat in chats:
            await chat.aclose()
    same = "same best score" if abs(best - result.best.score.value) < 1e-12 else "DIFFERENT best score"
    print(
        f"prompt: {item.prompt!r}; width 4, depth 3, {args.latency} s per API call, generator {args.generator}"
    )
    print(f"engine      {concurrent:6.2f} s  ({result.budget.images} images, {engine_calls} API calls)")
    print(
        f"sequential  {one_by_one:6.2f} s  ({result.budget.images} images, {sequential_calls} API calls, {same})"
    )
    print(f"ratio {concurrent / one_by_one:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--generator", choices=("deterministic", "tiny_flux"), default="deterministic")
    parser.add_argument("--prompt", type=int, default=400, help="index into GenEval's prompts")
    asyncio.run(main(parser.parse_args()))
