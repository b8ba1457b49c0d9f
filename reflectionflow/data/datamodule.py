"""`GenRefDataModule`: the Lightning face of the GenRef stream (training batches, fixed validation set, resume).

Lightning calls `state_dict()` / `load_state_dict()` around checkpoints and, on every batch the trainer
takes, `on_before_batch_transfer` (records how many batches this rank consumed, the corrupt samples met and
the latest skip counts) and `on_after_batch_transfer` (uint8 images to float32 in [-1, 1] on the device).
Do not override these two hooks in the LightningModule: Lightning would then use only one of the two.
Code that iterates `train_dataloader()` itself calls both hooks on each batch. `state_dict()` gathers the
corrupt-sample ids of all ranks, so under distributed training it must be called on every rank, as
`Trainer.save_checkpoint` does.

Rank and world size come from the trainer at `setup()` unless given explicitly (tests that simulate ranks);
so does `accumulate_grad_batches`, which maps batches to global optimizer steps.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reflectionflow.data.schedule import SubsetSchedule
from reflectionflow.data.sources import SKIP_REASONS, check_shards, read_shard
from reflectionflow.data.stream import GenRefStream
from reflectionflow.data.text_embeddings import check_text_embeddings
from reflectionflow.data.transforms import (
    DECODE_ERRORS,
    DropRates,
    decode_pair,
    default_max_image_pixels,
    sample_pixels,
    t5_text,
    to_model_range,
)


class GenRefDataModule(L.LightningDataModule):
    """GenRef webdataset shards as training batches (see `reflectionflow.data.stream` for the batch format).

    Args:
        shards: shard pattern(s): local paths with braces or globs, `pipe:` commands, http(s) URLs.
        batch_size: samples per batch on each rank.
        num_workers: dataloader worker processes (0: batches are made in the training process).
        target_size / condition_size: side of the square target image and of the condition image.
        split_ratios / training_stages: subset weights per stage (task warm-up); None keeps the data's own mix.
        drop_text / drop_image / drop_reflection: independent drop probabilities (paper: 0.1 / 0.1 / 0.2).
        seed: the stream is a pure function of seed, rank, worker and position.
        accumulate_grad_batches: batches per optimizer step; None takes the trainer's.
        resampled: infinite stream over random shard orders (training); False: each sample of the rank's
            shard share once (no mixing).
        shuffle_buffer: raw (undecoded) samples in each worker's shuffle buffer (0: no shuffling).
        queue_size: raw samples queued per subset while another subset is being drawn.
        val_shards / num_val_samples: the fixed validation set, the first `num_val_samples` samples of
            `val_shards` (the training shards if None, then not held out), centre-cropped, nothing dropped.
        rank / world_size: override the trainer's (for tests that simulate ranks).
        text_embeddings: the suffix of precomputed T5/CLIP embeddings beside the (local) shards
            (`python -m reflectionflow.data.text_embeddings`); batches then carry `t5_embeds` and
            `pooled_embeds`, and the model loads no text encoders. `check()` fails if a shard has none.
        max_image_pixels: a sample with an image whose header claims more pixels is skipped undecoded
            (`oversized_image`); None: `transforms.default_max_image_pixels` of the training sizes.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        batch_size: int = 1,
        num_workers: int = 2,
        target_size: int = 1024,
        condition_size: int = 512,
        split_ratios: Mapping[str, Sequence[float]] | None = None,
        training_stages: Sequence[int] = (0,),
        drop_text: float = 0.1,
        drop_image: float = 0.1,
        drop_reflection: float = 0.2,
        seed: int = 0,
        accumulate_grad_batches: int | None = None,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        queue_size: int = 64,
        val_shards: str | Sequence[str] | None = None,
        num_val_samples: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        text_embeddings: str | None = None,
        max_image_pixels: int | None = None,
    ):
        super().__init__()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("target_size", target_size, 16),
            ("condition_size", condition_size, 16),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("queue_size", queue_size, 1),
            ("num_val_samples", num_val_samples, 0),
        ):
            if int(value) < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        self.shards = shards if isinstance(shards, str) else list(shards)
        self.val_shards = (
            val_shards if val_shards is None or isinstance(val_shards, str) else list(val_shards)
        )
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.target_size = int(target_size)
        self.condition_size = int(condition_size)
        self.schedule = SubsetSchedule(split_ratios, training_stages) if split_ratios else None
        if self.schedule is not None and not resampled:
            raise ValueError(
                "data.split_ratios (subset mixing) needs data.resampled=true; set split_ratios=null"
            )
        self.drops = DropRates(float(drop_text), float(drop_image), float(drop_reflection))
        self.seed = int(seed)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.resampled = bool(resampled)
        self.shuffle_buffer = int(shuffle_buffer)
        self.queue_size = int(queue_size)
        self.num_val_samples = int(num_val_samples)
        self.rank = rank
        self.world_size = world_size
        self.text_embeddings = text_embeddings
        self.max_image_pixels = int(max_image_pixels or default_max_image_pixels(target_size, condition_size))
        self.text_embedding_settings: dict = {}
        self._train: GenRefStream | None = None
        self._val_samples: list[dict[str, Any]] | None = None
        self._batches_consumed = 0
        self._known_corrupt: set[str] = set()
        self._latest_skips: dict[int, dict[str, int]] = {}

    # ---------------------------------------------------------------- set-up
    def check(self) -> list[str]:
        """Fail at once (`ShardSourceError`, naming the pattern or URL) if a shard source cannot be used.

        Cheap; the train app calls it before loading any model. Returns the training shard URLs.
        """
        urls = check_shards(self.shards)
        if self.val_shards is not None and self.num_val_samples:
            check_shards(self.val_shards)
        if self.text_embeddings:
            self.text_embedding_settings = check_text_embeddings(urls, self.text_embeddings)
        return urls

    def _trainer_value(self, explicit: Any, attribute: str, default: int) -> int:
        if explicit is not None:
            return int(explicit)
        return int(getattr(self.trainer, attribute)) if self.trainer is not None else default

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        urls = self.check()
        rank = self._trainer_value(self.rank, "global_rank", 0)
        world_size = self._trainer_value(self.world_size, "world_size", 1)
        accumulate = self._trainer_value(self.accumulate_grad_batches, "accumulate_grad_batches", 1)
        if self.trainer is not None and accumulate != self.trainer.accumulate_grad_batches:
            raise ValueError(
                f"data.accumulate_grad_batches={accumulate} but the trainer accumulates "
                f"{self.trainer.accumulate_grad_batches}; leave data.accumulate_grad_batches unset"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if not self.resampled and len(urls) < world_size:
            raise ValueError(
                f"data.resampled=false gives each rank whole shards: {len(urls)} shards < {world_size} ranks"
            )
        self._train = GenRefStream(
            urls,
            batch_size=self.batch_size,
            target_size=self.target_size,
            condition_size=self.condition_size,
            drops=self.drops,
            schedule=self.schedule,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            resampled=self.resampled,
            accumulate_grad_batches=accumulate,
            shuffle_buffer=self.shuffle_buffer,
            queue_size=self.queue_size,
            text_embeddings=self.text_embeddings,
            max_image_pixels=self.max_image_pixels,
        )
        self._sync_position()

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self.setup("fit")
        return DataLoader(
            self._train,
            batch_size=None,  # the stream yields whole batches
            num_workers=self.num_workers,
            persistent_workers=False,  # each new iterator must start from the current position
        )

    def validation_samples(self) -> list[dict[str, Any]]:
        """The fixed validation set: the first `num_val_samples` decodable samples of `val_shards`.

        Each is a dict with PIL images `image` (target, centre crop) and `condition` (the flawed image at
        `condition_size`), and `prompt`, `reflection`, `t5_text`, `subset`, `key`. Nothing is dropped. Read
        once, in the calling process, the same on every rank.
        """
        if self._val_samples is None:
            self._val_samples = self._read_validation_samples()
        return self._val_samples

    def _read_validation_samples(self) -> list[dict[str, Any]]:
        samples: list[dict[str, Any]] = []
        if self.num_val_samples == 0:
            return samples
        for url in check_shards(self.val_shards if self.val_shards is not None else self.shards):
            for raw in read_shard(url, Counter()):  # validation skips are not training skips
                if sample_pixels(raw.members) > self.max_image_pixels:
                    continue
                try:
                    image, condition = decode_pair(
                        raw.members["good_image.jpg"],
                        raw.members["bad_image.jpg"],
                        self.target_size,
                        self.condition_size,
                        offset=None,
                    )
                except DECODE_ERRORS:
                    continue
                prompt = raw.members["prompt.txt"].decode("utf-8", "replace").strip()
                reflection = raw.members["reflection.txt"].decode("utf-8", "replace").strip()
                samples.append(
                    {
                        "image": Image.fromarray(image),
                        "condition": Image.fromarray(condition),
                        "prompt": prompt,
                        "reflection": reflection,
                        "t5_text": t5_text(prompt, reflection),
                        "subset": raw.subset,
                        "key": raw.key,
                    }
                )
                if len(samples) == self.num_val_samples:
                    return samples
        return samples

    # ---------------------------------------------------------------- position and bookkeeping
    def record_batch(self, batch: Mapping[str, Any]) -> None:
        """Note that the trainer consumed `batch` (called from `on_before_batch_transfer`)."""
        meta = batch.get("meta") if isinstance(batch, Mapping) else None
        if meta is None:  # validation batches carry no stream bookkeeping
            return
        self._batches_consumed = max(self._batches_consumed, int(meta["batch_index"]) + 1)
        self._known_corrupt.update(meta["corrupt"])
        self._latest_skips[int(meta["stream"])] = {k: int(v) for k, v in meta["skipped"].items()}
        self._sync_position()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.record_batch(batch)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images (as they leave the workers) to float32 in [-1, 1], on the training device."""
        if isinstance(batch, Mapping) and "meta" in batch:
            batch = {
                **batch,
                "image": to_model_range(batch["image"]),
                "condition": to_model_range(batch["condition"]),
            }
        return batch

    def _sync_position(self) -> None:
        """Tell the stream where the next iterator starts (workers copy it when they are created)."""
        if self._train is not None:
            self._train.start_batch = self._batches_consumed
            self._train.known_corrupt = frozenset(self._known_corrupt)

    @property
    def batches_consumed(self) -> int:
        return self._batches_consumed

    def skipped_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason, summed over the latest counts of its streams."""
        totals = dict.fromkeys(SKIP_REASONS, 0)
        for counts in self._latest_skips.values():
            for reason, count in counts.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def subset_weights(self, step: int) -> dict[str, float]:
        """The schedule's subset weights at a global step (empty without mixing), e.g. for logging."""
        return self.schedule.weights(step) if self.schedule is not None else {}

    # ---------------------------------------------------------------- checkpoint state
    def _stream_layout(self) -> dict[str, Any]:
        train = self._train
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_streams": max(1, self.num_workers),
            "world_size": train.world_size if train else None,
            "accumulate_grad_batches": train.accumulate_grad_batches if train else None,
            "resampled": self.resampled,
            "num_shards": len(train.urls) if train else None,
        }

    def _corrupt_ids_of_all_ranks(self) -> set[str]:
        known = set(self._known_corrupt)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(known))
            for ids in gathered:
                known.update(ids or [])
        return known

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_consumed": self._batches_consumed,
            "known_corrupt": sorted(self._corrupt_ids_of_all_ranks()),
            "stream_layout": self._stream_layout(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches_consumed = int(state_dict["batches_consumed"])
        self._known_corrupt = set(state_dict.get("known_corrupt", ()))
        saved, current = state_dict.get("stream_layout", {}), self._stream_layout()
        changed = {
            k: (saved[k], v) for k, v in current.items() if v is not None and saved.get(k) not in (None, v)
        }
        if changed:
            warnings.warn(
                f"data stream layout changed since the checkpoint {changed}; the data will continue from batch "
                f"{self._batches_consumed} but not reproduce the original order",
                stacklevel=2,
            )
        self._sync_position()
