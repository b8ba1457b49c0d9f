"""Precomputed T5 and CLIP embeddings of GenRef shards, so training need not load the text encoders.

    python -m reflectionflow.data.text_embeddings --model black-forest-labs/FLUX.1-dev \
        --shards '/data/genref/genref_{0..207}.tar' --device cuda [--part 0 --parts 8]

then train with `data.text_embeddings=text512` (T5-XXL, 9.5 GB in bf16, and CLIP are then not loaded).

Beside each local shard `<dir>/genref_7.tar`, a directory `<dir>/genref_7.<suffix>/` (suffix `text<L>`):
`index.json` (sample keys in row order, model, T5 length, dtype, shapes), `t5.bin` (rows of (2, L, D): T5 of
the prompt alone and of `"{prompt} [Reflexion] {reflection}"`), `pooled.bin` (rows of (P,): pooled CLIP of
the prompt) and `empty.bin` ((L, D): T5 of the empty text). A sample's drops pick one of the three T5
texts, so every text a training batch can use is there; rows have a fixed size and are read through a
memory map, so a batch reads only its own rows. FLUX encodes T5 without a padding mask, so the padded
positions carry signal and all L positions are stored: 2 x L x D x 2 bytes per sample, 8 MiB at 512 x 4096
in bf16 (about 40 GB per GenRef shard of ~4800 samples, 8 TB for the whole set): worth it for a subset, or
where storage is cheaper than a T5-XXL per GPU.

Each shard's directory is written under a temporary name and renamed when complete; existing ones are
skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from reflectionflow.data.sources import check_shards, read_shard
from reflectionflow.data.transforms import t5_text

PROMPT_ROW, REFLECTION_ROW = 0, 1  # the two T5 texts of a sample's row in t5.bin
_STORAGE = {2: np.int16, 4: np.int32}  # bytes per element -> a numpy type of that size (bf16 has none)


def default_suffix(max_sequence_length: int) -> str:
    return f"text{max_sequence_length}"


def embeddings_dir(url: str, suffix: str) -> Path:
    """Where the embeddings of the local shard `url` live: beside it, named after it."""
    path = Path(url)
    return path.with_name(f"{path.name.removesuffix('.tar')}.{suffix}")


def _to_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32).numpy().tobytes()


class ShardTextEmbeddings:
    """The embeddings of one shard, memory-mapped; rows looked up by sample key."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.index = json.loads((directory / "index.json").read_text())
        self.rows = {key: row for row, key in enumerate(self.index["keys"])}
        self.dtype = getattr(torch, self.index["dtype"])
        storage = _STORAGE[torch.empty(0, dtype=self.dtype).element_size()]
        length, width = self.index["t5_shape"]
        count = len(self.index["keys"])
        self._t5 = np.memmap(directory / "t5.bin", dtype=storage, mode="r", shape=(count, 2, length, width))
        self._pooled = np.memmap(directory / "pooled.bin", dtype=storage, mode="r",
                                 shape=(count, *self.index["pooled_shape"]))
        self._empty = np.memmap(directory / "empty.bin", dtype=storage, mode="r", shape=(length, width))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array)).view(self.dtype)

    def lookup(self, key: str, prompt: str, used_t5_text: str, reflection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 (L, D), pooled CLIP (P,)) of sample `key` for the T5 text its drops chose."""
        row = self.rows[key]
        if used_t5_text == "":
            t5 = self._tensor(self._empty)
        elif used_t5_text == t5_text(prompt, reflection) and used_t5_text != prompt:
            t5 = self._tensor(self._t5[row, REFLECTION_ROW])
        elif used_t5_text == prompt:
            t5 = self._tensor(self._t5[row, PROMPT_ROW])
        else:
            raise ValueError(f"sample {key}: T5 text {used_t5_text!r} is none of the three that were precomputed")
        return t5, self._tensor(self._pooled[row])


class TextEmbeddingReader:
    """Looks up precomputed embeddings of samples of any shard, opening each shard's files on first use
    (in the dataloader worker that reads it)."""

    def __init__(self, suffix: str):
        self.suffix = suffix
        self._shards: dict[str, ShardTextEmbeddings] = {}

    def shard(self, url: str) -> ShardTextEmbeddings:
        if url not in self._shards:
            self._shards[url] = ShardTextEmbeddings(embeddings_dir(url, self.suffix))
        return self._shards[url]


def check_text_embeddings(urls: Sequence[str], suffix: str) -> dict:
    """The embeddings' settings (model, T5 length, dtype), after checking that every shard has them;
    raises `ShardSourceError` naming the first shard without (or a remote shard: they must be local)."""
    from reflectionflow.data.sources import ShardSourceError, _is_remote

    settings: dict | None = None
    for url in urls:
        if _is_remote(url):
            raise ShardSourceError(f"data.text_embeddings needs local shards, got {url!r}")
        index = embeddings_dir(url, suffix) / "index.json"
        if not index.is_file():
            raise ShardSourceError(
                f"no text embeddings {index.parent} for shard {url!r}; write them with "
                f"python -m reflectionflow.data.text_embeddings --model <model.path> --shards <data.shards>"
            )
        if settings is None:
            info = json.loads(index.read_text())
            settings = {k: info[k] for k in ("model", "max_sequence_length", "dtype")}
    return settings or {}


# ------------------------------------------------------------------------------------------------ writing
def load_text_encoders(model: str, dtype: torch.dtype, device: str):
    """A FluxPipeline with only its tokenizers and text encoders (no transformer, no VAE)."""
    from diffusers import FluxPipeline

    from reflectionflow.models.loading import dtype_argument, resolve_model_path

    pipe = FluxPipeline.from_pretrained(resolve_model_path(model, "--model"), transformer=None, vae=None,
                                        **dtype_argument(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def write_shard_embeddings(pipe, url: str, suffix: str, *, model: str, max_sequence_length: int,
                           batch_size: int) -> Path:
    """Encode every sample of the shard `url` (as `read_shard` yields them) into its embeddings directory."""
    target = embeddings_dir(url, suffix)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    device = pipe._execution_device

    def encode(clip_texts: list[str], t5_texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t5, pooled, _ = pipe.encode_prompt(prompt=clip_texts, prompt_2=t5_texts, device=device,
                                           max_sequence_length=max_sequence_length)
        return t5, pooled

    empty_t5, pooled = encode([""], [""])
    (partial / "empty.bin").write_bytes(_to_bytes(empty_t5[0]))
    keys: list[str] = []
    with open(partial / "t5.bin", "wb") as t5_file, open(partial / "pooled.bin", "wb") as pooled_file:
        samples = iter(read_shard(url, Counter()))
        while batch := [s for _, s in zip(range(batch_size), samples, strict=False)]:
            prompts = [s.members["prompt.txt"].decode("utf-8", "replace").strip() for s in batch]
            reflections = [s.members["reflection.txt"].decode("utf-8", "replace").strip() for s in batch]
            t5, pooled = encode(prompts + prompts, prompts + [t5_text(p, r) for p, r in zip(prompts, reflections,
                                                                                           strict=True)])
            t5 = torch.stack([t5[: len(batch)], t5[len(batch):]], dim=1)  # (B, 2, L, D)
            t5_file.write(_to_bytes(t5))
            pooled_file.write(_to_bytes(pooled[: len(batch)]))
            keys += [s.key for s in batch]
    index = {"keys": keys, "model": model, "max_sequence_length": max_sequence_length,
             "dtype": str(empty_t5.dtype).removeprefix("torch."), "t5_shape": list(empty_t5.shape[1:]),
             "pooled_shape": list(pooled.shape[1:])}
    (partial / "index.json").write_text(json.dumps(index))
    os.replace(partial, target)
    return target


def write_text_embeddings(shards: str | Sequence[str], model: str, *, max_sequence_length: int = 512,
                          suffix: str | None = None, batch_size: int = 16, device: str = "cpu",
                          dtype: str = "bfloat16", part: int = 0, parts: int = 1) -> list[Path]:
    """Write the embeddings of shards `part`, `part + parts`, ... that do not have them yet."""
    from reflectionflow.data.sources import ShardSourceError, _is_remote

    suffix = suffix or default_suffix(max_sequence_length)
    urls = check_shards(shards)
    remote = [u for u in urls if _is_remote(u)]
    if remote:
        raise ShardSourceError(f"text embeddings are written beside local shards, got {remote[0]!r}")
    todo = [u for u in urls[part::parts] if not embeddings_dir(u, suffix).is_dir()]
    if not todo:
        return []
    pipe = load_text_encoders(model, getattr(torch, dtype), device)
    return [write_shard_embeddings(pipe, url, suffix, model=model, max_sequence_length=max_sequence_length,
                                   batch_size=batch_size) for url in todo]


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    from reflectionflow.data.sources import ShardSourceError
    from reflectionflow.models.loading import ModelNotFoundError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.path of the training run (hub id, dir, tiny)")
    parser.add_argument("--shards", required=True, help="data.shards (local shards, braces or globs)")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="model.max_sequence_length")
    parser.add_argument("--suffix", default=None, help="directory suffix (default text<length>)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", help="model.weight_dtype of the training run")
    parser.add_argument("--part", type=int, default=0, help="this process writes shards part, part+parts, ...")
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        written = write_text_embeddings(args.shards, args.model, max_sequence_length=args.max_sequence_length,
                                        suffix=args.suffix, batch_size=args.batch_size, device=args.device,
                                        dtype=args.dtype, part=args.part, parts=args.parts)
    except (ShardSourceError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    suffix = args.suffix or default_suffix(args.max_sequence_length)
    print(f"wrote {len(written)} shard embedding directories; train with data.text_embeddings={suffix}")


if __name__ == "__main__":
    main()
