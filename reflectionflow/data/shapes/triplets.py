"""(flawed image, reflection, correct image) triplets, written as GenRef webdataset shards.

Subsets: `editing` when the good image is the flawed scene with exactly the reflection's edits applied
(same layout, as in GenRef's editing pairs); `general` when it is an independent correct sample of the
prompt (as GenRef pairs a rejected and an accepted generation).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from reflectionflow.data.shapes.checker import CheckResult, check_image
from reflectionflow.data.shapes.editor import apply_edits
from reflectionflow.data.shapes.edits import reflection_text
from reflectionflow.data.shapes.flaws import make_flawed
from reflectionflow.data.shapes.reflector import plan_edits
from reflectionflow.data.shapes.render import render_scene
from reflectionflow.data.shapes.sampling import sample_example, sample_scene
from reflectionflow.data.shapes.spec import PromptSpec
from reflectionflow.data.shapes.world import DEFAULT_SIZE

JPEG_QUALITY = 95
"""With 4:4:4 chroma the checker reads these JPEGs exactly (tested); 4:2:0 would halve colour
resolution on shapes a dozen pixels wide."""


@dataclass(frozen=True)
class Triplet:
    prompt: str
    reflection: str
    bad: Image.Image
    good: Image.Image
    subset: str  # general | editing
    meta: dict[str, Any] = field(default_factory=dict)  # GenEval record, flaw kind, problems found


def make_triplet(
    spec: PromptSpec,
    bad: Image.Image,
    rng: np.random.Generator,
    *,
    editing: bool,
    size: int = DEFAULT_SIZE,
    meta: dict[str, Any] | None = None,
    checked: CheckResult | None = None,
) -> Triplet | None:
    """Check `bad` (a flawed render or a model sample; `checked`: its check, if the caller has it),
    reflect on it and pair it with a good image. None when there is nothing to learn: `bad` is already
    correct, or the good image would not pass (e.g. the edit keeps an object of a colour outside the palette)."""
    result = checked or check_image(bad, spec)
    if result.correct:
        return None
    edits = plan_edits(result, rng)
    try:
        good_scene = apply_edits(result.scene, edits) if editing else sample_scene(spec, rng)
        good = render_scene(good_scene, size)
    except ValueError:
        return None
    if not check_image(good, spec).correct:
        return None
    info = {
        "geneval": spec.to_geneval(),
        "problems": result.messages(),
        "bad_score": result.score,
        **(meta or {}),
    }
    return Triplet(spec.prompt, reflection_text(edits), bad, good, "editing" if editing else "general", info)


def rendered_triplets(
    n: int, *, seed: int = 0, size: int = DEFAULT_SIZE, editing_fraction: float = 0.5, split: str = "train"
) -> Iterator[Triplet]:
    """`n` triplets whose flawed images are renders of correct scenes with one typical mistake each."""
    rng = np.random.default_rng(seed)
    made = 0
    for _ in range(2 * n + 100):
        if made == n:
            return
        spec, scene = sample_example(rng, split)
        flawed, flaw = make_flawed(spec, scene, rng)
        editing = bool(rng.random() < editing_fraction)
        triplet = make_triplet(
            spec, render_scene(flawed, size), rng, editing=editing, size=size, meta={"flaw": flaw}
        )
        if triplet is not None:
            made += 1
            yield triplet
    raise RuntimeError(f"only {made} of {n} flawed renders gave usable triplets")


def write_genref_shards(
    triplets: Iterable[Triplet],
    pattern: str,
    *,
    maxcount: int = 1000,
    quality: int = JPEG_QUALITY,
    key_prefix: str = "shapes",
) -> int:
    """Write GenRef samples (good_image.jpg, bad_image.jpg, reflection.txt, prompt.txt, subset.txt, plus
    meta.json) to shards named by `pattern` (e.g. 'out/shapes-%06d.tar'); returns the sample count."""
    count = 0
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for count, triplet in enumerate(triplets, start=1):
            sink.write(
                {
                    "__key__": f"{key_prefix}{count:08d}",
                    "good_image.jpg": encode_jpeg(triplet.good, quality),
                    "bad_image.jpg": encode_jpeg(triplet.bad, quality),
                    "reflection.txt": triplet.reflection,
                    "prompt.txt": triplet.prompt,
                    "subset.txt": triplet.subset,
                    "meta.json": triplet.meta,
                }
            )
    return count


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
