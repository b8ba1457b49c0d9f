"""Shard sources: expanding and checking shard patterns, per-stream shard order, and raw sample reading.

A pattern is what webdataset accepts (local paths with `{a..b}` braces, `pipe:` commands, http(s) URLs,
several joined by `::`) plus shell globs for local files and `hf://datasets/<repo>/<file>` paths on the
Hugging Face hub, read through `huggingface_hub` (`HF_ENDPOINT` for a mirror; a gated or private dataset
takes its token from `HF_TOKEN`, never from the config). `check_shards` fails at once, naming the pattern
or URL, when nothing matches or a source cannot be opened; it is cheap (local: a `stat` per shard; remote:
the first shard's header only), so the train app calls it before loading any model.

Reading never fails on bad data: a shard that cannot be opened (`unreadable_shard`), a tar stream that
breaks or ends early, including a download that fails (`truncated_tar`), a sample with a missing key or a
zero-byte member are skipped and counted per reason (`SKIP_REASONS`). JPEG corruption
only shows when decoding, and an image's size in its header, so the stream counts `corrupt_jpeg` and
`oversized_image` (over `data.max_image_pixels`) itself.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import suppress
from typing import NamedTuple

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

SKIP_REASONS = (
    "corrupt_jpeg", "oversized_image", "missing_key", "empty_member", "truncated_tar", "unreadable_shard"
)
IMAGE_KEYS = ("good_image.jpg", "bad_image.jpg")
TEXT_KEYS = ("prompt.txt", "reflection.txt", "subset.txt")
# Keys that must hold bytes; the reflection may be empty (a reflection under 5 characters is dropped anyway).
NON_EMPTY_KEYS = ("good_image.jpg", "bad_image.jpg", "prompt.txt", "subset.txt")
HUB_PREFIX = "hf://"
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", HUB_PREFIX)


class ShardSourceError(ValueError):
    """A shard pattern matches nothing or one of its sources cannot be opened."""


class RawSample(NamedTuple):
    """One undecoded sample: `id` (`url#key`, unique over the shard set), its subset and member bytes."""

    id: str
    key: str
    subset: str
    members: dict[str, bytes]


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """All shard URLs of a pattern (or list of patterns), in order; local globs are sorted."""
    patterns = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        for url in wds.shardlists.expand_urls(str(pattern)):
            if _is_remote(url):
                urls.append(url)
            elif glob.has_magic(url):
                matches = sorted(glob.glob(os.path.expanduser(url)))
                if not matches:
                    raise ShardSourceError(f"shard pattern {url!r} matches no files (set data.shards)")
                urls.extend(matches)
            else:
                urls.append(os.path.expanduser(url))
    return urls


def hub_filesystem():
    """huggingface_hub's file system, authenticated with `HF_TOKEN` alone (no token: anonymous), so the
    token stays in the environment: never in a config, a shard URL or a log. A new instance each time,
    so it reads the current `HF_ENDPOINT` setting."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem(token=os.environ.get("HF_TOKEN") or False, skip_instance_cache=True)


def open_shard(url: str):
    """A readable byte stream of one shard: `hf://` paths streamed by huggingface_hub (which reconnects
    where a broken download stopped), everything else through webdataset's `gopen`."""
    if url.startswith(HUB_PREFIX):
        return hub_filesystem().open(url, "rb", block_size=0)
    return wds.gopen(url)


def _probe_hub(url: str) -> bytes:
    """The first 512 bytes of a hub shard, or one line on why it cannot be read."""
    try:
        with open_shard(url) as stream:
            return stream.read(512)
    except Exception as err:  # missing repo or file, gated, offline: huggingface_hub raises many types
        hint = "" if os.environ.get("HF_TOKEN") else "; a gated or private dataset needs HF_TOKEN"
        problem = f"{type(err).__name__}: {str(err)[:200]}"
        raise ShardSourceError(f"cannot open shard {url!r}: {problem}{hint}") from None


def _looks_like_tar(head: bytes) -> bool:
    return (len(head) >= 512 and head[257:262] == b"ustar") or head[:2] == b"\x1f\x8b"  # tar or gzip


