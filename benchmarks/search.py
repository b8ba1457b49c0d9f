"""Two search benchmarks, each timing both sides in the same run and printing the ratio.

`--case api` (default): wall time of one prompt's reflection search (width 4, depth 3) against a loopback
verifier/reflector with 0.3 s latency per call: the engine (concurrent calls, overlapped with generation)
vs the same calls made one after another. Goal: engine <= 0.5x of sequential.

`--case cross_prompt`: reflection search (width 2, depth 3) over `--prompts` prompts with local backends
(a smooth brightness score, deterministic reflector and refiner) on the generator: `--concurrency` prompts
at once (their rounds share micro-batches) vs one prompt at a time; checks that both give the same
selections (batched FLUX differs from unbatched only by float rounding).

`--case batch`: the generator's milliseconds per image at batch sizes 8..128, base images and corrections
(a condition image and a reflection), each against batch 8 measured in the same run: whether fuller
batches (`concurrent_prompts`, `micro_batch`) would make a search faster. `--generator shapes` times the
shapes miniature's built recipes at its search settings (48 px, 10 steps, true CFG 2.0).

    python benchmarks/search.py [--case api|cross_prompt|batch] [--latency 0.3]
                                [--generator deterministic|tiny_flux|shapes]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("BENCH_API_KEY", "sk-loopback")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.chat_server import ScriptedChatServer  # noqa: E402

from reflectionflow.search.budget import Usage  # noqa: E402
from reflectionflow.search.chat import OpenAIChat  # noqa: E402
from reflectionflow.search.config import Axes, SearchConfig  # noqa: E402
from reflectionflow.search.engine import SearchEngine  # noqa: E402
from reflectionflow.search.generator import DeterministicGenerator, FluxGenerator, GenerationRequest  # noqa: E402
from reflectionflow.search.noise import derive_seed  # noqa: E402
from reflectionflow.search.prompts import geneval_prompts  # noqa: E402
from reflectionflow.search.reflectors import (  # noqa: E402
    DeterministicPromptRefiner,
    DeterministicReflector,
    OpenAIReflector,
)
from reflectionflow.search.runner import run_search  # noqa: E402
from reflectionflow.search.verifiers import OpenAIVerifier, Score  # noqa: E402


def make_generator(kind: str, micro_batch: int = 4):
    if kind == "shapes":
        from reflectionflow.recipes import built_product

        return FluxGenerator(
            str(built_product("shapes_base")), str(built_product("shapes_corrector") / "lora"), height=48,
            width=48, num_inference_steps=10, true_cfg_scale=2.0, micro_batch=micro_batch, max_sequence_length=32,
        )
    if kind == "tiny_flux":
        return FluxGenerator(
            "tiny", height=128, width=128, num_inference_steps=8, condition_size=64, micro_batch=micro_batch
        )
    return DeterministicGenerator(
        size=256, num_inference_steps=28, micro_batch=micro_batch, seconds_per_image=0.05
    )


async def sequential(generator, verifier, reflector, item, config: SearchConfig) -> tuple[float, int]:
    """The same search with every generation and API call awaited one after another."""
    reflections: list[str | None] = [None] * config.width
    conditions = [None] * config.width
    best, calls = float("-inf"), 0
    for round_index in range(config.depth + 1):
        requests = [
            GenerationRequest(
                prompt=item.prompt,
                original_prompt=item.prompt,
                seed=derive_seed(config.seed, item.index, chain, round_index),
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
        if round_index < config.depth:
            for chain, (image, score) in enumerate(zip(images, scores, strict=True)):
                reflections[chain] = (await reflector.reflect(image, item.prompt, score, item.record)).text
                conditions[chain] = image
                calls += 1
    return best, calls


class BrightnessVerifier:
    """Mean brightness: a score that float rounding cannot reorder the way a hash score would."""

    async def score(self, images, prompt, meta):
        values = [float(np.asarray(image, dtype=np.float64).mean() / 255) for image in images]
        return [Score(value, usage=Usage(calls=1, attempts=1)) for value in values]


def cross_prompt(args: argparse.Namespace) -> None:
    config = SearchConfig(width=2, depth=3, axes=Axes(noise=True, prompt=True, reflection=True))
    items = geneval_prompts()[: args.prompts]
    generator = make_generator(args.generator, micro_batch=2 * args.concurrency)
    engine = SearchEngine(
        generator, BrightnessVerifier(), config, DeterministicReflector(), DeterministicPromptRefiner()
    )
    with tempfile.TemporaryDirectory() as root:
        run_search(engine, items[:2], Path(root) / "warm-up", progress=False, concurrency=2)
        seconds, selected = {}, {}
        for concurrency in (args.concurrency, 1):
            run_dir = Path(root) / f"c{concurrency}"
            start = time.perf_counter()
            run_search(engine, items, run_dir, progress=False, concurrency=concurrency)
            seconds[concurrency] = time.perf_counter() - start
            selected[concurrency] = [
                json.loads(path.read_text())["selected"] for path in sorted(run_dir.glob("*/search.json"))
            ]
    images = len(items) * 8
    same = "same selections" if selected[1] == selected[args.concurrency] else "DIFFERENT selections"
    print(f"{len(items)} prompts x reflection search width 2, depth 3 ({images} images); generator {args.generator}")
    for concurrency in (args.concurrency, 1):
        print(
            f"concurrent_prompts={concurrency:<3d} {seconds[concurrency]:7.2f} s  "
            f"({seconds[concurrency] / images * 1000:6.1f} ms per image)"
        )
    print(f"ratio {seconds[args.concurrency] / seconds[1]:.2f}x ({same})")


def batch(args: argparse.Namespace) -> None:
    sizes = (8, 16, 32, 64, 128)
    generator = make_generator(args.generator, micro_batch=max(sizes))
    prompt = "a photo of a red square and a blue circle"
    [condition] = generator.generate([GenerationRequest(prompt=prompt, original_prompt=prompt, seed=0)])
    print(f"generator {args.generator}: ms per image by batch size (each timed for >= {args.seconds} s)")
    for kind in ("base", "correction"):
        per_image = {}
        for size in sizes:
            requests = [
                GenerationRequest(
                    prompt=f"{prompt} {i}", original_prompt=f"{prompt} {i}", seed=i,
                    condition=condition.image if kind == "correction" else None,
                    reflection="Change the red square to green." if kind == "correction" else None,
                )
                for i in range(size)
            ]
            generator.generate(requests)  # warm-up: text embeddings, allocator
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds:
                generator.generate(requests)
                calls += 1
            per_image[size] = (time.perf_counter() - start) / (calls * size) * 1000
        print(kind.ljust(12) + "  ".join(
            f"{size}: {ms:5.1f} ms ({ms / per_image[sizes[0]]:.2f}x)" for size, ms in per_image.items()
        ))


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
    parser.add_argument("--generator", choices=("deterministic", "tiny_flux", "shapes"), default="deterministic")
    parser.add_argument("--prompt", type=int, default=400, help="index into GenEval's prompts (api)")
    parser.add_argument("--case", choices=("api", "cross_prompt", "batch"), default="api")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per batch size (batch)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts searched (cross_prompt)")
    parser.add_argument("--concurrency", type=int, default=16, help="prompts at once (cross_prompt)")
    args = parser.parse_args()
    if args.case == "cross_prompt":
        cross_prompt(args)
    elif args.case == "batch":
        batch(args)
    else:
        asyncio.run(main(args))
