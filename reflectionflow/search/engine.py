"""The width x depth search over noise, prompt and reflection (and tt-scale-flux's zero-order search).

Round 0 makes `width` base images. Each later round, every surviving chain's latest image is verified,
reflected on (reflection axis) and its prompt refined (prompt axis); then each chain makes a new image:
the corrector regenerates the parent image from the reflection, or the base model draws from the refined
prompt, with a fresh noise (noise axis). The answer is the best image over all chains and rounds.

Concurrency: generation runs in a worker thread; as soon as an image leaves its micro-batch the event
loop verifies it, and, when every chain survives anyway, reflects and refines right after its score
arrives. API calls of a round therefore overlap each other and the rest of the round's generation.
Several prompts can be searched at once (`search` called concurrently, as the runner does with
`concurrent_prompts`): their rounds then share generator calls through the engine's `GenerationQueue`
(the caller registers the searches in flight with `queue.enter()` / `queue.leave()`).

Early stop (`search.stop_score`): the search ends at the first image whose score reaches the stop score;
the rounds are made one chain at a time then, so that image is the first perfect one in (round, chain)
order, which is exactly the one the full search would select (ties keep the first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from reflectionflow.search.batching import GenerationQueue
from reflectionflow.search.budget import Budget
from reflectionflow.search.config import SearchConfig
from reflectionflow.search.generator import GenerationRequest, GenerationResult, Generator
from reflectionflow.search.noise import derive_seed, perturb_noise
from reflectionflow.search.prompts import PromptItem
from reflectionflow.search.reflectors import PromptRefiner, Reflector
from reflectionflow.search.verifiers import Score, Verifier


@dataclass
class Candidate:
    """One generated image and everything that produced it."""

    round: int
    chain: int
    seed: int
    prompt: str
    reflection: str | None
    parent: tuple[int, int] | None  # (round, chain) of the image this one corrects or perturbs
    image: Image.Image
    nfe: int
    noise: torch.Tensor | None = field(default=None, repr=False)
    score: Score | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # failed reflection/refinement it was fed

    @property
    def file(self) -> str:
        return f"candidates/r{self.round:02d}_c{self.chain:02d}.png"

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "chain": self.chain,
            "parent": None if self.parent is None else {"round": self.parent[0], "chain": self.parent[1]},
            "seed": self.seed,
            "prompt": self.prompt,
            "reflection": self.reflection,
            "file": self.file,
            "nfe": self.nfe,
            "score": None if self.score is None else self.score.to_dict(),
            "failures": self.failures,
        }


@dataclass
class PromptSearch:
    """The outcome of one prompt's search."""

    item: PromptItem
    config: SearchConfig
    candidates: list[Candidate]
    best: Candidate
    budget: Budget
    stopped: bool = False  # a candidate reached search.stop_score and the search ended there


@dataclass
class _Advice:
    """What a chain carries into its next round."""

    prompt: str
    reflection: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Slot:
    """One image to make in a round, with its provenance."""

    chain: int
    seed: int
    parent: Candidate | None
    advice: _Advice
    noise: torch.Tensor | None = None


def corrector_inputs(
    mode: str, prompt: str, reflection: str | None, condition: Image.Image
) -> tuple[str, str | None, Image.Image]:
    """(T5 prompt, reflection, condition image) a reflection round feeds the corrector under
    `search.corrector_input` (the ablations of what the corrector uses; see `SearchConfig`)."""
    if mode == "no_reflection":
        return prompt, None, condition
    if mode == "no_condition":
        return prompt, reflection, Image.new("RGB", condition.size)
    if mode == "condition_only":
        return "", None, condition
    return prompt, reflection, condition


def assign_parents(ranks: Sequence[tuple[bool, float]], kept: int) -> list[int]:
    """Parent chain of each chain for the next round: the `kept` best chains continue themselves; the
    others take over from the survivors in rank order, round-robin (ties keep the lower chain first)."""
    order = sorted(range(len(ranks)), key=lambda chain: ranks[chain], reverse=True)
    survivors = order[:kept]
    parents = list(range(len(ranks)))
    for j, chain in enumerate(c for c in range(len(ranks)) if c not in survivors):
        parents[chain] = survivors[j % kept]
    return parents