def _probe_remote(url: str, timeout: float = 60.0) -> None:
    """Read the first 512 bytes of a remote shard and check that they start a tar archive."""
    if url.startswith(HUB_PREFIX):
        head, problem = _probe_hub(url), "the hub's answer"
    elif url.startswith("pipe:"):
        process = subprocess.Popen(
            url[len("pipe:") :],
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so the probe can end the whole command
        )
        try:
            head = process.stdout.read(512)
        finally:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            _, stderr = process.communicate()
        problem = f"exit status {process.returncode}: {stderr.decode(errors='replace').strip()[:200]}"
    else:
        if shutil.which("curl") is None:
            raise ShardSourceError(
                f"cannot open {url!r}: webdataset reads http(s) shards with curl, not installed"
            )
        request = urllib.request.Request(url, headers={"Range": "bytes=0-511"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                head = response.read(512)
        except OSError as err:
            raise ShardSourceError(f"cannot open shard {url!r}: {err}") from None
        problem = "the server's answer"
    if not _looks_like_tar(head):
        raise ShardSourceError(f"cannot open shard {url!r}: not a tar archive ({problem})")


def check_shards(shards: str | Sequence[str]) -> list[str]:
    """Expand `shards` and check that they can be opened; return the URLs or raise `ShardSourceError`.

    Local shards must all exist and be readable, and the first start a tar archive; for remote ones
    (`pipe:`, http(s), `hf://`) the first is opened and checked so.
    A shard that is empty or truncated is not an error here: reading skips and counts it.
    """
    urls = expand_shards(shards)
    if not urls:
        raise ShardSourceError(f"shard pattern {shards!r} names no shards (set data.shards)")
    unreadable = [u for u in urls if not _is_remote(u) and not (os.path.isfile(u) and os.access(u, os.R_OK))]
    if unreadable:
        raise ShardSourceError(
            f"{len(unreadable)} of {len(urls)} shards of {shards!r} cannot be read, first: {unreadable[0]!r}"
        )
    local = [u for u in urls if not _is_remote(u)]
    if local:
        _probe_local(local[0])
    remote = [u for u in urls if _is_remote(u)]
    if remote:
        _probe_remote(remote[0])
    return urls


def _probe_local(path: str) -> None:
    """The first 512 bytes of a local shard start a tar archive (an empty file is skipped when read)."""
    with open(path, "rb") as file:
        head = file.read(512)
    if head and not _looks_like_tar(head):
        raise ShardSourceError(f"cannot open shard {path!r}: not a tar archive")


def stream_shard_order(
    urls: Sequence[str],
    *,
    rank: int,
    world_size: int,
    stream: int,
    num_streams: int,
    resampled: bool,
    seed: int,
    pass_index: int,
) -> list[str]:
    """Shards one (rank, stream) reads in pass `pass_index`.

    Finite mode: a disjoint share, `urls[rank::world_size][stream::num_streams]`, in order (one pass).
    Resampled mode: a permutation of all shards, different for every (seed, rank, stream, pass).
    """
    if not resampled:
        return list(urls[rank::world_size][stream::num_streams])
    order = np.random.default_rng([seed, rank, stream, pass_index, 0x5A4D]).permutation(len(urls))
    return [urls[i] for i in order]


def _invalid_reason(sample: dict) -> str | None:
    if any(key not in sample for key in (*IMAGE_KEYS, *TEXT_KEYS)):
        return "missing_key"
    if any(len(sample[key]) == 0 for key in NON_EMPTY_KEYS):
        return "empty_member"
    return None


def read_shard(url: str, skipped: Counter) -> Iterator[RawSample]:
    """Valid raw samples of one shard; skips are added to `skipped` by reason, nothing is raised."""
    try:
        stream = open_shard(url)
    except Exception:  # any scheme's failure to open (missing file, bad command, ...)
        skipped["unreadable_shard"] += 1
        return
    try:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            reason = _invalid_reason(sample)
            if reason is not None:
                skipped[reason] += 1
                continue
            subset = sample["subset.txt"].decode("utf-8", "replace").strip()
            members = {key: sample[key] for key in (*IMAGE_KEYS, *TEXT_KEYS)}
            yield RawSample(f"{url}#{sample['__key__']}", sample["__key__"], subset, members)
    except Exception:  # the tar stream broke or ended early (also a failed download): the rest is lost
        skipped["truncated_tar"] += 1
    finally:
        with suppress(Exception):
            stream.close()
