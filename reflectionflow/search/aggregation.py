"""Sweep aggregation: every job's result file -> a scaling table (markdown + CSV) and plot (PNG).

Runs as `python -m reflectionflow.aggregate <multirun dir>` and, at the end of every multirun of the infer
app, through `AggregateCallback` (`hydra.callbacks` in conf/infer.yaml). Writes `scaling.md`,
`scaling.csv` and `scaling.png` into the directory: one table row per job (with the standard errors of
its score and accuracy over its prompts), and verifier score (and accuracy, when a checker ran) against
images and NFE per prompt, one line per preset through its best job at each budget, with error bars.
The best job is chosen on the same prompts it is scored on (the plot says so): an optimistic pick when a
budget has several (width, depth) jobs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter
from omegaconf import DictConfig

from reflectionflow.search.errors import SetupError
from reflectionflow.search.result_file import read_results
from reflectionflow.search.run_dir import atomic_write
from reflectionflow.search.wandb_logging import log_scaling, settings_from_results

log = logging.getLogger(__name__)
# Overrides that place a job on the x axis or name its preset, rather than make it a different series.
AXIS_KEYS = {"search", "search.width", "search.depth", "search.budget", "search.budgets", "shard_index", "num_shards"}
TABLE, CSV, PLOT = "scaling.md", "scaling.csv", "scaling.png"
PANEL_INCHES, DPI = (5.0, 4.0), 100


@dataclass(frozen=True)
class JobRow:
    """One job of a sweep, as its result file reports it: costs are means per prompt (`per_prompt_budget`),
    `budget` is the search.budget it was matched to, `job_seconds` its wall time."""

    job: str
    series: str
    preset: str
    width: int
    depth: int
    budget: int | None
    prompts: int
    mean_score: float | None
    accuracy: float | None
    score_se: float | None  # standard errors of the mean over the job's prompts
    accuracy_se: float | None
    images: float
    nfe: float
    verifier_calls: float
    reflector_calls: float
    refiner_calls: float
    tokens_in: float
    tokens_out: float
    job_seconds: float


COLUMNS = [f.name for f in fields(JobRow)]
STANDARD_ERROR = {"mean_score": "score_se", "accuracy": "accuracy_se"}


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean of `values`: sample standard deviation / sqrt(n); None below two."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _overrides(result: Mapping[str, Any]) -> dict[str, str]:
    pairs = (o.split("=", 1) for o in result["job"]["overrides"] if "=" in o)
    return {key.lstrip("+~"): value for key, value in pairs if key.lstrip("+~") not in AXIS_KEYS}


def _job_name(root: Path, path: Path) -> str:
    folder = path.parent.relative_to(root).as_posix()
    name = path.parent.name if folder == "." else folder
    return name + path.name.removeprefix("result").removesuffix(".json")


def _superseded(found: Sequence[tuple[Path, dict[str, Any]]]) -> set[tuple[Path, int]]:
    """(dir, shard index) of shard results that a merged result in the same directory replaces."""
    return {
        (Path(m["dir"]).resolve(), m["shard"]["index"])
        for path, result in found
        for m in result.get("merged_from", [])
        if Path(m["dir"]).resolve() == path.parent.resolve()
    }


def load_rows(root: str | os.PathLike) -> tuple[list[JobRow], list[dict[str, Any]]]:
    """Rows of every job under `root` with finished prompts (sorted by series, images, width, depth),
    and the result files they come from, in the same order."""
    root = Path(root)
    found = read_results(root)
    superseded = _superseded(found)
    kept = []
    for path, result in found:
        if (path.parent.resolve(), result["shard"]["index"]) in superseded and "merged_from" not in result:
            continue
        if not result["prompts"]:
            log.warning("%s has no finished prompts; left out of the table", path)
            continue
        if result.get("budgets"):  # a nested-budget search: one row per budget read off it
            kept += [(path, nested, True) for nested in result["budgets"]]
        else:
            kept.append((path, result, False))
    overrides = [_overrides(result) for _, result, _ in kept]
    keys = sorted({key for o in overrides for key in o})
    varying = [key for key in keys if len({o.get(key) for o in overrides}) > 1]
    rows = []
    for (path, result, nested), job_overrides in zip(kept, overrides, strict=True):
        label = " ".join([result["preset"], *(f"{k}={job_overrides.get(k, '-')}" for k in varying)])
        cost = result["per_prompt_budget"]
        verdicts = [float(o["correct"]) for o in result["per_prompt"] if o["correct"] is not None]
        rows.append(
            JobRow(
                job=_job_name(root, path) + (f"@{result['search_budget']}" if nested else ""),
                series=label,
                preset=result["preset"],
                width=result["width"],
                depth=result["depth"],
                budget=result["search_budget"],
                prompts=result["prompts"],
                mean_score=result["mean_score"],
                accuracy=result["accuracy"],
                score_se=standard_error([o["score"] for o in result["per_prompt"]]),
                accuracy_se=standard_error(verdicts),
                images=cost["images"],
                nfe=cost["nfe"],
                verifier_calls=cost["verifier_calls"],
                reflector_calls=cost["reflector_calls"],
                refiner_calls=cost["refiner_calls"],
                tokens_in=cost["tokens_in"],
                tokens_out=cost["tokens_out"],
                job_seconds=result["budget"]["seconds"]["job_total"],
            )
        )
    order = sorted(
        range(len(rows)), key=lambda i: (rows[i].series, rows[i].images, rows[i].width, rows[i].depth)
    )
    return [rows[i] for i in order], [kept[i][1] for i in order]


def cell(value: Any) -> str:
    """A markdown table cell: 4 decimals for fractions, integers as integers, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[JobRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(getattr(row, c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[JobRow]) -> str:
    """Full precision (Python's shortest round-tripping float text), empty cell for missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if getattr(row, c) is None else getattr(row, c) for c in COLUMNS])
    return buffer.getvalue()


def _series(rows: Sequence[JobRow]) -> dict[str, list[JobRow]]:
    grouped: dict[str, list[JobRow]] = {}
    for row in rows:
        grouped.setdefault(row.series, []).append(row)
    return grouped


def best_per_budget(points: Sequence[tuple]) -> list[tuple]:
    """The point of highest y at each x (the first of equals), by x: the preset's best (width, depth) at
    each budget. Points are (x, y, ...): what follows y travels with it (its standard error)."""
    best: dict[float, tuple] = {}
    for point in points:
        if point[0] not in best or point[1] > best[point[0]][1]:
            best[point[0]] = tuple(point)
    return [best[x] for x in sorted(best)]


def _x(row: JobRow, key: str) -> float:
    return row.budget if key == "images" and row.budget is not None else getattr(row, key)


AXES = [("images", "images per prompt"), ("nfe", "NFE per prompt")]


def scaling_lines(
    rows: Sequence[JobRow], metric: str, x_key: str
) -> dict[str, list[tuple[float, float, float | None]]]:
    """Per series, its best job at each x as (x, metric, standard error): the plot's lines and W&B's.

    The images axis is the job's `search.budget` when it has one (a search stopped early at
    `search.stop_score` selects what its full budget would, so it belongs at that budget); the NFE axis
    is what the jobs actually spent."""
    lines = {}
    for series, members in _series(rows).items():
        points = [(_x(r, x_key), getattr(r, metric), getattr(r, STANDARD_ERROR[metric]))
                  for r in members if getattr(r, metric) is not None]
        if points:
            lines[series] = best_per_budget(points)
    return lines


def readable_ticks(values: Sequence[float], factor: float = 1.3) -> list[float]:
    """The distinct `values`, leaving out any within `factor` of the previous tick kept (log axis)."""
    ticks: list[float] = []
    for value in sorted(set(values)):
        if not ticks or value >= ticks[-1] * factor:
            ticks.append(value)
    return ticks


def plotted_metrics(rows: Sequence[JobRow]) -> list[str]:
    """The verifier score, and accuracy when any job was checked."""
    return ["mean_score"] + (["accuracy"] if any(r.accuracy is not None for r in rows) else [])


def _prompt_count(rows: Sequence[JobRow]) -> str:
    counts = sorted({row.prompts for row in rows})
    return f"{counts[0]} prompts" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} prompts per job"


def legend_label(series: str, longest: int = 40) -> str:
    """A series name for the legend: an override's path value longer than `longest` keeps its last two
    parts (`weights.lora_path=.../shapes_corrector-d4e0/lora`), so a path does not squeeze the panels;
    the tables keep the full name."""
    def short(word: str) -> str:
        key, _, value = word.partition("=")
        if len(value) <= longest or "/" not in value:
            return word
        return f"{key}=.../" + "/".join(value.rstrip("/").split("/")[-2:])

    return " ".join(short(word) for word in series.split(" "))


def plot_scaling(rows: Sequence[JobRow]) -> Figure:
    """Score (and accuracy, when any job has it) vs images and vs NFE per prompt: a dot per job, a line
    per preset through its best job at each budget with +-1 standard-error bars over the prompts, ticks at
    the budgets and NFE the jobs have. A bare `Figure`: no pyplot state, no GUI backend."""
    metrics = plotted_metrics(rows)
    width, height = PANEL_INCHES
    figure = Figure(figsize=(2 * width, len(metrics) * height), dpi=DPI, layout="constrained")
    axes = figure.subplots(len(metrics), 2, squeeze=False)
    grouped = _series(rows)
    colors = {series: f"C{i % 10}" for i, series in enumerate(grouped)}
    for row_index, metric in enumerate(metrics):
        for column, (x_key, x_label) in enumerate(AXES):
            ax = axes[row_index][column]
            for series, line in scaling_lines(rows, metric, x_key).items():
                color = colors[series]
                members = [r for r in grouped[series] if getattr(r, metric) is not None]
                dots = [(_x(r, x_key), getattr(r, metric)) for r in members]
                ax.scatter(*zip(*dots, strict=True), color=color, alpha=0.35, s=18)
                xs, ys, _ = zip(*line, strict=True)
                ax.plot(xs, ys, color=color, marker="o", label=legend_label(series))
                bars = [(x, y, e) for x, y, e in line if e is not None]  # one prompt: no bar
                ax.vlines([x for x, _, _ in bars], [y - e for _, y, e in bars], [y + e for _, y, e in bars],
                          color=color, linewidth=1.5, alpha=0.8)
            ticks = readable_ticks([_x(r, x_key) for r in rows])
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{round(value, 1):g}"))  # 31.7, 1792
            ax.minorticks_off()
            ax.set_xlabel(x_label)
            ax.set_ylabel("verifier score" if metric == "mean_score" else "accuracy")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small", title="best job per budget", title_fontsize="small")
    figure.suptitle(
        f"{_prompt_count(rows)}. Dots: every job; lines: each preset's best job at each budget, chosen on "
        "these same prompts; bars: +-1 standard error over the prompts",
        fontsize="small",
    )
    return figure


def aggregate(root: str | os.PathLike, log_wandb: bool = False) -> dict[str, Path]:
    """Write the table (markdown, CSV) and the plot for every job under `root`; with `log_wandb`, log them
    into the W&B project and group the jobs logged to."""
    root = Path(root)
    rows, results = load_rows(root)
    if not rows:
        raise SetupError(f"no result files with finished prompts under {root}")
    wandb = settings_from_results(results) if log_wandb else None
    if log_wandb and wandb is None:
        raise SetupError(
            f"no job under {root} logged to W&B (wandb.enabled=true), so there is no group to log to"
        )
    paths = {"table": root / TABLE, "csv": root / CSV, "plot": root / PLOT}
    atomic_write(paths["table"], markdown_table(rows).encode())
    atomic_write(paths["csv"], csv_table(rows).encode())
    buffer = io.BytesIO()
    plot_scaling(rows).savefig(buffer, format="png")
    atomic_write(paths["plot"], buffer.getvalue())
    if wandb is not None:
        log_scaling(
            wandb,
            root=root,
            png=paths["plot"],
            columns=COLUMNS,
            rows=[[getattr(row, c) for c in COLUMNS] for row in rows],
            lines={(metric, x_key): scaling_lines(rows, metric, x_key)
                   for metric in plotted_metrics(rows) for x_key, _ in AXES},
        )
    log.info("%d jobs -> %s, %s, %s", len(rows), *paths.values())
    return paths


class AggregateCallback(Callback):
    """Aggregates a multirun when it ends: the table and plot land in `hydra.sweep.dir` (and in W&B when
    the jobs logged there)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            aggregate(config.hydra.sweep.dir, log_wandb=bool(config.get("wandb", {}).get("enabled")))
        except SetupError as err:
            log.warning("nothing to aggregate: %s", err)
