"""Outputs in GenEval's layout, written so that a killed run loses at most the prompt in progress.

    <run>/<00000>/metadata.jsonl         the prompt's record (GenEval's original record for GenEval prompts)
    <run>/<00000>/samples/0000.png       the selected image (what GenEval evaluates)
    <run>/<00000>/candidates/rRR_cCC.png every image the search made (round RR, chain CC)
    <run>/<00000>/search.json            every candidate's provenance and score, the budget; written last
    <run>/summary.json                   run totals over finished prompts (per shard when sharded)

Folder names are prompt indices, never prompt text. Every file is written to a temporary name and
renamed into place; a prompt is finished exactly when its `search.json` exists, and a re-run clears and
redoes any unfinished prompt folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from reflectionflow.search.budget import Budget
from reflectionflow.search.engine import PromptSearch

SEARCH_FILE = "search.json"


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


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class RunWriter:
    """Writes one shard's prompts into a run directory and keeps the run summary current."""

    def __init__(self, run_dir: str | os.PathLike, shard_index: int = 0, num_shards: int = 1):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if num_shards == 1 else f".shard-{shard_index:05d}-of-{num_shards:05d}"
        self.summary_path = self.run_dir / f"summary{suffix}.json"
        for stale in self.run_dir.glob(
            f".{self.summary_path.name}.tmp-*"
        ):  # a killed run's half-written summary
            stale.unlink()
        self._results: dict[int, dict[str, Any]] = {}

    def prompt_dir(self, index: int) -> Path:
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"prompt index must be a non-negative int, got {index!r}")
        return self.run_dir / f"{index:05d}"

    def finished(self, index: int) -> dict[str, Any] | None:
        """The prompt's `search.json` if it was finished (by this or an earlier run), else None."""
        path = self.prompt_dir(index) / SEARCH_FILE
        if not path.is_file():
            return None
        result = json.loads(path.read_text(encoding="utf-8"))
        self._results[index] = result
        return result

    def write(self, search: PromptSearch) -> dict[str, Any]:
        folder = self.prompt_dir(search.item.index)
        with search.budget.timed("write"):
            if folder.exists():  # leftovers of a killed run
                shutil.rmtree(folder)
            atomic_write(
                folder / "metadata.jsonl", (json.dumps(search.item.record, ensure_ascii=False) + "\n").encode()
            )
            for candidate in search.candidates:
                atomic_write(folder / candidate.file, _png_bytes(candidate.image))
            atomic_write(folder / "samples" / "0000.png", _png_bytes(search.best.image))
        result = {
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
        atomic_write(folder / SEARCH_FILE, _json_bytes(result))
        self._results[search.item.index] = result
        self.write_summary()
        return result

    def summary(self) -> dict[str, Any]:
        """Totals over the finished prompts this writer has seen."""
        budget = Budget()
        for result in self._results.values():
            budget.add(Budget.from_dict(result["budget"]))
        scores = [result["score"] for result in self._results.values()]
        return {
            "prompts": len(scores),
            "mean_score": sum(scores) / len(scores) if scores else None,
            "failed_selections": sum(1 for result in self._results.values() if not result["score_ok"]),
            "budget": budget.to_dict(),
        }

    def write_summary(self) -> None:
        atomic_write(self.summary_path, _json_bytes(self.summary()))
