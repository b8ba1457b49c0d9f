"""A run directory in GenEval's layout: writing it so that a killed run loses at most the prompt in
progress, and reading it back.

    <run>/<00000>/metadata.jsonl         the prompt's record (GenEval's original record for GenEval prompts)
    <run>/<00000>/samples/0000.png       the selected image (what GenEval evaluates)
    <run>/<00000>/candidates/rRR_cCC.png every image the search made (round RR, chain CC)
    <run>/<00000>/search.png             contact sheet: chains x rounds, scores and reflections
    <run>/<00000>/search.json            every candidate's provenance and score, the budget; written last
    <run>/summary.json                   running totals while the job runs (per shard when sharded);
                                         the job's result file (`result_file.write_result`) replaces it
    <run>/run.json                       what the search records are made with (`record_run`): written
                                         at the first start; a resume with other settings is refused
    <run>/run.lock                       the writing process (host, pid, start), per shard; `run_lock`

Folder names are prompt indices, never prompt text. A shard's own files carry `shard_suffix`
(`summary.shard-00001-of-00004.json`). Every file is written to a temporary name and renamed into place;
a prompt is finished exactly when its `search.json` exists, and a re-run clears and redoes any unfinished
prompt folder. Shards of one count share `run.json` and hold their own lock (`run.shard-...lock`): their
prompts are disjoint; a writer whose prompts overlap a live holder's is refused.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from reflectionflow.search.budget import Budget
from reflectionflow.search.engine import PromptSearch
from reflectionflow.search.errors import SetupError
from reflectionflow.search.search_sheet import search_sheet_png

log = logging.getLogger(__name__)
_HELD: set[Path] = set()  # the locks this process holds (`run_lock`)
ELSEWHERE = "write elsewhere (hydra.run.dir=<new directory>, a multirun: hydra.sweep.dir=)"
SEARCH_FILE = "search.json"
RUN_FILE = "run.json"
METADATA_FILE = "metadata.jsonl"
SELECTED_FILE = "samples/0000.png"
SHEET_FILE = "search.png"
PROMPT_FOLDER = re.compile(r"\d{5,}")  # the names `prompt_dir` gives


def shard_suffix(shard_index: int, num_shards: int) -> str:
    """ "" for an unsharded run, else `.shard-00001-of-00004` (the suffix of the shard's summary file)."""
    return "" if num_shards == 1 else f".shard-{shard_index:05d}-of-{num_shards:05d}"


def prompt_dir(run_dir: str | os.PathLike, index: int) -> Path:
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"prompt index must be a non-negative int, got {index!r}")
    return Path(run_dir) / f"{index:05d}"


def read_search(run_dir: str | os.PathLike, index: int) -> dict[str, Any]:
    """A finished prompt's `search.json`."""
    return json.loads((prompt_dir(run_dir, index) / SEARCH_FILE).read_text(encoding="utf-8"))


def read_record(run_dir: str | os.PathLike, index: int) -> dict[str, Any]:
    """A prompt's record, as its `metadata.jsonl` holds it."""
    path = prompt_dir(run_dir, index) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json(path: Path, data: Any) -> None:
    """`atomic_write` of indented JSON (strict: NaN is an error, not an invalid file)."""
    atomic_write(path, _json_bytes(data))


