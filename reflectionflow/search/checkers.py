"""Checkers: pass/fail verdicts on a selected image, for accuracy next to the verifier's ranking score.

A verifier ranks candidates during the search; a checker judges only the final image, after the search,
so accuracy can come from an exact program (GenEval's detector, the shapes world's scene parser) while
the search ranks with anything. `check(image, record)` gets the prompt's record from `metadata.jsonl`
(GenEval's original record for GenEval prompts) and returns whether the image satisfies it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from PIL import Image

from reflectionflow.search.verifiers import Verifier


class Checker(Protocol):
    def check(self, image: Image.Image, record: Mapping[str, Any]) -> bool: ...


class ThresholdChecker:
    """Correct when a verifier scores the image at least `threshold` (e.g. a VLM's P(yes) >= 0.5).

    A proxy, not an exact checker; with the deterministic verifier it stands in for one in tests.
    """

    def __init__(self, verifier: Verifier, threshold: float = 0.5):
        self.verifier = verifier
        self.threshold = threshold

    def check(self, image: Image.Image, record: Mapping[str, Any]) -> bool:
        [score] = asyncio.run(self.verifier.score([image], record["prompt"], record))
        return score.ok and score.value >= self.threshold
