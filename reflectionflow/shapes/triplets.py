"""The shapes corrector's training data: GenRef shards of triplets, built once and streamed by `GenRefDataModule`.

Flawed images come from two sources, as GenRef's do: the trained base model's own samples on training
prompts (sampled with `ReflectionFluxPipeline.generate` and true CFG, like the base model's metrics; samples
the checker passes teach nothing and are skipped) and renders of correct scenes with one typical mistake.
The shards go to `<cache_dir>/recipes/shapes_triplets-<hash of this config and the base model path>/`,
written into a temporary directory and renamed when complete, with `stats.json` (how many model samples
were already correct, triplets per source, category and subset) beside them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from reflectionflow.config import check_option
from reflectionflow.data.datamodule import GenRefDataModule
from reflectionflow.data.transforms import t5_text
from reflectionflow.shapes.world import (
    CATEGORIES,
    Triplet,
    applicable_flaws,
    check_image,
    heldout_eval_set,
    instruction_triplets,
    make_flawed,
    make_triplet,
    render_scene,
    rendered_triplets,
    sample_example,
    sample_scene,
)

log = logging.getLogger(__name__)

SHARD_NAME = "shapes-%06d.tar"
JPEG_QUALITY = 95
"""With 4:4:4 chroma the checker reads these JPEGs exactly (tested); 4:2:0 would halve colour
resolution on shapes a dozen pixels wide."""
RENDERED_WEIGHTINGS = ("uniform", "model_failures")
FORMAT_VERSION = 1  # bump when the way triplets are made changes, so old caches are not reused


def model_sample_triplets(
    base_path: str,
    n: int,
    *,
    seed: int,
    image_size: int,
    editing_fraction: float,
    num_inference_steps: int,
    true_cfg_scale: float,
    max_sequence_length: int,
    batch_size: int,
    samples_per_prompt: int = 1,
    rule_fraction: float = 0.0,
) -> tuple[list[Triplet], Counter]:
    """Triplets from `n` base-model samples of training prompts, `samples_per_prompt` per prompt. A failing
    sample pairs, with probability `rule_fraction`, with a passing sample of the same prompt (subset
    `rule`), else with its edited scene (`editing_fraction`) or a fresh render (`general`). Counts the
    samples that gave none: `already_correct`, `unusable` (no passing good image), `reflector_error`."""
    from reflectionflow.models.loading import load_flux_pipeline
    from reflectionflow.models.pipeline import ReflectionFluxPipeline

    pipe = ReflectionFluxPipeline(
        load_flux_pipeline(base_path), max_sequence_length=max_sequence_length, micro_batch=batch_size
    )
    rng = np.random.default_rng([seed, 1])
    counts: Counter = Counter()
    triplets: list[Triplet] = []
    prompts, per_batch = -(-n // samples_per_prompt), max(1, batch_size // samples_per_prompt)
    for start in range(0, prompts, per_batch):
        specs = [sample_example(rng, "train")[0] for _ in range(min(per_batch, prompts - start))]
        flat = [spec for spec in specs for _ in range(samples_per_prompt)]
        first = start * samples_per_prompt
        noises = torch.stack([pipe.initial_noise(seed * 1_000_003 + first + i, image_size, image_size)
                              for i in range(len(flat))])
        images = pipe.generate([s.prompt for s in flat], noises=noises, height=image_size, width=image_size,
                               num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale)
        for j, spec in enumerate(specs):
            group = images[j * samples_per_prompt : (j + 1) * samples_per_prompt]
            checks = [check_image(image, spec) for image in group]
            passing = [image for image, checked in zip(group, checks, strict=True) if checked.correct]
            for image, checked in zip(group, checks, strict=True):
                if checked.correct:
                    counts["already_correct"] += 1
                    continue
                good = passing[0] if passing and rng.random() < rule_fraction else None
                editing = good is None and bool(rng.random() < editing_fraction)
                try:
                    triplet = make_triplet(spec, image, rng, editing=editing, size=image_size, checked=checked,
                                           good=good, meta={"source": "model"})
                except ValueError as err:  # the rule-based reflector fails on some scenes no flaw generator makes
                    counts["reflector_error"] += 1
                    log.debug("no triplet from a sample of %r: %s", spec.prompt, err)
                    continue
                if triplet is None:
                    counts["unusable"] += 1
                else:
                    triplets.append(triplet)
        log.info("base-model samples: %d / %d", min((start + per_batch) * samples_per_prompt, n), n)
    return triplets, counts


def heldout_flawed_cases(
    n_per_category: int, image_size: int, seed: int, tags: Sequence[str] | None = None,
    flaws: Sequence[str] | None = None,
) -> list:
    """One flawed render with its reflection (a `Triplet`) per held-out evaluation prompt; `tags` and
    `flaws` narrow them to a rung of the diagnostics ladder (prompts of those categories, mistakes of those
    kinds; a prompt no listed flaw applies to is left out)."""
    rng = np.random.default_rng([seed, 3])
    cases = []
    for spec in heldout_eval_set(n_per_category, seed):
        kinds = applicable_flaws(spec, flaws)
        if (tags is not None and spec.tag not in tags) or not kinds:
            continue
        for _ in range(100):
            flawed, flaw = make_flawed(spec, sample_scene(spec, rng), rng, str(rng.choice(kinds)))
            case = make_triplet(spec, render_scene(flawed, image_size), rng, editing=True, size=image_size,
                                meta={"flaw": flaw, "spec": spec})
            if case is not None:
                cases.append(case)
                break
        else:
            raise RuntimeError(f"no usable flawed render of {spec.prompt!r} in 100 tries")
    return cases


def source(triplet: Triplet) -> str:
    """model (a base-model sample), instruction (a free edit) or rendered (a flawed render)."""
    if triplet.meta.get("flaw", "").startswith("instruction_"):
        return "instruction"
    return triplet.meta.get("source", "rendered")


def triplet_stats(triplets: list[Triplet], model_counts: Counter, model_samples: int) -> dict[str, Any]:
    def per(key) -> dict[str, int]:
        return dict(sorted(Counter(key(t) for t in triplets).items()))

    return {
        "triplets": len(triplets),
        "model_samples": model_samples,
        "model_samples_already_correct": model_counts["already_correct"],
        "model_samples_unusable": model_counts["unusable"],
        "model_samples_reflector_error": model_counts["reflector_error"],
        "by_source": per(source),
        "by_category": per(lambda t: t.meta["geneval"]["tag"]),
        "by_subset": per(lambda t: t.subset),
        "by_source_and_subset": per(lambda t: f"{source(t)}/{t.subset}"),
    }


class ShapesTripletsDataModule(GenRefDataModule):
    """`GenRefDataModule` over cached shapes triplet shards, built on first use (`check`, `setup`).

    Under DDP every rank builds into its own temporary directory and the first rename wins (the recipe is
    meant for one CPU process; a cached build is read by all ranks).

    Args beyond GenRefDataModule's (whose `shards` this sets):
        base_path: the base model's product directory (its samples are flawed images; part of the cache key).
        model_samples: base-model samples drawn (incorrect ones become triplets).
        rendered: triplets from flawed renders.
        editing_fraction: share of `editing` triplets (good = flawed scene with the edits applied); the rest
            are `general` (good = an independent correct scene).
        samples_per_prompt / rule_fraction: base-model samples drawn per prompt; the share of failing ones
            paired with a passing sample of the same prompt (`rule`, as GenRef's rule-based pairs).
        rendered_tags / rendered_flaws: categories and flaw kinds of the flawed renders (null: all), to
            train on one edit type at a time.
        rendered_weighting: how the flawed renders' categories are drawn: `uniform`, or `model_failures`
            (in the proportions of the base model's failing samples per category, as GenRef's flawed
            images are its models' failures; needs model_samples > 0).
        rendered_compound: share of the flawed renders with a second mistake of another kind (a model's
            failures often have two: a swapped colour and a wrong place).
        instruction_edits: editing triplets whose flawed image satisfies the prompt and whose reflection asks
            for an edit the prompt leaves open (`world.triplets.instruction_triplets`): only the reflection
            says what to change, as in GenRef's instruction-editing pairs.
        sample_steps / sample_true_cfg_scale / sample_max_sequence_length / sample_batch: how the base
            model is sampled (as its own metrics sample it).
        image_size: side of the rendered and sampled images.
        samples_per_shard: triplets per tar file.
    """

    def __init__(
        self,
        base_path: str,
        model_samples: int = 1024,
        rendered: int = 4000,
        editing_fraction: float = 0.5,
        sample_steps: int = 20,
        sample_true_cfg_scale: float = 3.0,
        sample_max_sequence_length: int = 16,
        sample_batch: int = 64,
        samples_per_prompt: int = 1,
        rule_fraction: float = 0.0,
        rendered_tags: list[str] | None = None,
        rendered_flaws: list[str] | None = None,
        rendered_weighting: str = "uniform",
        rendered_compound: float = 0.0,
        instruction_edits: int = 0,
        image_size: int = 48,
        samples_per_shard: int = 500,
        seed: int = 0,
        **genref: Any,
    ):
        if min(model_samples, rendered, instruction_edits) < 0 or model_samples + rendered + instruction_edits == 0:
            raise ValueError(f"data.model_samples ({model_samples}), data.rendered ({rendered}) and "
                             f"data.instruction_edits ({instruction_edits}) must be >= 0, not all 0")
        check_option("data.rendered_weighting", rendered_weighting, RENDERED_WEIGHTINGS)
        if rendered_weighting == "model_failures" and model_samples == 0:
            raise ValueError("data.rendered_weighting=model_failures needs data.model_samples > 0: the weights "
                             "are the base model's failing samples per category")
        for name, value in (("editing_fraction", editing_fraction), ("rule_fraction", rule_fraction),
                            ("rendered_compound", rendered_compound)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {value}")
        if samples_per_prompt < 1:
            raise ValueError(f"data.samples_per_prompt must be >= 1, got {samples_per_prompt}")
        self.base_path = str(base_path)
        self.build_config = {
            "version": FORMAT_VERSION,
            "base_path": self.base_path,
            "model_samples": int(model_samples),
            "rendered": int(rendered),
            "editing_fraction": float(editing_fraction),
            "sample_steps": int(sample_steps),
            "sample_true_cfg_scale": float(sample_true_cfg_scale),
            "sample_max_sequence_length": int(sample_max_sequence_length),
            "sample_batch": int(sample_batch),  # the batch size orders the random draws
            "samples_per_prompt": int(samples_per_prompt),
            "rule_fraction": float(rule_fraction),
            "rendered_tags": list(rendered_tags or CATEGORIES),
            "rendered_flaws": None if rendered_flaws is None else list(rendered_flaws),
            "instruction_edits": int(instruction_edits),
            "image_size": int(image_size),
            "samples_per_shard": int(samples_per_shard),
            "seed": int(seed),
        }
        # Absent at their defaults, so the shards built before these options existed stay valid.
        if rendered_weighting != "uniform":
            self.build_config["rendered_weighting"] = rendered_weighting
        if rendered_compound:
            self.build_config["rendered_compound"] = float(rendered_compound)
        self.directory = triplets_dir(self.build_config)
        super().__init__(shards=str(self.directory / SHARD_NAME.replace("%06d", "*")), seed=seed, **genref)

    def check(self) -> list[str]:
        self.build()
        return super().check()

    def build(self) -> Path:
        """The shard directory, written now unless a previous run completed it."""
        if (self.directory / "stats.json").is_file():
            return self.directory
        r = self.build_config
        log.info("building shapes triplets into %s", self.directory)
        model_triplets, counts = [], Counter()
        if r["model_samples"]:
            model_triplets, counts = model_sample_triplets(
                self.base_path, r["model_samples"], seed=r["seed"], image_size=r["image_size"],
                editing_fraction=r["editing_fraction"], num_inference_steps=r["sample_steps"],
                true_cfg_scale=r["sample_true_cfg_scale"], max_sequence_length=r["sample_max_sequence_length"],
                batch_size=r["sample_batch"], samples_per_prompt=r["samples_per_prompt"],
                rule_fraction=r["rule_fraction"],
            )
        flaws = None if r["rendered_flaws"] is None else tuple(r["rendered_flaws"])
        tags = tuple(r["rendered_tags"])
        weights = None
        if r.get("rendered_weighting") == "model_failures":
            failing = Counter(t.meta["geneval"]["tag"] for t in model_triplets)
            weights = [failing[tag] + 1 for tag in tags]  # +1: a category the model never fails keeps a few
            log.info("flawed renders per category in the proportions of the model's failures: %s",
                     dict(zip(tags, weights, strict=True)))
        rendered = list(rendered_triplets(r["rendered"], seed=r["seed"], size=r["image_size"],
                                          editing_fraction=r["editing_fraction"], split="train", tags=tags,
                                          flaws=flaws, tag_weights=weights,
                                          compound=r.get("rendered_compound", 0.0)))
        instructions = list(instruction_triplets(r["instruction_edits"], seed=r["seed"], size=r["image_size"]))
        triplets = model_triplets + rendered + instructions
        order = np.random.default_rng([r["seed"], 2]).permutation(len(triplets))  # mix sources across shards
        stats = triplet_stats(triplets, counts, r["model_samples"])

        tmp = self.directory.with_name(f"{self.directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_genref_shards((triplets[i] for i in order), str(tmp / SHARD_NAME), maxcount=r["samples_per_shard"])
        (tmp / "config.json").write_text(json.dumps(r, indent=2))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        try:
            tmp.rename(self.directory)
        except OSError:  # another process finished the same directory first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("shapes triplets: %s", json.dumps(stats))
        return self.directory

    def stats(self) -> dict[str, Any]:
        return json.loads((self.build() / "stats.json").read_text())

    def validation_samples(self) -> list[dict[str, Any]]:
        """Editing triplets of held-out prompts (flawed renders, never trained on), as GenRefDataModule's
        validation samples: PIL `image` (target) and `condition`, `prompt`, `reflection`, `t5_text`."""
        if self._val_samples is None:
            per_category = -(-self.num_val_samples // 6)
            cases = heldout_flawed_cases(per_category, self.build_config["image_size"], self.seed + 1)
            self._val_samples = [
                {"image": case.good, "condition": case.bad, "prompt": case.prompt, "reflection": case.reflection,
                 "t5_text": t5_text(case.prompt, case.reflection), "subset": case.subset}
                for case in cases[: self.num_val_samples]
            ]
        return self._val_samples


def triplets_dir(build_config: dict[str, Any]) -> Path:
    from reflectionflow.models.loading import cache_dir

    digest = hashlib.sha256(json.dumps(build_config, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "recipes" / f"shapes_triplets-{digest}"


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
