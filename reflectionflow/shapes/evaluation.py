"""Checker accuracy by GenEval category: the one loop the VAE, base-model and corrector recipes share."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from reflectionflow.shapes.world import PromptSpec, check_image

ImagesOf = Callable[[int, Sequence[PromptSpec]], Sequence[Image.Image]]


def accuracy_by_category(
    specs: Sequence[PromptSpec], images_of: ImagesOf, batch: int
) -> tuple[float, dict[str, float]]:
    """Share of images the checker passes, overall and per category (in order of first appearance).

    `images_of(start, chunk)` makes one image per spec of `chunk = specs[start : start + batch]`."""
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(specs), batch):
        chunk = specs[start : start + batch]
        for spec, image in zip(chunk, images_of(start, chunk), strict=True):
            correct.setdefault(spec.tag, []).append(check_image(image, spec).correct)
    every = [verdict for verdicts in correct.values() for verdict in verdicts]
    return float(np.mean(every)), {tag: float(np.mean(verdicts)) for tag, verdicts in correct.items()}
