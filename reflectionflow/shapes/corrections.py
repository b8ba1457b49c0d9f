"""How a search's corrections fare: the share of the corrector's images the checker passes, per edit type
their reflection asks for, per number of edits, per category and per round, read from the `search.json`
files of finished search jobs.

The corrector's export metric (`metrics.json`) scores fixes of flawed renders; this scores them on the
requests a search really makes, the base model's own failures, whose mix of edits differs (docs/shapes.md).

    python -m reflectionflow.shapes.corrections <job dir> [<job dir> ...]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from reflectionflow.shapes.evaluation import EDIT_TYPES, edit_groups, rates


def corrections(job_dir: Path) -> list[dict]:
    """One record per corrected image of a job (a round >= 1 candidate with a reflection and a verdict):
    its prompt's category, round, edit types, number of edits and whether the checker passed it."""
    records = []
    for path in sorted(Path(job_dir).glob("*/search.json")):
        search = json.loads(path.read_text())
        for candidate in search["candidates"]:
            score = candidate.get("score") or {}
            if candidate["round"] == 0 or not candidate.get("reflection") or not score.get("ok"):
                continue
            kinds, count = edit_groups(candidate["reflection"])
            records.append({"tag": search["tag"], "round": candidate["round"], "kinds": kinds, "edits": count,
                            "correct": bool(score["details"]["correct"])})
    if not records:
        raise ValueError(f"{job_dir} holds no corrected images (a finished reflection search's job directory, "
                         f"with <index>/search.json files, is expected)")
    return records


def groups(record: dict) -> list[str]:
    """The rows a correction counts in."""
    kinds = record["kinds"]
    only = [f"only {kinds[0]}"] if len(kinds) == 1 else []
    return ["all", *kinds, *only, record["edits"], record["tag"], f"round {record['round']}"]


def pass_rates(records: Sequence[dict]) -> dict[str, tuple[float, int]]:
    """(share passed, corrections) per row of `groups`."""
    rows = [groups(record) for record in records]
    shares = rates([record["correct"] for record in records], rows)
    sizes = Counter(name for row in rows for name in row)
    return {name: (share, sizes[name]) for name, share in shares.items()}


def table(jobs: Sequence[tuple[str, dict[str, tuple[float, int]]]]) -> str:
    """A markdown table: a row per edit type, number of edits, category and round; a column per job."""
    order = ["all", *EDIT_TYPES, *(f"only {kind}" for kind in EDIT_TYPES), "1 edit", "2+ edits"]
    rest = sorted({name for _, rates in jobs for name in rates} - set(order), key=lambda n: (n.startswith("round"), n))
    lines = ["| corrections asking for | " + " | ".join(label for label, _ in jobs) + " |",
             "| --- |" + " --- |" * len(jobs)]
    for name in [*order, *rest]:
        if any(name in rates for _, rates in jobs):
            cells = [f"{100 * rates[name][0]:.1f}% ({rates[name][1]})" if name in rates else "-" for _, rates in jobs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", nargs="+", type=Path, help="search job directories (holding <index>/search.json)")
    args = parser.parse_args(argv)
    try:
        jobs = [(str(job), pass_rates(corrections(job))) for job in args.jobs]
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(table(jobs))


if __name__ == "__main__":
    main()
