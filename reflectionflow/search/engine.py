"""Inference-time search for one prompt, in rounds: ReflectionFlow's width x depth search over noise,
prompt and reflection, and tt-scale-flux's zero-order search over noises.

A round goes in three steps:

1. plan: one `PlannedImage` per chain, with its seed, the candidate it corrects or perturbs (its parent),
   the `ChainInputs` it is made from (prompt, reflection) and, for zero-order search, its initial noise;
2. generate and score (`SearchStrategy`, shared by every strategy): the round's images in one generator
   call; each image is verified as soon as it leaves its micro-batch, and the prompt's `Budget` counts
   images, NFE, API calls and wall time per stage;
3. reflect and refine (`ChainSearch`): each surviving chain's latest image is reflected on (reflection
   axis) and its prompt refined (prompt axis), which gives the chain's inputs for the next round.

The answer is the best candidate over all chains and rounds (ties: earliest round, then lowest chain).

Strategies (`SearchConfig.strategy`; a new one is a `SearchStrategy` subclass and an entry in
`STRATEGY_CLASSES`):

    chains      `ChainSearch`: round 0 makes `width` base images; in each later round the `kept` best chains
                continue and the others take over from them (`assign_parents`), and every chain makes a new
                image: the corrector regenerates the parent image from its reflection, or the base model
                draws from the refined prompt, with a fresh noise (noise axis).
    zero_order  `ZeroOrderSearch`: tt-scale-flux's neighbourhood search around the best noise so far.
    paper       `PaperSearch`: the paper's own script: many base images, reflection chains on the verifier's
                top few, the answer picked among the corrected images.

Concurrency: generation runs in a worker thread; the event loop verifies each image as soon as it exists
and, when every chain survives anyway, reflects and refines right after its score arrives. API calls of
a round therefore overlap each other and the rest of the round's generation. Several prompts can be
searched at once (`SearchEngine.search` called concurrently, as the runner does with
`concurrent_prompts`): their rounds then share generator calls through the engine's `GenerationQueue`
(the caller registers the searches in flight with `queue.enter()` / `queue.leave()`).

Early stop (`search.stop_score`): the search ends at the first image whose score reaches the stop score;
the rounds are made one chain at a time then, so that image is the first perfect one in (round, chain)
order, which is exactly the one the full search would select. With nested budgets (`search.budgets`)
each chain stops at its own first such image instead, so that every smaller budget's search can be read
off the candidates (`result_file.nested_results`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from reflectionflow.search.batching import GenerationQueue
from reflectionflow.search.budget import Budget
from reflectionflow.search.config import SearchConfig
from reflectionflow.search.generator import GenerationRequest, GenerationResult, Generator
from reflectionflow.search.noise import derive_seed, noise_at_cosine, perturb_noise
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
class ChainInputs:
    """What a chain carries into its next round: the prompt to draw from, the reflection on its latest image,
    and the reflection/refinement calls that failed on the way (recorded with the next candidate)."""

    prompt: str
    reflection: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PlannedImage:
    """One image to make in a round: its chain and seed, the candidate it corrects or perturbs, the inputs
    it is made from and (zero-order search) its initial noise."""

    chain: int
    seed: int
    parent: Candidate | None
    inputs: ChainInputs
    noise: torch.Tensor | None = None

    def candidate(self, round_index: int, result: GenerationResult) -> Candidate:
        """The candidate this image is once generated (not yet scored)."""
        return Candidate(
            round=round_index,
            chain=self.chain,
            seed=self.seed,
            prompt=self.inputs.prompt,
            reflection=self.inputs.reflection,
            parent=None if self.parent is None else (self.parent.round, self.parent.chain),
            image=result.image,
            nfe=result.nfe,
            noise=self.noise,
            failures=list(self.inputs.failures),
        )


# Computes a chain's inputs for its next round from its latest (scored) candidate.
NextInputs = Callable[[Candidate], Awaitable[ChainInputs]]


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


class SearchStrategy(ABC):
    """One prompt's search under one strategy. Subclasses plan the rounds (`run_rounds`); this base makes a
    round's images, scores each as it arrives, accounts the budget and stops early at `search.stop_score`."""

    def __init__(self, engine: SearchEngine, item: PromptItem):
        self.engine = engine
        self.config = engine.config
        self.item = item
        self.budget = Budget()

    async def run(self) -> PromptSearch:
        with self.budget.timed("total"):
            candidates = await self.run_rounds()
            # the first of equal scores: earliest round, then lowest chain
            best = max(self.selectable(candidates), key=lambda c: c.score.rank)
        stopped = self._reaches_stop_score(best.score)
        return PromptSearch(self.item, self.config, candidates, best, self.budget, stopped)

    @abstractmethod
    async def run_rounds(self) -> list[Candidate]:
        """Every candidate of the search, scored, in (round, chain) order."""

    def selectable(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates the answer is picked from (all of them, unless a strategy says otherwise)."""
        return candidates

    def _reaches_stop_score(self, score: Score) -> bool:
        return self.config.stop_score is not None and score.ok and score.value >= self.config.stop_score

    def _seed(self, chain: int, round_index: int, stream: str = "noise") -> int:
        return derive_seed(self.config.seed, self.item.index, chain, round_index, stream)

    async def _run_round(
        self, round_index: int, planned: list[PlannedImage], next_inputs_of: NextInputs | None = None
    ) -> tuple[list[Candidate], dict[int, ChainInputs]]:
        """The round's candidates: all planned images in one generator call or, with a stop score, one after
        another up to the first that reaches it. With `next_inputs_of`, also each chain's next inputs,
        computed as soon as its image is scored (except for an image that ends the search)."""
        if self.config.stop_score is None or self.config.stops_per_chain:
            return await self._generate_and_score(round_index, planned, next_inputs_of)
        candidates: list[Candidate] = []
        next_inputs: dict[int, ChainInputs] = {}
        for image in planned:
            made, found = await self._generate_and_score(round_index, [image], next_inputs_of)
            candidates += made
            next_inputs |= found
            if self._reaches_stop_score(made[0].score):
                break
        return candidates, next_inputs

    async def _generate_and_score(
        self, round_index: int, planned: list[PlannedImage], next_inputs_of: NextInputs | None
    ) -> tuple[list[Candidate], dict[int, ChainInputs]]:
        """One generator call for `planned`; each image is scored as soon as it leaves its micro-batch."""
        requests = [self._generation_request(image) for image in planned]
        loop = asyncio.get_running_loop()
        scoring: dict[int, asyncio.Task] = {}

        def start_scoring(index: int, result: GenerationResult) -> None:
            if index not in scoring:
                candidate = planned[index].candidate(round_index, result)
                scoring[index] = loop.create_task(self._score(candidate, next_inputs_of))

        def on_result(index: int, result: GenerationResult) -> None:  # called from the generator's thread
            loop.call_soon_threadsafe(start_scoring, index, result)

        try:
            with self.budget.timed("generate"):
                results = await self.engine.queue.generate(requests, on_result)
            for index, result in enumerate(results):  # generators may skip the callback
                start_scoring(index, result)
            self.budget.images += len(results)
            self.budget.corrected_images += sum(request.condition is not None for request in requests)
            self.budget.base_images += sum(request.condition is None for request in requests)
            self.budget.nfe += sum(result.nfe for result in results)
            scored = await asyncio.gather(*(scoring[i] for i in range(len(planned))))
        except BaseException:
            for task in scoring.values():
                task.cancel()
            raise
        candidates = [candidate for candidate, _ in scored]
        return candidates, {c.chain: inputs for c, inputs in scored if inputs is not None}

    def _generation_request(self, image: PlannedImage) -> GenerationRequest:
        """A reflection round's image is the corrector's regeneration of its parent; any other is drawn
        by the base model."""
        prompt, reflection, condition = image.inputs.prompt, image.inputs.reflection, None
        if self.config.reflects and image.parent is not None:
            prompt, reflection, condition = corrector_inputs(
                self.config.corrector_input, prompt, reflection, image.parent.image
            )
        return GenerationRequest(
            prompt=prompt,
            original_prompt=self.item.prompt,
            seed=image.seed,
            noise=image.noise,
            condition=condition,
            reflection=reflection,
        )

    async def _score(
        self, candidate: Candidate, next_inputs_of: NextInputs | None
    ) -> tuple[Candidate, ChainInputs | None]:
        with self.budget.timed("verify"):
            [candidate.score] = await self.engine.verifier.score(
                [candidate.image], self.item.prompt, self.item.record
            )
        self.budget.verifier.add(candidate.score.usage)
        # an image that reaches the stop score ends the search: there is no next round to prepare
        if next_inputs_of is None or self._reaches_stop_score(candidate.score):
            return candidate, None
        return candidate, await next_inputs_of(candidate)


class ChainSearch(SearchStrategy):
    """`width` chains over `depth` rounds after round 0, along the noise, prompt and reflection axes.

    Between rounds the `kept` best chains survive and the others continue from them (`assign_parents`).
    A chain that reflects or refines carries its latest image (the parent the corrector regenerates) and
    its `ChainInputs` forward; a noise-only chain carries nothing but draws a new noise."""

    @property
    def carries_inputs(self) -> bool:
        """Whether chains carry a reflection or a refined prompt from round to round."""
        return self.config.reflects or self.config.refines

    async def run_rounds(self) -> list[Candidate]:
        cfg = self.config
        planned = [
            PlannedImage(chain, self._seed(chain, 0), None, ChainInputs(self.item.prompt))
            for chain in range(cfg.width)
        ]
        candidates: list[Candidate] = []
        for round_index in range(cfg.depth + 1):
            last_round = round_index == cfg.depth
            # when every chain survives, each one's next inputs can be found as soon as its image is scored
            reflect_when_scored = self.carries_inputs and not last_round and cfg.kept == cfg.width
            made, next_inputs = await self._run_round(
                round_index, planned, self._reflect_and_refine if reflect_when_scored else None
            )
            candidates += made
            if cfg.stops_per_chain:  # a chain whose image reached the stop score ends; the others go on
                parents = {c.chain: c for c in made if not self._reaches_stop_score(c.score)}
            elif self._reaches_stop_score(made[-1].score):
                break
            else:
                ranked = assign_parents([c.score.rank for c in made], cfg.kept)
                parents = {chain: made[parent] for chain, parent in enumerate(ranked)}
            if last_round or not parents:
                break
            if self.carries_inputs and not reflect_when_scored:
                survivors = list({id(c): c for c in parents.values()}.values())
                found = await asyncio.gather(*(self._reflect_and_refine(parent) for parent in survivors))
                next_inputs = {parent.chain: inputs for parent, inputs in zip(survivors, found, strict=True)}
            planned = self._plan_round(round_index + 1, parents, next_inputs)
        return candidates

    def _plan_round(
        self, round_index: int, parents: dict[int, Candidate], next_inputs: dict[int, ChainInputs]
    ) -> list[PlannedImage]:
        """Each chain's image in round `round_index`, continuing from `parents[chain]`; without the noise
        axis a chain keeps its round-0 seed."""
        seed_round = round_index if self.config.axes.noise else 0
        if not self.carries_inputs:
            return [
                PlannedImage(chain, self._seed(chain, seed_round), None, ChainInputs(self.item.prompt))
                for chain in parents
            ]
        return [
            PlannedImage(chain, self._seed(chain, seed_round), parent, next_inputs[parent.chain])
            for chain, parent in parents.items()
        ]

    async def _reflect_and_refine(self, candidate: Candidate) -> ChainInputs:
        """Reflect on a chain's latest image and/or refine its prompt (a failed call changes nothing)."""
        inputs = ChainInputs(candidate.prompt)
        if self.config.reflects:
            with self.budget.timed("reflect"):
                answer = await self.engine.reflector.reflect(
                    candidate.image,
                    self.item.prompt,
                    candidate.score,
                    self.item.record,
                    image_prompt=candidate.prompt,
                    image_reflection=candidate.reflection,
                )
            self.budget.reflector.add(answer.usage)
            if answer.ok:
                inputs.reflection = answer.text
            else:
                inputs.failures.append({"stage": "reflect", "error": answer.error, "raw": answer.raw})
        if self.config.refines:
            with self.budget.timed("refine"):
                answer = await self.engine.refiner.refine(
                    candidate.image,
                    candidate.prompt,
                    candidate.score,
                    inputs.reflection,
                    goal=self.item.prompt,
                    meta=self.item.record,
                )
            self.budget.refiner.add(answer.usage)
            if answer.ok:
                inputs.prompt = answer.text
            else:
                inputs.failures.append({"stage": "refine", "error": answer.error, "raw": answer.raw})
        return inputs


class ZeroOrderSearch(SearchStrategy):
    """tt-scale-flux's zero-order search: round 0 draws `width` noises; each later round samples `width`
    neighbours of the pivot (the best noise so far) at cosine `min_cosine` (`neighbour_cosine`: exactly, as
    tt-scale-flux, or uniformly in [min_cosine, 1]) and moves the pivot to the best of them when it scores
    higher. With `restart` (tt-scale-flux's), a round whose neighbours do not beat the pivot is followed by
    a round of `width` fresh noises, whose best becomes the pivot. tt-scale-flux also re-renders its pivot
    in every round and restarts from one fresh noise and its neighbours; here the pivot keeps its score and
    a restart round is `width` fresh noises, so every round makes `width` images."""

    async def run_rounds(self) -> list[Candidate]:
        cfg = self.config
        candidates, _ = await self._run_round(0, self._fresh_noises(0))
        pivot = max(candidates, key=lambda c: c.score.rank)
        restarting = False
        for round_index in range(1, cfg.depth + 1):
            if self._reaches_stop_score(candidates[-1].score):
                break
            planned = self._fresh_noises(round_index) if restarting else self._neighbours(round_index, pivot)
            made, _ = await self._run_round(round_index, planned)
            candidates += made
            best = max(made, key=lambda c: c.score.rank)
            if restarting or best.score.rank > pivot.score.rank:
                pivot, restarting = best, False
            else:
                restarting = cfg.restart
        return candidates

    def _fresh_noises(self, round_index: int) -> list[PlannedImage]:
        planned = []
        for chain in range(self.config.width):
            seed = self._seed(chain, round_index)
            noise = self.engine.generator.initial_noise(seed)
            planned.append(PlannedImage(chain, seed, None, ChainInputs(self.item.prompt), noise))
        return planned

    def _neighbours(self, round_index: int, pivot: Candidate) -> list[PlannedImage]:
        cfg = self.config
        planned = []
        for chain in range(cfg.width):
            seed = self._seed(chain, round_index, stream="perturb")
            if cfg.neighbour_cosine == "exact":
                noise = noise_at_cosine(pivot.noise, seed, cfg.min_cosine)
            else:
                noise = perturb_noise(pivot.noise, seed, cfg.min_cosine)
            planned.append(PlannedImage(chain, seed, pivot, ChainInputs(self.item.prompt), noise))
        return planned


class PaperSearch(ChainSearch):
    """ReflectionFlow's own reflection search (its `tts/tts_reflectionflow.py`, started from the output of
    `tts_t2i_noise_scaling.py`): round 0 makes `base_images` base images (the paper's 16 noise-scaling
    rounds x 2 = 32), the verifier's top `width` (its `search_branch`, 2) start `width` chains, and each of
    `depth` rounds corrects every chain's latest image from its reflection (and refined prompt) with a fresh
    noise. The answer is picked among the corrected images (`final_pick_includes_base`: the base images
    too). The paper's script verifies each round's images again before reflecting on them (a second,
    temperature-1 verdict); here every image is verified once and that score is used throughout."""

    def selectable(self, candidates: list[Candidate]) -> list[Candidate]:
        if self.config.final_pick_includes_base:
            return candidates
        return [c for c in candidates if c.round > 0]

    async def run_rounds(self) -> list[Candidate]:
        cfg = self.config
        prompt = self.item.prompt
        planned = [PlannedImage(i, self._seed(i, 0), None, ChainInputs(prompt)) for i in range(cfg.base_images)]
        candidates, _ = await self._run_round(0, planned)
        parents = sorted(candidates, key=lambda c: c.score.rank, reverse=True)[: cfg.width]  # ties: lower chain
        found = await asyncio.gather(*(self._reflect_and_refine(parent) for parent in parents))
        inputs = dict(enumerate(found))
        for round_index in range(1, cfg.depth + 1):
            planned = [
                PlannedImage(chain, self._seed(chain, round_index), parent, inputs[chain])
                for chain, parent in enumerate(parents)
            ]
            last_round = round_index == cfg.depth
            parents, inputs = await self._run_round(
                round_index, planned, None if last_round else self._reflect_and_refine
            )
            candidates += parents
        return candidates


STRATEGY_CLASSES: dict[str, type[SearchStrategy]] = {
    "chains": ChainSearch,
    "zero_order": ZeroOrderSearch,
    "paper": PaperSearch,
}


class SearchEngine:
    """The entry point: searches prompts under `config.strategy` with shared backends, and one generation
    queue so that concurrently searched prompts share generator calls."""

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
        return await STRATEGY_CLASSES[self.config.strategy](self, item).run()
