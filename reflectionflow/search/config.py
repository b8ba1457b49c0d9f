"""Search configuration (width x depth, axes, survivors, seeds) and the budget a configuration plans to spend.

`planned_cost` is a pure function of the configuration, so budget-matched presets can choose width and
depth without running anything, and tests can check a run spent exactly what was planned. `split_budget`
is the other direction: the width and depth that spend a given number of images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

STRATEGIES = ("chains", "zero_order", "paper")
NEIGHBOUR_COSINES = ("exact", "uniform")
CORRECTOR_INPUTS = ("full", "no_reflection", "no_condition", "condition_only")


@dataclass(frozen=True)
class Axes:
    """Which of the paper's three scaling axes a search uses between rounds.

    noise: every (chain, round) draws a fresh initial noise; off = a chain keeps its round-0 noise.
    prompt: the prompt refiner rewrites the chain's prompt after each round.
    reflection: the reflector writes a reflection and the corrector regenerates the chain's image from it.
    """

    noise: bool = True
    prompt: bool = False
    reflection: bool = False


@dataclass(frozen=True)
class SearchConfig:
    """Width x depth search: `width` images per round, `depth` rounds after round 0.

    strategy: `chains` (noise / prompt / reflection chains), `zero_order` (tt-scale-flux: each round
    samples `width` noises around the best noise so far and moves to the best one) or `paper`
    (ReflectionFlow's own script: `base_images` base images, the verifier's top `width` start `width`
    reflection chains of `depth` corrected images each; the pick is over the corrected images).
    survivors: chains whose latest image is carried into the next round (None = all `width`); the other
    chains continue from the survivors, best first, so every round still makes `width` images.
    seed: base seed; each image's seed is a pure function of (seed, prompt index, chain, round).
    budget: when set, `split_budget(budget, budget_width)` decides width and depth (replacing the given
    ones) so that every preset spends exactly `budget` images per prompt and presets compare at equal cost.
    budget_width: the preset's images per round under a budget (None = all of it in round 0, best-of-N).
    stop_score: for exact verifiers: a prompt's search stops at the first image (in round, chain order)
    whose score reaches it; a round's images are then made one chain after another so that no image
    after the stopping one is spent. None = spend the whole budget.
    corrector_input: what the corrector sees in reflection rounds (ablations): `full` (prompt + reflection
    and the flawed image), `no_reflection` (T5 text = prompt alone), `no_condition` (a black condition
    image, as the training's image drop), `condition_only` (empty T5 text: the flawed image alone).
    budgets: evaluate the preset at each of these budgets from one search (`nested_budgets`): the search
    runs at the largest, with `stop_score` each chain stops at its own first image reaching it, and the
    result of every budget is read off the candidates its own search would have made. Chain searches whose
    chains all survive only (then chains never interact, and a smaller budget's search is a prefix).
    min_cosine, neighbour_cosine, restart (zero_order): neighbours lie at cosine similarity exactly
    `min_cosine` to the pivot (`exact`, tt-scale-flux's `threshold`) or uniformly in [min_cosine, 1]
    (`uniform`); with `restart`, a round whose neighbours do not beat the pivot is followed by a round of
    `width` fresh noises whose best becomes the pivot (tt-scale-flux regenerates its base noise then).
    base_images, final_pick_includes_base (paper): how many base images the reflection chains start
    from (the paper's noise-scaling run: 16 rounds x 2 = 32), and whether they compete in the final pick.
    """

    width: int = 4
    depth: int = 0
    strategy: str = "chains"
    axes: Axes = field(default_factory=Axes)
    survivors: int | None = None
    seed: int = 0
    min_cosine: float = 0.95
    budget: int | None = None
    budget_width: int | None = None
    stop_score: float | None = None
    corrector_input: str = "full"
    budgets: tuple[int, ...] | None = None
    neighbour_cosine: str = "exact"
    restart: bool = True
    base_images: int = 32
    final_pick_includes_base: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.axes, Mapping):
            object.__setattr__(self, "axes", Axes(**self.axes))
        if self.budgets is not None:
            self._check_budgets()
        if self.strategy == "paper":
            self._check_paper()
        if self.budget is not None:
            width, depth = split_budget(self.budget, self.budget_width)
            object.__setattr__(self, "width", width)
            object.__setattr__(self, "depth", depth)
        if self.width < 1 or self.depth < 0:
            raise ValueError(
                f"search.width must be >= 1 and search.depth >= 0, got {self.width} x {self.depth}"
            )
        if self.corrector_input not in CORRECTOR_INPUTS:
            raise ValueError(f"search.corrector_input={self.corrector_input!r}; expected one of {CORRECTOR_INPUTS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"search.strategy={self.strategy!r}; expected one of {STRATEGIES}")
        if self.survivors is not None and not 1 <= self.survivors <= self.width:
            raise ValueError(f"search.survivors={self.survivors} must be in [1, search.width={self.width}]")
        if self.strategy == "zero_order":
            if self.axes.prompt or self.axes.reflection:
                raise ValueError(
                    "search.strategy=zero_order searches noises only; set search.axes.prompt/reflection=false"
                )
            if not 0.0 < self.min_cosine <= 1.0:
                raise ValueError(f"search.min_cosine={self.min_cosine} must be in (0, 1]")
            if self.neighbour_cosine not in NEIGHBOUR_COSINES:
                raise ValueError(
                    f"search.neighbour_cosine={self.neighbour_cosine!r}; expected one of {NEIGHBOUR_COSINES}"
                )
        elif self.depth > 0 and not (self.axes.noise or self.axes.prompt or self.axes.reflection):
            raise ValueError(
                "with every search.axes.* off, rounds after round 0 would repeat round 0; enable an axis"
            )

    def _check_budgets(self) -> None:
        budgets = tuple(sorted(set(self.budgets)))
        if not budgets:
            raise ValueError("search.budgets must name at least one budget (or be null)")
        if self.budget is not None and self.budget != budgets[-1]:
            raise ValueError(f"search.budget={self.budget} with search.budgets={list(budgets)}: the search "
                             "runs at the largest budget; leave search.budget unset")
        if self.strategy != "chains" or self.survivors is not None:
            raise ValueError("search.budgets needs a chain search whose chains all survive (search.strategy=chains, "
                             "search.survivors=null): only then is a smaller budget's search a prefix")
        largest = split_budget(budgets[-1], self.budget_width)
        for budget in budgets:
            width, depth = split_budget(budget, self.budget_width)
            if width > largest[0] or depth > largest[1]:
                raise ValueError(f"search.budgets: budget {budget} searches {width} x {depth}, not a prefix of "
                                 f"the largest budget's {largest[0]} x {largest[1]}")
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "budget", budgets[-1])

    @property
    def stops_per_chain(self) -> bool:
        """Each chain stops at its own first image reaching `stop_score`: with nested budgets whose searches
        are not all the first images of the largest one in (round, chain) order (budget 2 of a 2-wide
        preset is chain 0's rounds 0 and 1). Otherwise the usual early stop already serves every budget."""
        if self.budgets is None or self.stop_score is None:
            return False
        order = [(r, c) for r in range(self.depth + 1) for c in range(self.width)]
        for budget in self.budgets:
            width, depth = split_budget(budget, self.budget_width)
            grid = [(r, c) for r in range(depth + 1) for c in range(width)]
            if order[: len(grid)] != grid:
                return True
        return False

    def at_budget(self, budget: int) -> SearchConfig:
        """This preset as one search at `budget` images per prompt (one of `budgets`)."""
        return replace(self, budget=budget, budgets=None)
    def _check_paper(self) -> None:
        """What `strategy=paper` cannot combine with, each a one-line error naming the key."""
        if not self.axes.reflection:
            raise ValueError("search.strategy=paper corrects the top base images; set search.axes.reflection=true")
        for key in ("budget", "survivors", "stop_score"):
            if getattr(self, key) is not None:
                raise ValueError(
                    f"search.{key} does not apply to search.strategy=paper (set search.base_images, "
                    "search.width and search.depth); use null"
                )
        if isinstance(self.base_images, bool) or not isinstance(self.base_images, int) or self.base_images < 1:
            raise ValueError(f"search.base_images must be a positive int, got {self.base_images!r}")
        if self.width > self.base_images or self.depth < 1:
            raise ValueError(
                f"search.strategy=paper keeps the top search.width={self.width} of search.base_images="
                f"{self.base_images} and corrects them search.depth={self.depth} times: needs width <= "
                "base_images and depth >= 1"
            )

    @property
    def kept(self) -> int:
        """Chains carried from one round to the next."""
        return self.width if self.survivors is None else self.survivors

    @property
    def reflects(self) -> bool:
        return self.strategy in ("chains", "paper") and self.axes.reflection

    @property
    def refines(self) -> bool:
        return self.strategy in ("chains", "paper") and self.axes.prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_budget(budget: int, budget_width: int | None = None) -> tuple[int, int]:
    """(width, depth) spending exactly `budget` images: `width * (depth + 1) == budget`.

    `budget_width` None puts the whole budget into round 0 (best-of-N: width = budget, depth = 0).
    Otherwise width = min(budget_width, budget // 2), at least 1: the preset searches `budget_width` chains
    per round, and a budget too small for two such rounds still gets one round after round 0 (budget 2 =
    one base image + one corrected image), since a searching preset without later rounds is best-of-N.
    A budget that is not a multiple of that width cannot be matched exactly and is an error.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"search.budget must be a positive number of images, got {budget!r}")
    if budget_width is None:
        return budget, 0
    if isinstance(budget_width, bool) or not isinstance(budget_width, int) or budget_width < 1:
        raise ValueError(f"search.budget_width must be a positive int or null, got {budget_width!r}")
    width = max(1, min(budget_width, budget // 2))
    if budget % width:
        raise ValueError(
            f"search.budget={budget} cannot be split into rounds of {width} images "
            f"(search.budget_width={budget_width}); use a multiple of {width} or set search.budget_width"
        )
    return width, budget // width - 1


def planned_cost(config: SearchConfig, nfe_per_image: int | None = None) -> dict[str, int]:
    """Images (base and corrected), NFE and API calls one prompt's search spends under `config` (exact,
    without retries)."""
    advised = config.kept * config.depth  # one reflection / refinement per surviving chain and later round
    if config.strategy == "paper":
        base = config.base_images
        corrected = config.width * config.depth
    else:
        base = config.width if config.reflects else config.width * (config.depth + 1)
        corrected = config.width * config.depth if config.reflects else 0
    images = base + corrected
    cost = {
        "images": images,
        "base_images": base,
        "corrected_images": corrected,
        "verifier_calls": images,
        "reflector_calls": advised if config.reflects else 0,
        "refiner_calls": advised if config.refines else 0,
    }
    if nfe_per_image is not None:
        cost["nfe"] = images * nfe_per_image
    return cost
