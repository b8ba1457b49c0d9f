"""Prompt sets: GenEval's 553 prompts (shipped in the package), a text/JSONL file, or one prompt.

Each item keeps its index in the full set (output folders are named by it, never by the prompt text) and
its record (written to `metadata.jsonl`; for GenEval the original record, so GenEval's evaluator runs
on the output directory unchanged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from reflectionflow.search.errors import SetupError


@dataclass(frozen=True)
class PromptItem:
    index: int
    prompt: str
    record: dict[str, Any] = field(default_factory=dict)


def _from_records(records: list[dict[str, Any]], source: str) -> list[PromptItem]:
    items = []
    for index, record in enumerate(records):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SetupError(f"{source}: record {index} has no non-empty 'prompt' string")
        items.append(PromptItem(index, prompt, record))
    return items


def _parse_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SetupError(f"{source}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise SetupError(f"{source}:{number}: expected a JSON object with a 'prompt' key")
        records.append(record)
    return records


def geneval_prompts() -> list[PromptItem]:
    """GenEval's prompts with their original records (tag, include/exclude object specs)."""
    text = (
        resources.files("reflectionflow.assets")
        .joinpath("geneval_metadata.jsonl")
        .read_text(encoding="utf-8")
    )
    return _from_records(_parse_jsonl(text, "geneval_metadata.jsonl"), "geneval_metadata.jsonl")


def file_prompts(path: str) -> list[PromptItem]:
    """`*.jsonl`: one JSON record with a `prompt` key per line; anything else: one prompt per non-empty line."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise SetupError(f"prompt file {str(path)!r} does not exist; set prompts.path=<file>")
    text = source.read_text(encoding="utf-8")
    if source.suffix == ".jsonl":
        items = _from_records(_parse_jsonl(text, str(path)), str(path))
    else:
        items = _from_records(
            [{"prompt": line.strip()} for line in text.splitlines() if line.strip()], str(path)
        )
    if not items:
        raise SetupError(f"no prompts in {path}; set prompts.path=<file>")
    return items


def single_prompt(text: str) -> list[PromptItem]:
    if not isinstance(text, str) or not text.strip():
        raise SetupError("prompt=... must be a non-empty string")
    return [PromptItem(0, text, {"prompt": text})]


def shard(items: list[PromptItem], shard_index: int, num_shards: int) -> list[PromptItem]:
    """Every `num_shards`-th item starting at `shard_index`; indices stay those of the full set."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SetupError(
            f"need 0 <= shard_index < num_shards, got shard_index={shard_index} num_shards={num_shards}"
        )
    return items[shard_index::num_shards]
