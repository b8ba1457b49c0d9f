"""The GenRef training stream: whole batches, subset mixing by global step, exact and cheap resume.

How the step reaches the workers
--------------------------------
It is never sent: every worker computes it. Each dataloader worker yields whole batches (the DataLoader
runs with `batch_size=None`), and PyTorch's DataLoader takes them round-robin from its W workers, in
order. So the b-th batch a rank consumes comes from *stream* `s = b % W` at *position* `p = b // W`, and
its global optimizer step is `b // accumulate_grad_batches`. The subset weights of that step
(`SubsetSchedule`) are therefore known inside the worker, identical in every worker and rank, with no
inter-process communication, and also right after a resume.

Replayable streams
------------------
Everything a stream yields is a pure function of (seed, rank, stream, position) and the data:
- its shard order (`sources.stream_shard_order`) and the raw-sample shuffle buffer (its own RNG);
- per batch, a *selection* RNG seeded by (seed, rank, stream, position) draws the subset of each slot;
- per batch, an *augmentation* RNG seeded likewise draws five numbers per slot (three drops, the crop);
  a slot's numbers belong to its place in the batch, so skipping a corrupt sample shifts nothing.

Untrusted sizes: a sample with an image whose header claims more than `max_image_pixels` pixels is
skipped before anything is decoded, and counted as `oversized_image`.

Raw samples (bytes, not decoded) are routed into one bounded FIFO queue per subset; a slot of subset X
takes the oldest queued X sample, reading further raw samples (queueing the others; a full queue drops
the newcomer) until one arrives. Only the samples that are yielded are JPEG-decoded.

Resume: the DataModule counts the batches the trainer consumed (n) and stores it in the checkpoint. A new
iterator starts at batch n: worker w serves stream `(n + w) % W` from position `(n + w) // W`, after
replaying the earlier positions of that stream without decoding (selection only: tar reading, queueing,
subset draws). A sample whose JPEG turned out corrupt was skipped, which changed what followed; such
samples are reported with each batch, kept in the checkpoint, and treated as corrupt during the replay.
Exact resume needs the same seed, batch size, number of workers, world size, accumulation and shards.

Missing subsets: after a full pass over the shards a stream knows which subsets exist; a subset with
weight but no samples gets weight 0 (the others are renormalised) with a warning. This is detected
lazily, when the subset is first drawn, and costs one pass over the data. Finite mode (`resampled=False`)
does no mixing: every sample of the rank's share is yielded once, in (shuffled) shard order.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from collections import Counter, deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from reflectionflow.data.schedule import SubsetSchedule
from reflectionflow.data.sources import SKIP_REASONS, RawSample, read_shard, stream_shard_order
from reflectionflow.data.text_embeddings import TextEmbeddingReader
from reflectionflow.data.transforms import (
    DECODE_ERRORS,
    DropRates,
    choose_t5_text,
    decode_pair,
    sample_pixels,
    stack_images,
)

log = logging.getLogger(__name__)

_SELECTION, _AUGMENTATION, _SHUFFLE = 0, 1, 2  # RNG stream tags


class GenRefStream(IterableDataset):
    """Batches of GenRef samples for one rank (see the module docstring for the stream layout).

    Each batch is a dict: `image` (B, 3, T, T) and `condition` (B, 3, C, C) uint8 (the DataModule turns them
    into float32 in [-1, 1] after the transfer to the training device); `prompt`
    (CLIP text, always the original prompt), `t5_text` (the T5 text used after drops), `reflection`,
    `subset`, `key` (lists of str); with precomputed text embeddings (`text_embeddings`, their directory
    suffix: `reflectionflow.data.text_embeddings`) also `t5_embeds` (B, L, D) and `pooled_embeds` (B, P) of
    the texts actually used; `meta`: `batch_index`, `stream`, `step`, `skipped` (this stream's
    cumulative skip counts by reason) and `corrupt` (ids of samples found corrupt while making the batch).
    `start_batch` and `known_corrupt` are set by the DataModule before an iterator is created.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        batch_size: int,
        target_size: int,
        condition_size: int,
        drops: DropRates,
        schedule: SubsetSchedule | None,
        seed: int,
        rank: int,
        world_size: int,
        resampled: bool,
        accumulate_grad_batches: int,
        shuffle_buffer: int,
        queue_size: int,
        text_embeddings: str | None = None,
        max_image_pixels: int,
    ):
        super().__init__()
        self.urls = list(urls)
        self.batch_size = batch_size
        self.target_size = target_size
        self.condition_size = condition_size
        self.drops = drops
        self.schedule = schedule
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.accumulate_grad_batches = accumulate_grad_batches
        self.shuffle_buffer = shuffle_buffer
        self.queue_size = queue_size
        self.text_embeddings = text_embeddings
        self.max_image_pixels = max_image_pixels
        self.start_batch = 0
        self.known_corrupt: frozenset[str] = frozenset()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_streams, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        first = self.start_batch + worker
        stream = _Stream(self, first % num_streams, num_streams)
        start = first // num_streams
        for position in range(start):
            stream.select(position, decode=False)
        for position in itertools.count(start):
            batch = stream.make_batch(position)
            if batch is None:
                return
            yield batch