def _create(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, only if `path` does not exist (else FileExistsError): the file
    is written under a temporary name and hard-linked into place, so racing writers cannot both win."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    atomic_write(temporary, data)
    try:
        os.link(temporary, path)
    finally:
        temporary.unlink()


# --- what a run is made with ---------------------------------------------------------------------------
def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run directory's `run.json`, or None (a new directory, or one from before runs recorded it)."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def differing_keys(recorded: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs (a key only one has included)."""
    differ = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differ += differing_keys(old, new, f"{prefix}{key}.")
        elif key not in recorded or key not in wanted or old != new:
            differ.append(f"{prefix}{key}")
    return differ


def _has_prompts(run_dir: Path) -> bool:
    return any(PROMPT_FOLDER.fullmatch(p.name) for p in run_dir.glob("*"))


def record_run(run_dir: str | os.PathLike, made_with: Mapping[str, Any]) -> None:
    """Record `made_with` (the settings the search records depend on) in the run directory, or check that
    its prompts were made with the same: SetupError naming the keys that differ. A record no prompt was
    made with yet (a start that failed before its first prompt) is replaced. Call it before writing
    anything else, so that a refused resume changes nothing."""
    run_dir = Path(run_dir)
    made_with = json.loads(_json_bytes(made_with))  # as it reads back (tuples are lists)
    recorded = read_run_record(run_dir)
    if recorded is None:
        if _has_prompts(run_dir):
            log.warning(
                "%s has no %s (written before runs recorded their settings): its finished prompts are "
                "taken as made with this run's settings",
                run_dir,
                RUN_FILE,
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            _create(run_dir / RUN_FILE, _json_bytes(made_with))
            return
        except FileExistsError:  # a shard starting at the same time recorded it first
            recorded = read_run_record(run_dir)
    differ = differing_keys(recorded, made_with)
    if differ and not _has_prompts(run_dir):
        write_json(run_dir / RUN_FILE, made_with)
    elif differ:
        raise SetupError(
            f"{run_dir} holds a run made with other settings ({RUN_FILE} differs in {', '.join(differ)}); "
            f"resume it with those, or {ELSEWHERE}"
        )


# --- one writer per shard --------------------------------------------------------------------------------
def _lock_path(run_dir: Path, shard_index: int, num_shards: int) -> Path:
    return run_dir / f"run{shard_suffix(shard_index, num_shards)}.lock"


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's holder; None when the lock is gone; {} when it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _overlap(holder: Mapping[str, Any], shard_index: int, num_shards: int) -> bool:
    """Whether the holder's shard and ours share prompts (shard i of n holds the indices = i mod n)."""
    index, count = holder.get("shard", (0, 1))
    return (index - shard_index) % math.gcd(count, num_shards) == 0


def _stale(path: Path, holder: Mapping[str, Any]) -> bool:
    """A holder on this host whose process is gone (our pid on a lock we do not hold: a dead process's,
    e.g. an earlier container's, reused)."""
    if holder.get("host") != socket.gethostname():
        return False  # cannot tell: another machine's process
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False  # cannot tell: a lock without a process id
    if pid == os.getpid():
        return path.resolve() not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _holder_text(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "an unreadable lock"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


def _held(run_dir: Path, path: Path, holder: Mapping[str, Any]) -> SetupError:
    return SetupError(
        f"{run_dir} is being written by {_holder_text(holder)} ({path.name}); wait for it to end or "
        f"{ELSEWHERE}; delete {path} only if that process is gone"
    )


def _check_holders(run_dir: Path, shard_index: int, num_shards: int) -> None:
    """SetupError if a live writer holds prompts of our shard; stale locks are removed with a warning."""
    for path in sorted(run_dir.glob("run*.lock")):
        holder = _read_holder(path)
        if holder is None or (holder and not _overlap(holder, shard_index, num_shards)):
            continue
        if holder and _stale(path, holder):
            log.warning("taking over %s: its holder (%s) is gone", path, _holder_text(holder))
            path.unlink(missing_ok=True)
            continue
        raise _held(run_dir, path, holder)


@contextmanager
def run_lock(run_dir: str | os.PathLike, shard_index: int = 0, num_shards: int = 1) -> Iterator[Path]:
    """Hold the run directory for this process's shard while the block runs: a lock file naming this
    process (host, pid, start time). SetupError when a live process holds overlapping prompts; the lock
    of a process that died on this host is taken over with a warning."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_holders(run_dir, shard_index, num_shards)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shard": [shard_index, num_shards],
    }
    path = _lock_path(run_dir, shard_index, num_shards)
    try:
        _create(path, _json_bytes(me))
    except FileExistsError:  # a writer of the same shard started at the same time
        raise _held(run_dir, path, _read_holder(path) or {}) from None
    _HELD.add(path.resolve())
    try:
        yield path
    finally:
        _HELD.discard(path.resolve())
        if _read_holder(path) == me:
            path.unlink()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class RunWriter:
    """Writes one shard's prompts into a run directory and keeps the run summary current."""

    def __init__(self, run_dir: str | os.PathLike, shard_index: int = 0, num_shards: int = 1):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.run_dir / f"summary{shard_suffix(shard_index, num_shards)}.json"
        # a killed run's half-written summary
        for stale in self.run_dir.glob(f".{self.summary_path.name}.tmp-*"):
            stale.unlink()
        self._finished: dict[int, dict[str, Any]] = {}  # search.json of each finished prompt seen

    def finished(self, index: int) -> dict[str, Any] | None:
        """The prompt's `search.json` if it was finished (by this or an earlier run), else None."""
        if not (prompt_dir(self.run_dir, index) / SEARCH_FILE).is_file():
            return None
        self._finished[index] = read_search(self.run_dir, index)
        return self._finished[index]

    def write(self, search: PromptSearch) -> dict[str, Any]:
        folder = prompt_dir(self.run_dir, search.item.index)
        with search.budget.timed("write"):
            if folder.exists():  # leftovers of a killed run
                shutil.rmtree(folder)
            atomic_write(
                folder / METADATA_FILE, (json.dumps(search.item.record, ensure_ascii=False) + "\n").encode()
            )
            for candidate in search.candidates:
                atomic_write(folder / candidate.file, _png_bytes(candidate.image))
            atomic_write(folder / SELECTED_FILE, _png_bytes(search.best.image))
            atomic_write(folder / SHEET_FILE, search_sheet_png(search))
        search_json = {
            "index": search.item.index,
            "prompt": search.item.prompt,
            "tag": search.item.record.get("tag"),
            "config": search.config.to_dict(),
            "selected": {"round": search.best.round, "chain": search.best.chain, "file": search.best.file},
            "score": search.best.score.value,
            "score_ok": search.best.score.ok,
            "stopped": search.stopped,
            "candidates": [candidate.to_dict() for candidate in search.candidates],
            "budget": search.budget.to_dict(),
        }
        write_json(folder / SEARCH_FILE, search_json)
        self._finished[search.item.index] = search_json
        self.write_summary()
        return search_json

    def summary(self) -> dict[str, Any]:
        """Totals over the finished prompts this writer has seen."""
        budget = Budget()
        for search_json in self._finished.values():
            budget.add(Budget.from_dict(search_json["budget"]))
        scores = [search_json["score"] for search_json in self._finished.values()]
        return {
            "prompts": len(scores),
            "mean_score": sum(scores) / len(scores) if scores else None,
            "failed_selections": sum(1 for s in self._finished.values() if not s["score_ok"]),
            "budget": budget.to_dict(),
        }

    def write_summary(self) -> None:
        write_json(self.summary_path, self.summary())
