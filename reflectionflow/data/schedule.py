"""Task warm-up: per-subset draw weights as a function of the global optimizer step.

`split_ratios[subset][k]` is the subset's weight at `training_stages[k]`; between stages the weight moves
linearly, after the last stage it stays constant (e.g. `general: [0.1, 0.3]` with stages `[0, 5000]` is 0.1 at
step 0, 0.2 at step 2500 and 0.3 from step 5000 on). Weights are normalised to sum to 1 at every step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np


class SubsetSchedule:
    """Validated `split_ratios` x `training_stages`; `weights(step)` gives the normalised draw weights."""

    def __init__(self, split_ratios: Mapping[str, Sequence[float]], training_stages: Sequence[int]):
        stages = [int(s) for s in training_stages]
        if not stages or stages[0] < 0 or any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
            raise ValueError(f"data.training_stages must be increasing steps >= 0, got {stages}")
        if not split_ratios:
            raise ValueError("data.split_ratios must name at least one subset")
        self.subsets = tuple(str(name) for name in split_ratios)
        ratios = []
        for name, values in split_ratios.items():
            values = [float(v) for v in values]
            if len(values) != len(stages):
                raise ValueError(
                    f"data.split_ratios.{name} has {len(values)} values but data.training_stages has {len(stages)}"
                )
            if any(v < 0 for v in values):
                raise ValueError(f"data.split_ratios.{name} has a negative weight: {values}")
            ratios.append(values)
        self._ratios = np.asarray(ratios)  # (subsets, stages)
        if (self._ratios.sum(axis=0) <= 0).any():
            raise ValueError("data.split_ratios must give some subset a positive weight at every stage")
        self._stages = np.asarray(stages, dtype=float)

    def weights(self, step: int, exclude: Collection[str] = ()) -> dict[str, float]:
        """Normalised weights at `step`; subsets in `exclude` (known to have no samples) get weight 0."""
        raw = np.array([np.interp(step, self._stages, r) for r in self._ratios])
        for i, name in enumerate(self.subsets):
            if name in exclude:
                raw[i] = 0.0
        total = raw.sum()
        if total <= 0:
            raise ValueError(
                f"no subset with a positive weight at step {step} has samples (without samples: {sorted(exclude)})"
            )
        return {name: float(w / total) for name, w in zip(self.subsets, raw, strict=True)}