class SearchEngine:
    def __init__(
        self,
        generator: Generator,
        verifier: Verifier,
        config: SearchConfig,
        reflector: Reflector | None = None,
        refiner: PromptRefiner | None = None,
    ):
        if config.reflects and reflector is None:
            raise ValueError("search.axes.reflection=true needs a reflector")
        if config.refines and refiner is None:
            raise ValueError("search.axes.prompt=true needs a prompt refiner")
        self.generator = generator
        self.verifier = verifier
        self.config = config
        self.reflector = reflector
        self.refiner = refiner
        self.queue = GenerationQueue(generator)

    async def search(self, item: PromptItem) -> PromptSearch:
        budget = Budget()
        with budget.timed("total"):
            if self.config.strategy == "zero_order":
                candidates = await self._zero_order(item, budget)
            else:
                candidates = await self._chains(item, budget)
            best = max(candidates, key=lambda c: c.score.rank)  # first of equals: earliest round, lowest chain
        return PromptSearch(item, self.config, candidates, best, budget, self._reached_stop(best.score))

    def _reached_stop(self, score: Score) -> bool:
        return self.config.stop_score is not None and score.ok and score.value >= self.config.stop_score

    # --- strategies ------------------------------------------------------------------------------------
    async def _chains(self, item: PromptItem, budget: Budget) -> list[Candidate]:
        cfg = self.config
        carries = cfg.reflects or cfg.refines
        slots = [_Slot(c, self._seed(item, c, 0), None, _Advice(item.prompt)) for c in range(cfg.width)]
        everything: list[Candidate] = []
        for round in range(cfg.depth + 1):
            advise_early = carries and round < cfg.depth and cfg.kept == cfg.width
            candidates, advice = await self._round(item, round, slots, budget, advise_early)
            everything += candidates
            if round == cfg.depth or self._reached_stop(candidates[-1].score):
                break
            parents = assign_parents([c.score.rank for c in candidates], cfg.kept)
            if carries and not advise_early:
                unique = list(dict.fromkeys(parents))
                found = await asyncio.gather(*(self._advise(item, candidates[p], budget) for p in unique))
                advice = dict(zip(unique, found, strict=True))
            seed_round = round + 1 if cfg.axes.noise else 0
            slots = [
                _Slot(
                    chain,
                    self._seed(item, chain, seed_round),
                    candidates[parents[chain]] if carries else None,
                    advice[parents[chain]] if carries else _Advice(item.prompt),
                )
                for chain in range(cfg.width)
            ]
        return everything

    async def _zero_order(self, item: PromptItem, budget: Budget) -> list[Candidate]:
        cfg = self.config
        slots = []
        for chain in range(cfg.width):
            seed = self._seed(item, chain, 0)
            slots.append(_Slot(chain, seed, None, _Advice(item.prompt), self.generator.initial_noise(seed)))
        everything, _ = await self._round(item, 0, slots, budget, advise=False)
        pivot = max(everything, key=lambda c: c.score.rank)
        for round in range(1, cfg.depth + 1):
            if self._reached_stop(everything[-1].score):
                break
            slots = []
            for chain in range(cfg.width):
                seed = self._seed(item, chain, round, stream="perturb")
                noise = perturb_noise(pivot.noise, seed, cfg.min_cosine)
                slots.append(_Slot(chain, seed, pivot, _Advice(item.prompt), noise))
            neighbours, _ = await self._round(item, round, slots, budget, advise=False)
            everything += neighbours
            best = max(neighbours, key=lambda c: c.score.rank)
            if best.score.rank > pivot.score.rank:
                pivot = best
        return everything

    def _seed(self, item: PromptItem, chain: int, round: int, stream: str = "noise") -> int:
        return derive_seed(self.config.seed, item.index, chain, round, stream)

    # --- one round ---------------------------------------------------------------------------------------
    async def _round(
        self, item: PromptItem, round: int, slots: list[_Slot], budget: Budget, advise: bool
    ) -> tuple[list[Candidate], dict[int, _Advice]]:
        """The round's candidates (all slots, or with a stop score up to the first that reaches it)."""
        if self.config.stop_score is None:
            return await self._make(item, round, slots, budget, advise)
        candidates: list[Candidate] = []
        advice: dict[int, _Advice] = {}
        for slot in slots:
            made, found = await self._make(item, round, [slot], budget, advise)
            candidates += made
            advice |= found
            if self._reached_stop(made[0].score):
                break
        return candidates, advice

    def _request(self, item: PromptItem, slot: _Slot) -> GenerationRequest:
        prompt, reflection, condition = slot.advice.prompt, slot.advice.reflection, None
        if self.config.reflects and slot.parent is not None:
            prompt, reflection, condition = corrector_inputs(
                self.config.corrector_input, prompt, reflection, slot.parent.image
            )
        return GenerationRequest(
            prompt=prompt,
            original_prompt=item.prompt,
            seed=slot.seed,
            noise=slot.noise,
            condition=condition,
            reflection=reflection,
        )

    async def _make(
        self, item: PromptItem, round: int, slots: list[_Slot], budget: Budget, advise: bool
    ) -> tuple[list[Candidate], dict[int, _Advice]]:
        """Generate one image per slot; verify (and, if `advise`, reflect/refine) each as soon as it exists."""
        requests = [self._request(item, slot) for slot in slots]
        loop = asyncio.get_running_loop()
        tasks: dict[int, asyncio.Task] = {}

        def evaluate(index: int, result: GenerationResult) -> None:
            if index not in tasks:
                slot = slots[index]
                candidate = Candidate(
                    round=round,
                    chain=slot.chain,
                    seed=slot.seed,
                    prompt=slot.advice.prompt,
                    reflection=slot.advice.reflection,
                    parent=None if slot.parent is None else (slot.parent.round, slot.parent.chain),
                    image=result.image,
                    nfe=result.nfe,
                    noise=slot.noise,
                    failures=list(slot.advice.failures),
                )
                tasks[index] = loop.create_task(self._evaluate(item, candidate, budget, advise))

        def on_result(index: int, result: GenerationResult) -> None:  # called from the generator's thread
            loop.call_soon_threadsafe(evaluate, index, result)

        try:
            with budget.timed("generate"):
                results = await self.queue.generate(requests, on_result)
            for index, result in enumerate(results):  # generators may skip the callback
                evaluate(index, result)
            budget.images += len(results)
            budget.nfe += sum(result.nfe for result in results)
            evaluated = await asyncio.gather(*(tasks[i] for i in range(len(slots))))
        except BaseException:
            for task in tasks.values():
                task.cancel()
            raise
        candidates = [candidate for candidate, _ in evaluated]
        return candidates, {c.chain: advice for c, advice in evaluated if advice is not None}

    async def _evaluate(
        self, item: PromptItem, candidate: Candidate, budget: Budget, advise: bool
    ) -> tuple[Candidate, _Advice | None]:
        with budget.timed("verify"):
            [candidate.score] = await self.verifier.score([candidate.image], item.prompt, item.record)
        budget.verifier.add(candidate.score.usage)
        advise = advise and not self._reached_stop(candidate.score)  # the search ends with this image
        return candidate, (await self._advise(item, candidate, budget) if advise else None)

    async def _advise(self, item: PromptItem, candidate: Candidate, budget: Budget) -> _Advice:
        """Reflect on a chain's latest image and/or refine its prompt (a failed call changes nothing)."""
        advice = _Advice(candidate.prompt)
        if self.config.reflects:
            with budget.timed("reflect"):
                answer = await self.reflector.reflect(candidate.image, item.prompt, candidate.score, item.record)
            budget.reflector.add(answer.usage)
            if answer.ok:
                advice.reflection = answer.text
            else:
                advice.failures.append({"stage": "reflect", "error": answer.error, "raw": answer.raw})
        if self.config.refines:
            with budget.timed("refine"):
                answer = await self.refiner.refine(
                    candidate.image,
                    candidate.prompt,
                    candidate.score,
                    advice.reflection,
                    goal=item.prompt,
                    meta=item.record,
                )
            budget.refiner.add(answer.usage)
            if answer.ok:
                advice.prompt = answer.text
            else:
                advice.failures.append({"stage": "refine", "error": answer.error, "raw": answer.raw})
        return advice
