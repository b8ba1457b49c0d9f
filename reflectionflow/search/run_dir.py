"""A run directory in GenEval's layout: writing it so that a killed run loses at most the prompt in
progress, and reading it back.

    <run>/<00000>/metadata.jsonl         the prompt's record (GenEval's original record for GenEval prompts)
    <run>/<00000>/samples/0000.png       the selected image (what GenEval evaluates)
    <run>/<00000>/candidates/rRR_cCC.png every image the search made (round RR, chain CC)
    <run>/<00000>/search.png             contact sheet: chains x rounds, scores and reflections
    <run>/<00000>/search.json            every candidate's provenance and score, the budget; written last
    <run>/summary.json                   running totals while the job runs (per shard when sharded);
                                         the job's result file (`result_file.write_result`) replaces it

Folder names are prompt indices, never prompt text. A shard's own files carry `shard_suffix`
(`summary.shard-00001-of-00004.json`). Every file is written to a temporary name and renamed into place;
a prompt is finished exactly when its `search.json` exists, and a re-run clears and redoes any unfinished
prompt folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from reflectionflow.search.budget import Budget
from reflectionflow.search.engine import PromptSearch
from reflectionflow.search.search_sheet import search_sheet_png

SEARCH_FILE = "search.json"
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


def write_json(path: Path, data: Any) -> None:
    """`atomic_write` of indented JSON (strict: NaN is an error, not an invalid file)."""
    atomic_write(path, (json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode())


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
