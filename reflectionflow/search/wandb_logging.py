"""Weights & Biases for search jobs and sweeps (`wandb.enabled=true`; `WANDB_MODE=offline` works offline).

One run per job (job_type `search`), grouped by sweep: the live score and spending after every prompt, the
result file's numbers in the run summary, and a table with one row per prompt: the selected image and, per
round, a strip of every chain's image with their scores, reflections and prompts. Aggregation logs the
scaling plot, its panels as native line plots, and the table into one more run of the group (job_type
`aggregate`). Configs are logged with
secrets redacted; API keys are never in the config in the first place (only their variables' names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from reflectionflow.config import redact_secrets, redacted_argv
from reflectionflow.search.run_dir import SELECTED_FILE, prompt_dir, read_search


@dataclass(frozen=True)
class WandbSettings:
    """Where runs go. `group` None: the sweep's directory name in a multirun, no group for a single run.
    `mode` None leaves it to `WANDB_MODE` (online by default)."""

    project: str = "reflectionflow"
    entity: str | None = None
    group: str | None = None
    mode: str | None = None
    tags: Sequence[str] = field(default_factory=tuple)
    thumbnail_size: int = 128

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tags": list(self.tags)}


def start_run(settings: WandbSettings, *, name: str, job_type: str, config: Mapping[str, Any], run_dir: Path):
    """`wandb.init` with the config's secrets redacted, and the command line's too: W&B records
    `sys.argv` as run metadata, so it sees the overrides with secret-looking values replaced."""
    import wandb

    with redacted_argv():
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            name=name,
            job_type=job_type,
            dir=str(run_dir),
            config=redact_secrets(dict(config)),
            mode=settings.mode,
            tags=list(settings.tags),
            reinit="finish_previous",
        )


def _thumbnail(path: Path, size: int) -> Image.Image:
    with Image.open(path) as image:
        thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    return thumb


def _strip(images: Sequence[Image.Image]) -> Image.Image:
    strip = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    return strip


def prompt_table(run_dir: Path, per_prompt: Sequence[Mapping[str, Any]], rounds: int, thumbnail_size: int):
    """A `wandb.Table`: one row per prompt, with the selected image and, per round, its chains' images side
    by side, their scores, the reflections and prompts each of those images was generated from."""
    import wandb

    columns = ["index", "tag", "prompt", "selected", "score", "correct", "selected round", "selected chain"]
    for r in range(rounds):
        columns += [f"round {r}", f"round {r} scores", f"round {r} reflections", f"round {r} prompts"]
    table = wandb.Table(columns=columns)
    for outcome in per_prompt:
        folder = prompt_dir(run_dir, outcome["index"])
        search = read_search(run_dir, outcome["index"])
        row = [
            outcome["index"],
            outcome["tag"],
            search["prompt"],
            wandb.Image(_thumbnail(folder / SELECTED_FILE, thumbnail_size)),
            outcome["score"],
            outcome["correct"],
            search["selected"]["round"],
            search["selected"]["chain"],
        ]
        for r in range(rounds):
            chains = sorted((c for c in search["candidates"] if c["round"] == r), key=lambda c: c["chain"])
            scores = " | ".join(f"c{c['chain']} {c['score']['value']:.3f}" for c in chains)
            strip = _strip([_thumbnail(folder / c["file"], thumbnail_size) for c in chains])
            row += [
                wandb.Image(strip, caption=scores),
                scores,
                "\n".join(f"c{c['chain']}: {c['reflection']}" for c in chains if c["reflection"]),
                "\n".join(f"c{c['chain']}: {c['prompt']}" for c in chains),
            ]
        table.add_data(*row)
    return table


class JobTracker:
    """The W&B run of one search job."""

    def __init__(self, settings: WandbSettings, *, name: str, config: Mapping[str, Any], run_dir: Path):
        self.settings = settings
        self.run = start_run(settings, name=name, job_type="search", config=config, run_dir=run_dir)

    def log_prompt(self, search: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        """Live curves: this prompt's score, the running mean and the spending so far."""
        spent = summary["budget"]
        self.run.log(
            {
                "prompt/index": search["index"],
                "prompt/score": search["score"],
                "run/prompts": summary["prompts"],
                "run/mean_score": summary["mean_score"],
                "run/images": spent["images"],
                "run/nfe": spent["nfe"],
            }
        )

    def log_result(self, run_dir: Path, result: Mapping[str, Any]) -> None:
        cost = result["per_prompt_budget"] or {}
        self.run.summary.update(
            {
                key: result[key]
                for key in ("preset", "width", "depth", "search_budget", "prompts", "mean_score", "accuracy")
            }
            | {f"per_prompt/{key}": value for key, value in cost.items()}
            | {f"tags/{tag}": scores for tag, scores in result["tags"].items()}
            | {"seconds": result["budget"]["seconds"]}
        )
        table = prompt_table(run_dir, result["per_prompt"], result["depth"] + 1, self.settings.thumbnail_size)
        self.run.log({"per_prompt": table})

    def describe(self) -> dict[str, Any]:
        """Where the run went, for the job's result file (aggregation logs into the same project/group)."""
        return {"settings": self.settings.to_dict(), "run": {"id": self.run.id, "name": self.run.name}}

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def log_scaling(
    settings: WandbSettings,
    *,
    root: Path,
    png: Path,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    lines: Mapping[tuple[str, str], Mapping[str, Sequence[tuple[float, float, float | None]]]],
) -> None:
    """The sweep's scaling plot and table as one `aggregate` run in the sweep's group, and each panel of
    the plot as a native W&B line plot (`scaling/<metric>_vs_<axis>`: a line per preset through its best
    job at each budget; `lines` as `aggregation.scaling_lines` gives them)."""
    import wandb

    run = start_run(settings, name=f"{root.name}-scaling", job_type="aggregate", config={}, run_dir=root)
    try:
        table = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
        charts = {}
        for (metric, axis), series in lines.items():
            charts[f"scaling/{metric}_vs_{axis}"] = wandb.plot.line_series(
                xs=[[x for x, _, _ in points] for points in series.values()],
                ys=[[y for _, y, _ in points] for points in series.values()],
                keys=list(series),
                title=f"{metric.replace('_', ' ')} vs {axis} per prompt (best job per budget)",
                xname=f"{axis} per prompt",
            )
        run.log({"scaling/plot": wandb.Image(str(png)), "scaling/table": table} | charts)
    finally:
        run.finish()


def settings_from_results(results: Sequence[Mapping[str, Any]]) -> WandbSettings | None:
    """The W&B settings the jobs of a sweep logged with (recorded in their result files), if any."""
    for result in results:
        if result.get("wandb"):
            return WandbSettings(**result["wandb"]["settings"])
    return None
