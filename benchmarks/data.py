"""GenRef pipeline throughput vs the obvious implementation, on a 4-subset mixture of 256-px synthetic pairs.

    python benchmarks/data.py [--samples 1600] [--batch-size 16]

Both run in one dataloader worker, draw subsets with equal weights, make (256-px target, 128-px condition)
pairs in [-1, 1] with the paper's random drops, and are timed after their first batch. The two are measured
alternately for `--rounds` rounds and the best round of each is compared (the machine may be shared).

- **naive**: one complete webdataset pipeline per subset (shuffle, decode every sample to PIL, then keep
  the subset's samples), the paper's three-resize preprocessing, a mixer drawing a subset per sample and the
  DataLoader's default collation, as in the paper's code. Every pipeline reads and decodes all samples, so
  each yielded sample costs about four decoded pairs.
- **ours**: `GenRefDataModule`: one raw stream routed into per-subset queues, only yielded samples decoded,
  one resampling per image with JPEG draft decoding, whole uint8 batches made in the worker and turned into
  float32 in the training process (the DataModule's batch hooks, as under Lightning).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from reflectionflow.data.datamodule import GenRefDataModule
from reflectionflow.data.synthetic import GENREF_SUBSETS, write_synthetic_shards
from reflectionflow.data.transforms import t5_text

TARGET, CONDITION = 256, 128
WEIGHTS = {name: [0.25] for name in GENREF_SUBSETS}


def naive_preprocess(good: Image.Image, bad: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The paper's geometry done step by step: bad to good's size, both scaled, same crop, bad to condition."""
    good, bad = good.convert("RGB"), bad.convert("RGB")
    width, height = good.size
    bad = bad.resize((width, height), Image.BICUBIC)
    scale = TARGET / min(width, height)
    size = (math.ceil(width * scale), math.ceil(height * scale))
    good, bad = good.resize(size, Image.BICUBIC), bad.resize(size, Image.BICUBIC)
    left, top = random.randint(0, size[0] - TARGET), random.randint(0, size[1] - TARGET)
    box = (left, top, left + TARGET, top + TARGET)
    return good.crop(box), bad.crop(box).resize((CONDITION, CONDITION), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


class NaiveMixture(IterableDataset):
    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        pipelines = {
            name: iter(
                wds.WebDataset(self.urls, resampled=True, shardshuffle=False, handler=wds.warn_and_continue)
                .shuffle(100)
                .decode("pil")
                .select(lambda sample, name=name: sample["subset.txt"] == name)
            )
            for name in WEIGHTS
        }
        while True:
            name = random.choices(list(WEIGHTS), weights=[w[0] for w in WEIGHTS.values()])[0]
            sample = next(pipelines[name])
            good, bad = naive_preprocess(sample["good_image.jpg"], sample["bad_image.jpg"])
            prompt, reflection = sample["prompt.txt"], sample["reflection.txt"]
            drop_text, drop_image, drop_reflection = (random.random() < p for p in (0.1, 0.1, 0.2))
            drop_image = drop_image and name != "editing"
            text = (
                ""
                if drop_text
                else prompt
                if (drop_image or drop_reflection)
                else t5_text(prompt, reflection)
            )
            condition = to_tensor(bad)
            yield {
                "image": to_tensor(good),
                "condition": condition.fill_(-1) if drop_image else condition,
                "prompt": prompt,
                "t5_text": text,
                "subset": name,
            }


def samples_per_second(loader, samples: int, batch_size: int, finish=lambda batch: batch) -> float:
    """Rate of finished batches (float32 images in the training process) after the first batch."""
    batches = iter(loader)
    finish(next(batches))  # worker start-up and buffer fill are not timed
    start = time.perf_counter()
    count = 0
    for batch in itertools.islice(batches, samples // batch_size):
        count += len(finish(batch)["subset"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_synthetic_shards(Path(tmp), args.shards, args.samples_per_shard, image_size=256)
        urls = [str(p) for p in paths]
        print(
            f"wrote {args.shards} x {args.samples_per_shard} samples of 256-px pairs (4 subsets) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        ours = GenRefDataModule(
            urls,
            batch_size=args.batch_size,
            num_workers=1,
            target_size=TARGET,
            condition_size=CONDITION,
            split_ratios=WEIGHTS,
            training_stages=[0],
            shuffle_buffer=100,
            rank=0,
            world_size=1,
            accumulate_grad_batches=1,
        )
        ours.setup("fit")
        finish = lambda batch: ours.on_after_batch_transfer(ours.on_before_batch_transfer(batch, 0), 0)  # noqa: E731
        naive = DataLoader(NaiveMixture(urls), batch_size=args.batch_size, num_workers=1)
        ours_rates, naive_rates = [], []
        for round_index in range(args.rounds):
            ours_rates.append(
                samples_per_second(ours.train_dataloader(), args.samples, args.batch_size, finish)
            )
            naive_rates.append(samples_per_second(naive, args.samples // 2, args.batch_size))
            print(f"round {round_index}: ours {ours_rates[-1]:6.1f}  naive {naive_rates[-1]:6.1f} samples/s")
    ours_rate, naive_rate = max(ours_rates), max(naive_rates)
    print(f"ours : {ours_rate:7.1f} samples/s (best of {args.rounds})")
    print(f"naive: {naive_rate:7.1f} samples/s (best of {args.rounds})")
    print(f"speedup {ours_rate / naive_rate:.1f}x")


if __name__ == "__main__":
    main()
