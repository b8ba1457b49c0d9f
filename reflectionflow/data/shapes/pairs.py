"""(prompt, correct image) pairs of the training prompts, rendered on the fly: the VAE's and the base
text-to-image model's training data. The stream is a pure function of (seed, worker), endless."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from reflectionflow.data.shapes.render import render_scene
from reflectionflow.data.shapes.sampling import sample_example
from reflectionflow.data.shapes.world import DEFAULT_SIZE


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
    def __init__(self, split: str = "train", image_size: int = DEFAULT_SIZE, seed: int = 0):
        self.split, self.image_size, self.seed = split, image_size, seed

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, worker.id if worker else 0])
        while True:
            spec, scene = sample_example(rng, self.split)
            yield {"image": image_tensor(render_scene(scene, self.image_size)), "prompt": spec.prompt}


class ShapesPairsDataModule(L.LightningDataModule):
    def __init__(
        self, batch_size: int = 32, image_size: int = DEFAULT_SIZE, num_workers: int = 0, seed: int = 0
    ):
        super().__init__()
        self.batch_size, self.image_size, self.num_workers, self.seed = (
            batch_size,
            image_size,
            num_workers,
            seed,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            ShapesPairs("train", self.image_size, self.seed),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
