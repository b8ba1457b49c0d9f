"""Synthetic GenRef-format shards: real JPEG pairs of coloured shapes, prompts, reflections and subsets.

Every sample is a small scene of shapes on a plain background. The *good* image renders the scene (square,
or 5:4 wide for every other sample on average); the *flawed* image renders it with one mistake (a shape
recoloured, moved or missing), `flawed_scale` times the good image's size (1: equal sizes, as in GenRef;
other values exercise the pipeline's resize-to-good step). The reflection is the imperative fix
("Change the blue circle to red."). Used by tests, benchmarks and the embedded tiny experiment.

Why not the shapes world (`reflectionflow.shapes`): these shards test the GenRef reader, not the method,
so they need what the world never makes (non-square and differently sized flawed/good pairs, free
positions, all four GenRef subsets, broken samples), and the core never imports the miniature.

`broken={kind: count}` adds samples broken in one of the ways the reader must survive, keyed
`<shard>-broken-<kind>-<i>` so tests can tell them apart. The kinds are the reader's skip reasons:
`corrupt_jpeg` (a truncated JPEG), `missing_key` (no `bad_image.jpg`), `empty_member` (zero-byte
`good_image.jpg`), `truncated_tar` (an extra shard cut inside its first member: nothing in it is readable).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

GENREF_SUBSETS = ("general", "length", "rule", "editing")
BROKEN_KINDS = ("corrupt_jpeg", "missing_key", "empty_member", "truncated_tar")
_FORMAT_VERSION = 1  # bump when the rendered content changes, so cached shards are rewritten

_COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "yellow": (240, 200, 30),
    "purple": (148, 103, 189),
    "orange": (255, 127, 14),
}
_SHAPES = ("circle", "square", "triangle")
_BACKGROUNDS = ((235, 235, 235), (250, 245, 230), (225, 235, 245))


def _random_scene(rng: np.random.Generator) -> list[dict]:
    """1-3 non-overlapping shapes with distinct (colour, shape) pairs; positions relative to the image size."""
    count = int(rng.integers(1, 4))
    pairs = rng.choice(len(_COLORS) * len(_SHAPES), size=count, replace=False)
    colors = list(_COLORS)
    scene: list[dict] = []
    for p in pairs:
        for _ in range(20):  # rejection sampling; a shape that finds no free place is left out
            center = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)))
            radius = float(rng.uniform(0.1, 0.18))
            if all(math.dist(center, o["center"]) > 1.5 * (radius + o["radius"]) for o in scene):
                color, shape = colors[int(p) // len(_SHAPES)], _SHAPES[int(p) % len(_SHAPES)]
                scene.append({"shape": shape, "color": color, "center": center, "radius": radius})
                break
    return scene


def _render(scene: list[dict], size: tuple[int, int], background: tuple[int, int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for item in scene:
        cx, cy = item["center"][0] * width, item["center"][1] * height
        r = item["radius"] * min(width, height)
        fill = _COLORS[item["color"]]
        if item["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif item["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _flaw(scene: list[dict], rng: np.random.Generator) -> tuple[list[dict], str]:
    """A copy of `scene` with one mistake, and the reflection that fixes it."""
    flawed = [dict(item) for item in scene]
    index = int(rng.integers(len(flawed)))
    item = flawed[index]
    name = f"{item['color']} {item['shape']}"
    kind = ("recolor", "move", "remove")[int(rng.integers(3))]
    if kind == "recolor":
        item["color"] = str(rng.choice([c for c in _COLORS if c != item["color"]]))
        return flawed, f"Change the {item['color']} {item['shape']} to {name.split()[0]}."
    if kind == "move":  # the flawed image has the shape shifted sideways by a third of the width
        x, y = scene[index]["center"]
        item["center"] = (x + 0.35 if x < 0.5 else x - 0.35, y)
        return flawed, f"Move the {name} to the {'left' if x < 0.5 else 'right'}."
    del flawed[index]
    return flawed, f"Add a {name} to the image."


def _prompt(scene: list[dict], subset: str, reflection: str) -> str:
    names = [f"a {item['color']} {item['shape']}" for item in scene]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if subset == "length":
        return (
            f"A clean, minimal illustration showing {listing}, drawn with flat colours and sharp edges "
            "on a plain light background, evenly lit, centred composition, no text, no shadows."
        )
    if subset == "rule":
        return f"Exactly {len(scene)} shape{'s' if len(scene) > 1 else ''}: {listing}."
    if subset == "editing":
        return reflection
    return listing


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _sample(rng: np.random.Generator, image_size: int, subset: str, flawed_scale: float) -> dict[str, bytes]:
    scene = _random_scene(rng)
    flawed, reflection = _flaw(scene, rng)
    wide = bool(rng.integers(2))
    good_size = (image_size * 5 // 4 if wide else image_size, image_size)
    bad_size = (round(good_size[0] * flawed_scale), round(good_size[1] * flawed_scale))
    background = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    return {
        "good_image.jpg": _jpeg(_render(scene, good_size, background)),
        "bad_image.jpg": _jpeg(_render(flawed, bad_size, background)),
        "prompt.txt": _prompt(scene, subset, reflection).encode(),
        "reflection.txt": reflection.encode(),
        "subset.txt": subset.encode(),
    }


def _break(sample: dict[str, bytes], kind: str, index: int) -> dict[str, bytes]:
    if kind == "corrupt_jpeg":
        member = "good_image.jpg" if index % 2 == 0 else "bad_image.jpg"
        sample[member] = sample[member][: len(sample[member]) * 2 // 5]
    elif kind == "missing_key":
        del sample["bad_image.jpg"]
    elif kind == "empty_member":
        sample["good_image.jpg"] = b""
    return sample


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with wds.TarWriter(str(path), mtime=0) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    num_shards: int,
    samples_per_shard: int,
    image_size: int = 64,
    subsets: tuple[str, ...] | list[str] = GENREF_SUBSETS,
    broken: dict[str, int] | None = None,
    seed: int = 0,
    flawed_scale: float = 1.0,
) -> list[Path]:
    """Write `num_shards` GenRef-format shards `genref_0000.tar`, ... into `out_dir`; return their paths.

    Each sample's subset is drawn uniformly from `subsets`, so shards mix subsets as real GenRef may.
    Deterministic for a seed. A `truncated_tar` count adds that many extra (unreadable) shards at the end.
    """
    broken = dict(broken or {})
    unknown = set(broken) - set(BROKEN_KINDS)
    if unknown:
        raise ValueError(f"unknown broken kinds {sorted(unknown)}; choose from {BROKEN_KINDS}")
    if num_shards < 1 or samples_per_shard < 0 or image_size < 8:
        raise ValueError("need num_shards >= 1, samples_per_shard >= 0 and image_size >= 8")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subsets = tuple(subsets)

    shards: list[list[tuple[str, dict[str, bytes]]]] = []
    for shard in range(num_shards):
        samples = []
        for index in range(samples_per_shard):
            rng = np.random.default_rng([seed, shard, index])
            subset = subsets[int(rng.integers(len(subsets)))]
            samples.append((f"{shard:04d}-{index:06d}", _sample(rng, image_size, subset, flawed_scale)))
        shards.append(samples)
    for kind in ("corrupt_jpeg", "missing_key", "empty_member"):
        for i in range(broken.get(kind, 0)):
            rng = np.random.default_rng([seed, 1_000_003, BROKEN_KINDS.index(kind), i])
            shard = i % num_shards
            sample = _break(_sample(rng, image_size, subsets[i % len(subsets)], flawed_scale), kind, i)
            position = int(rng.integers(len(shards[shard]) + 1))
            shards[shard].insert(position, (f"{shard:04d}-broken-{kind}-{i:03d}", sample))

    paths = []
    for shard, samples in enumerate(shards):
        paths.append(out / f"genref_{shard:04d}.tar")
        _write_shard(paths[-1], samples)
    for i in range(broken.get("truncated_tar", 0)):
        shard = num_shards + i
        rng = np.random.default_rng([seed, 1_000_003, BROKEN_KINDS.index("truncated_tar"), i])
        samples = [
            (f"{shard:04d}-broken-truncated_tar-{j:03d}", _sample(rng, image_size, subsets[0], flawed_scale))
            for j in range(2)
        ]
        paths.append(out / f"genref_{shard:04d}.tar")
        _write_shard(paths[-1], samples)
        with open(paths[-1], "r+b") as f:
            f.truncate(512 + 200)  # the first member's header plus part of its data
    return paths


def cached_synthetic_shards(
    name: str = "train",
    num_shards: int = 8,
    samples_per_shard: int = 64,
    image_size: int = 64,
    seed: int = 0,
    broken: dict[str, int] | None = None,
    root: str | os.PathLike | None = None,
) -> str:
    """Shard pattern of synthetic shards written on first use under `root` (default `cache_dir()/synthetic-genref`).

    The directory name holds a digest of the arguments, so a changed config writes new shards. Written into a
    temporary directory and renamed, so concurrent processes (DDP ranks) never see half-written shards.
    """
    params = {
        "num_shards": num_shards,
        "samples_per_shard": samples_per_shard,
        "image_size": image_size,
        "seed": seed,
        "broken": dict(sorted((broken or {}).items())),
        "version": _FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    if root is None:
        from reflectionflow.models.loading import cache_dir

        root = cache_dir() / "synthetic-genref"
    target = Path(root) / f"{name}-{digest}"
    if not (target / "params.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        write_synthetic_shards(staging, num_shards, samples_per_shard, image_size, broken=broken, seed=seed)
        (staging / "params.json").write_text(json.dumps(params, sort_keys=True))
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its shards are identical
            shutil.rmtree(staging)
    total = num_shards + params["broken"].get("truncated_tar", 0)
    return str(target / f"genref_{{0000..{total - 1:04d}}}.tar")