class _Stream:
    """State of one stream within one iterator: raw reader, subset queues, skip counts, corrupt ids."""

    def __init__(self, config: GenRefStream, index: int, num_streams: int):
        self.config = config
        self.index = index
        self.num_streams = num_streams
        self.skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
        self.corrupt = set(config.known_corrupt)
        self.missing: set[str] = set()
        self.subsets_in_data: frozenset[str] | None = None
        self.queues: dict[str, deque[RawSample]] = {}
        self.embeddings = TextEmbeddingReader(config.text_embeddings) if config.text_embeddings else None
        raw = self._passes()
        if config.shuffle_buffer > 0:
            rng = random.Random(self._seed(_SHUFFLE))
            raw = wds.shuffle(config.shuffle_buffer, min(100, config.shuffle_buffer), rng=rng)(raw)
        self.raw = raw

    def _seed(self, *tags: int) -> int:
        c = self.config
        return int(np.random.SeedSequence([c.seed, c.rank, self.index, *tags]).generate_state(1)[0])

    def _passes(self) -> Iterator[RawSample]:
        c = self.config
        for pass_index in itertools.count():
            urls = stream_shard_order(
                c.urls,
                rank=c.rank,
                world_size=c.world_size,
                stream=self.index,
                num_streams=self.num_streams,
                resampled=c.resampled,
                seed=c.seed,
                pass_index=pass_index,
            )
            seen: set[str] = set()
            for url in urls:
                for raw in read_shard(url, self.skipped):
                    seen.add(raw.subset)
                    yield raw
            if pass_index == 0:
                self.subsets_in_data = frozenset(seen)
            if not c.resampled:
                return
            if not seen:
                raise RuntimeError(
                    f"no readable sample in any of the {len(urls)} shards (skipped: {dict(self.skipped)})"
                )

    def _take(self, subset: str) -> RawSample | None:
        """The oldest queued sample of `subset`, reading on as needed; None if the data has none."""
        queue = self.queues.setdefault(subset, deque())
        while not queue:
            if self.subsets_in_data is not None and subset not in self.subsets_in_data:
                self.missing.add(subset)
                warnings.warn(
                    f"subset {subset!r} has weight in data.split_ratios but no samples in the shards; "
                    "its weight goes to the other subsets",
                    stacklevel=2,
                )
                return None
            raw = next(self.raw)
            if raw.subset == subset:
                return raw
            other = self.queues.setdefault(raw.subset, deque())
            if len(other) < self.config.queue_size:
                other.append(raw)
        return queue.popleft()

    def _next_raw(self, rng: np.random.Generator, step: int) -> RawSample | None:
        """The next sample of the stream: drawn by subset weights when mixing, else in stream order."""
        schedule = self.config.schedule
        if schedule is None:
            return next(self.raw, None)
        while True:
            weights = schedule.weights(step, exclude=self.missing)
            names = list(weights)
            cumulative = np.cumsum([weights[n] for n in names])
            index = min(
                int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(names) - 1
            )
            raw = self._take(names[index])
            if raw is not None:
                return raw

    def select(
        self, position: int, decode: bool = True
    ) -> tuple[list[tuple[RawSample, tuple]], list[str], int]:
        """The samples of batch `position` (decoded when `decode`), new corrupt ids, and the batch's step.

        Without decoding, samples are assumed sound unless already known corrupt: that is how the replay
        reproduces a run in which every corrupt sample it met was recorded.
        """
        c = self.config
        batch_index = self.index + position * self.num_streams
        step = batch_index // c.accumulate_grad_batches
        rng = np.random.default_rng(self._seed(_SELECTION, position))
        slot_draws = np.random.default_rng(self._seed(_AUGMENTATION, position)).random((c.batch_size, 5))
        picks: list[tuple[RawSample, tuple]] = []
        new_corrupt: list[str] = []
        while len(picks) < c.batch_size:
            raw = self._next_raw(rng, step)
            if raw is None:
                break
            if raw.id in self.corrupt:
                self.skipped["corrupt_jpeg"] += 1
                continue
            if self._oversized(raw, log_it=decode):
                self.skipped["oversized_image"] += 1
                continue
            if not decode:
                picks.append((raw, ()))
                continue
            draws = slot_draws[len(picks)]
            try:
                pair = decode_pair(
                    raw.members["good_image.jpg"],
                    raw.members["bad_image.jpg"],
                    c.target_size,
                    c.condition_size,
                    (draws[3], draws[4]),
                )
            except DECODE_ERRORS:
                self.corrupt.add(raw.id)
                new_corrupt.append(raw.id)
                self.skipped["corrupt_jpeg"] += 1
                continue
            picks.append((raw, (*pair, draws[:3])))
        return picks, new_corrupt, step

    def _oversized(self, raw: RawSample, log_it: bool) -> bool:
        """Whether an image of the sample would decode to more than `max_image_pixels` (from the headers, so
        the replay of a resume skips the same samples without decoding)."""
        pixels = sample_pixels(raw.members)
        if pixels <= self.config.max_image_pixels:
            return False
        if log_it:
            log.warning(
                "skipping %s: an image of %s pixels, over data.max_image_pixels=%d",
                raw.id,
                pixels,
                self.config.max_image_pixels,
            )
        return True

    def make_batch(self, position: int) -> dict | None:
        picks, new_corrupt, step = self.select(position)
        if not picks:
            return None
        c = self.config
        images, conditions, prompts, t5_texts, reflections, subsets, keys = [], [], [], [], [], [], []
        for raw, (image, condition, drop_draws) in picks:
            prompt = raw.members["prompt.txt"].decode("utf-8", "replace").strip()
            reflection = raw.members["reflection.txt"].decode("utf-8", "replace").strip()
            t5, drop_image = choose_t5_text(prompt, reflection, raw.subset, drop_draws, c.drops)
            images.append(image)
            conditions.append(np.zeros_like(condition) if drop_image else condition)
            prompts.append(prompt)
            t5_texts.append(t5)
            reflections.append(reflection)
            subsets.append(raw.subset)
            keys.append(raw.key)
        batch = self._text_embeddings([raw for raw, _ in picks], prompts, t5_texts, reflections)
        return batch | {
            "image": stack_images(images),
            "condition": stack_images(conditions),
            "prompt": prompts,
            "t5_text": t5_texts,
            "reflection": reflections,
            "subset": subsets,
            "key": keys,
            "meta": {
                "batch_index": self.index + position * self.num_streams,
                "stream": self.index,
                "step": step,
                "skipped": dict(self.skipped),
                "corrupt": new_corrupt,
            },
        }

    def _text_embeddings(self, samples: list[RawSample], prompts, t5_texts, reflections) -> dict:
        """`t5_embeds` (B, L, D) and `pooled_embeds` (B, P) of the texts the batch uses, when precomputed."""
        if self.embeddings is None:
            return {}
        pairs = [
            self.embeddings.shard(raw.id[: -len(raw.key) - 1]).lookup(raw.key, prompt, t5, reflection)
            for raw, prompt, t5, reflection in zip(samples, prompts, t5_texts, reflections, strict=True)
        ]
        return {"t5_embeds": torch.stack([t5 for t5, _ in pairs]), "pooled_embeds": torch.stack([p for _, p in pairs])}
