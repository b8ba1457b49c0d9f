"""The shapes world's search backends: the exact checker as verifier and checker, the rule-based
reflector, a rule-based prompt refiner, and the held-out prompt set.

Each prompt's record is its GenEval-style spec (`PromptSpec.to_geneval()`), so every backend re-reads
the exact requirements from `meta` instead of parsing the prompt text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from reflectionflow.search.budget import Usage
from reflectionflow.search.prompts import PromptItem
from reflectionflow.search.reflectors import TextAnswer
from reflectionflow.search.verifiers import Score
from reflectionflow.shapes.world import PromptSpec, all_specs, check_image, heldout_eval_set, reflect

log = logging.getLogger(__name__)


def shapes_prompts(n_per_category: int = 64, seed: int = 0) -> list[PromptItem]:
    """The held-out prompts (never trained on), `n_per_category` in each of the six categories."""
    specs = heldout_eval_set(n_per_category, seed)
    return [PromptItem(i, spec.prompt, spec.to_geneval()) for i, spec in enumerate(specs)]


def _spec(meta: Mapping[str, Any]) -> PromptSpec:
    return PromptSpec.from_geneval(dict(meta))


class ShapesVerifier:
    """Exact checker: value = graded score (1.0 exactly when correct), details = verdict and problems."""

    async def score(self, images: Sequence[Image.Image], prompt: str, meta: Mapping[str, Any]) -> list[Score]:
        spec = _spec(meta)
        scores = []
        for image in images:
            result = check_image(image, spec)
            details = {"correct": result.correct, "problems": result.messages()}
            scores.append(Score(result.score, details, usage=Usage(calls=1, attempts=1)))
        return scores


class ShapesChecker:
    """Accuracy of the selected images: the checker's GenEval-style `correct`."""

    def check(self, image: Image.Image, record: Mapping[str, Any]) -> bool:
        return check_image(image, _spec(record)).correct


class ShapesReflector:
    """The rule-based reflector: imperative edits from the detected vs the specified scene.

    Where an added object goes is drawn from a generator seeded by (seed, prompt, image), so a reflection
    does not depend on which prompts were reflected on before (resumed, concurrent or stopped searches).
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    async def reflect(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        meta: Mapping[str, Any],
        *,
        image_prompt: str | None = None,
        image_reflection: str | None = None,
    ) -> TextAnswer:
        digest = hashlib.blake2b(f"{self.seed}\0{prompt}\0".encode() + image.tobytes(), digest_size=8)
        rng = np.random.default_rng(int.from_bytes(digest.digest(), "little"))
        try:
            text = reflect(check_image(image, _spec(meta)), rng)
        except ValueError as err:  # an edit plan the rule-based reflector cannot name: a failed reflection
            log.warning("shapes reflector failed on %r: %r", prompt, err)
            error = f"{type(err).__name__}: {err}"
            return TextAnswer(None, ok=False, error=error, usage=Usage(calls=1, attempts=1, failures=1))
        return TextAnswer(text, usage=Usage(calls=1, attempts=1))


class ShapesPromptRefiner:
    """Prompt-level search without an LLM: the next phrasing of the same spec ('A and B' -> 'B and A',
    'A left of B' -> 'B right of A'), cycling through the phrasings; the goal itself if it has only one."""

    async def refine(
        self,
        image: Image.Image,
        prompt: str,
        evaluation: Score,
        reflection: str | None,
        *,
        goal: str,
        meta: Mapping[str, Any],
    ) -> TextAnswer:
        spec = _spec(meta)
        phrasings = sorted({s.prompt for s in all_specs(spec.tag) if s.canonical_key == spec.canonical_key})
        current = prompt if prompt in phrasings else goal
        text = phrasings[(phrasings.index(current) + 1) % len(phrasings)]
        return TextAnswer(text, usage=Usage(calls=1, attempts=1))
