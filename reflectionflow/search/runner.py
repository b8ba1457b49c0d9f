"""Runs a search over a prompt set into a run directory: skips finished prompts, shows progress, sums up.

`concurrency` prompts are searched at once (started in prompt order, each written as soon as it is
done), so their rounds share the generator's micro-batches (`reflectionflow.search.batching`). A
prompt's outputs do not depend on the concurrency; only the order in which prompts finish does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reflectionflow.search.budget import ROLES
from reflectionflow.search.engine import PromptSearch, SearchEngine
from reflectionflow.search.prompts import PromptItem, shard
from reflectionflow.search.run_dir import RunWriter

log = logging.getLogger(__name__)
PromptCallback = Callable[[dict[str, Any], dict[str, Any]], None]  # (prompt's search.json, run summary)


def _postfix(summary: dict[str, Any]) -> dict[str, Any]:
    budget = summary["budget"]
    calls = sum(budget[role]["calls"] for role in ROLES)
    mean = summary["mean_score"]
    return {
        "score": "-" if mean is None else f"{mean:.3f}",
        "images": budget["images"],
        "nfe": budget["nfe"],
        "calls": calls,
    }


async def _close(*backends: Any) -> None:
    for backend in backends:
        if backend is not None and hasattr(backend, "aclose"):
            await backend.aclose()


async def search_concurrently(
    engine: SearchEngine, items: Sequence[PromptItem], concurrency: int
) -> AsyncIterator[PromptSearch]:
    """Each prompt's search as it finishes, with up to `concurrency` searches in flight."""
    if concurrency < 1:
        raise ValueError(f"concurrent_prompts must be >= 1, got {concurrency}")
    waiting = iter(items)
    running: set[asyncio.Task] = set()
    try:
        while True:
            while len(running) < concurrency and (item := next(waiting, None)) is not None:
                engine.queue.enter()  # before the task runs, so the queue waits for its first round too
                task = asyncio.create_task(engine.search(item))
                task.add_done_callback(lambda _: engine.queue.leave())
                running.add(task)
            if not running:
                return
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: t.result().item.index):
                yield task.result()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def run_search_async(
    engine: SearchEngine,
    items: Sequence[PromptItem],
    writer: RunWriter,
    progress: bool = True,
    on_prompt: PromptCallback | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    todo = [item for item in items if writer.finished(item.index) is None]
    if len(todo) < len(items):
        log.info(
            "%d of %d prompts already finished in %s", len(items) - len(todo), len(items), writer.run_dir
        )
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="prompts", disable=not progress)
    bar.set_postfix(_postfix(writer.summary()))
    try:
        async with aclosing(search_concurrently(engine, todo, concurrency)) as searches:
            async for search in searches:
                written = writer.write(search)
                summary = writer.summary()
                bar.update()
                bar.set_postfix(_postfix(summary))
                if on_prompt is not None:
                    on_prompt(written, summary)
    finally:
        bar.close()
        await _close(engine.verifier, engine.reflector, engine.refiner)
    writer.write_summary()
    return writer.summary()


def run_search(
    engine: SearchEngine,
    items: Sequence[PromptItem],
    run_dir: str | Path,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    on_prompt: PromptCallback | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Search this shard's prompts of `items` (the full set) not yet finished in `run_dir`; return the summary.

    `on_prompt(search_json, summary)` is called after each newly finished prompt (live dashboards).
    `concurrency` prompts are searched at once, sharing the generator's batches.
    """
    items = shard(list(items), shard_index, num_shards)
    writer = RunWriter(run_dir, shard_index, num_shards)
    return asyncio.run(run_search_async(engine, items, writer, progress, on_prompt, concurrency))
