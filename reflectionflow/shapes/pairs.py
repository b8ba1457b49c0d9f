"""(prompt, correct image) pairs of the training prompts, rendered on the fly: the VAE's and the base
text-to-image model's training data. The stream is a pure function of (seed, worker), endless.

With `caption_fraction` p, a share p of the examples are captioned in detail instead (every object's
colour, shape and cell, `world.captions`), as FLUX trains on rich captions beside short prompts; a scene
that satisfies a held-out prompt always keeps its short prompt.

With `pool_size` the stream cycles through a fixed pool of that many examples instead (a fresh shuffle per
epoch); each sample carries its pool index as `key`, so a trainer can cache per-example work such as VAE
latents (`TextToImageModule(cache_latents=True)`), the images of one index being the same each time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

from reflectionflow.shapes.world import (
    DEFAULT_SIZE,
    caption_allowed,
    caption_spec,
    render_scene,
    sample_example,
)


def image_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1], the range the VAE and the pipelines use."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_image(pixels: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    from PIL import Image

    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class ShapesPairs(IterableDataset):
    def __init__(
        self,
        split: str = "train",
        image_size: int = DEFAULT_SIZE,
        seed: int = 0,
        pool_size: int | None = None,
        caption_fraction: float = 0.0,
    ):
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"data.pool_size must be >= 1 or null (endless fresh examples), got {pool_size}")
        if not 0.0 <= caption_fraction <= 1.0:
            raise ValueError(f"data.caption_fraction must be in [0, 1], got {caption_fraction}")
        self.split, self.image_size, self.seed, self.pool_size = split, image_size, seed, pool_size
        self.caption_fraction = caption_fraction

    def __iter__(self) -> Iterator[dict]:
        # Each reader (DDP rank x DataLoader worker) draws its own endless stream, or its own slice of every
        # epoch of the pool.
        rank, world_size, worker, workers = pytorch_worker_info()
        shard, shards = rank * workers + worker, world_size * workers
        if self.pool_size is None:
            rng = np.random.default_rng([self.seed, shard])
            while True:
                yield self._pair(rng)
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, 1, epoch]).permutation(self.pool_size)
            for index in order[shard::shards].tolist():
                yield {**self.pool_example(index), "key": index}

    def pool_example(self, index: int) -> dict:
        """Pool example `index`: a pure function of (seed, split, index), whichever epoch or worker asks."""
        return self._pair(np.random.default_rng([self.seed, 2, index]))

    def _pair(self, rng: np.random.Generator) -> dict:
        spec, scene = sample_example(rng, self.split)
        if self.caption_fraction and rng.random() < self.caption_fraction and caption_allowed(scene):
            spec = caption_spec(scene, rng)
        return {"image": image_tensor(render_scene(scene, self.image_size)), "prompt": spec.prompt}


class ShapesPairsDataModule(L.LightningDataModule):
    def __init__(
        self,
        batch_size: int = 32,
        image_size: int = DEFAULT_SIZE,
        num_workers: int = 0,
        seed: int = 0,
        pool_size: int | None = None,
        caption_fraction: float = 0.0,
    ):
        super().__init__()
        self.dataset = ShapesPairs("train", image_size, seed, pool_size, caption_fraction)  # checks now, not at fit
        self.batch_size, self.num_workers = batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
