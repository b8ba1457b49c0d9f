"""Budget accounting: what a search spends (images, NFE, API calls, tokens, wall time per stage).

`Usage` is what one role (verifier, reflector, refiner) spent; `Budget` is one prompt's or one run's total.
`seconds` holds wall time per stage, each the summed duration of that stage's calls (waiting for a
concurrency slot included): API calls of a round overlap each other and generation, so the stages add up
to more than the prompt's wall time, which `seconds["total"]` records.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROLES = ("verifier", "reflector", "refiner")
STAGES = ("generate", "verify", "reflect", "refine", "write", "total")


@dataclass
class Usage:
    """Spending of one role: `calls` are logical requests, `attempts` the HTTP requests including retries,
    `failures` the calls that ended without a usable answer, `truncated` the answers cut to
    `max_answer_chars`."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    truncated: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, other: Usage) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        return cls(**{f.name: data.get(f.name, 0) for f in fields(cls)})


@dataclass
class Budget:
    """Spending of one prompt's search, or (summed with `add`) of a whole run. `images` counts every image;
    `base_images` (drawn by the base model) and `corrected_images` (the corrector's) split it."""

    images: int = 0
    nfe: int = 0
    base_images: int = 0
    corrected_images: int = 0
    verifier: Usage = field(default_factory=Usage)
    reflector: Usage = field(default_factory=Usage)
    refiner: Usage = field(default_factory=Usage)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def role(self, name: str) -> Usage:
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r}; expected one of {ROLES}")
        return getattr(self, name)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Adds the wall time of the `with` block to `stage` (a block that raises adds nothing: its search
        is abandoned with its budget)."""
        start = time.perf_counter()
        yield
        self.add_time(stage, time.perf_counter() - start)

    def add(self, other: Budget) -> None:
        self.images += other.images
        self.nfe += other.nfe
        self.base_images += other.base_images
        self.corrected_images += other.corrected_images
        for name in ROLES:
            self.role(name).add(other.role(name))
        for stage, seconds in other.seconds.items():
            self.add_time(stage, seconds)

    @property
    def api_calls(self) -> int:
        return sum(self.role(name).calls for name in ROLES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        budget = cls(
            images=data.get("images", 0),
            nfe=data.get("nfe", 0),
            base_images=data.get("base_images", 0),
            corrected_images=data.get("corrected_images", 0),
        )
        for name in ROLES:
            setattr(budget, name, Usage.from_dict(data.get(name, {})))
        budget.seconds.update(data.get("seconds", {}))
        return budget
