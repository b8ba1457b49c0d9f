"""Cross-prompt batching: the generate calls of concurrently searched prompts become one generator call.

One prompt's round is often only a few images (reflection search: 2 chains), too few to fill a
transformer batch. When several prompts are searched at once (`concurrent_prompts`), each search's
round joins a queue; the queue hands the generator everything pending once every search in flight is
waiting for images (nothing more can arrive before then), so micro-batches fill with requests from
different prompts. Each image goes back to its own search, with `on_result` as soon as it is ready.

Every image's noise, prompt and condition come from its own request, so what a prompt gets does not
depend on the company it is batched with (up to float rounding of the batched matmuls). The generator
runs one call at a time in a worker thread; a search waiting on API calls holds the next call back,
so the rounds of concurrent prompts advance together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from reflectionflow.search.generator import GenerationRequest, GenerationResult, Generator, ResultCallback


@dataclass
class _Call:
    requests: list[GenerationRequest]
    on_result: ResultCallback | None
    future: asyncio.Future


class GenerationQueue:
    """Merges the `generate` calls of the searches in flight into one call.

    The caller counts the searches in flight with `enter` (before the search starts, so its first round
    is waited for) and `leave` (when it ends); with none registered every call goes through at once.
    """

    def __init__(self, generator: Generator):
        self.generator = generator
        self.active = 0
        self._pending: list[_Call] = []
        self._busy = False

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        self._maybe_flush()  # the others may all be waiting for this one

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: ResultCallback | None = None
    ) -> list[GenerationResult]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Call(list(requests), on_result, future))
        self._maybe_flush()
        return await future

    def _maybe_flush(self) -> None:
        if self._busy or not self._pending or len(self._pending) < self.active:
            return
        calls, self._pending = self._pending, []
        self._busy = True
        asyncio.get_running_loop().create_task(self._run(calls))

    async def _run(self, calls: list[_Call]) -> None:
        merged = [request for call in calls for request in call.requests]
        owners = [(call, i) for call in calls for i in range(len(call.requests))]

        def on_result(index: int, result: GenerationResult) -> None:  # from the generator's thread
            call, own = owners[index]
            if call.on_result is not None:
                call.on_result(own, result)

        try:
            results = await asyncio.to_thread(self.generator.generate, merged, on_result)
            if len(results) != len(merged):
                raise RuntimeError(f"generator returned {len(results)} images for {len(merged)} requests")
        except BaseException as err:
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(err)
            if not isinstance(err, Exception):
                raise
        else:
            start = 0
            for call in calls:
                if not call.future.done():  # a cancelled search no longer waits
                    call.future.set_result(results[start : start + len(call.requests)])
                start += len(call.requests)
        finally:
            self._busy = False
            self._maybe_flush()
