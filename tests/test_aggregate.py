"""Aggregation of result files into the scaling table and plot, and the aggregate CLI's errors."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import pytest
from matplotlib.collections import LineCollection, PathCollection
from omegaconf import OmegaConf
from PIL import Image

from reflectionflow.aggregate import main as aggregate_cli
from reflectionflow.search.aggregation import (
    COLUMNS,
    AggregateCallback,
    aggregate,
    best_per_budget,
    cell,
    legend_label,
    load_rows,
    plot_scaling,
    readable_ticks,
    scaling_lines,
    standard_error,
)
from reflectionflow.search.budget import Budget, Usage
from reflectionflow.search.result_file import PromptOutcome, job_result, write_result

SCORES = {  # (preset, width, depth, verifier) -> selected scores of the two prompts
    ("noise", 1, 0, "a"): (0.2, 0.4),
    ("noise", 2, 0, "a"): (0.5, 0.7),
    ("noise", 1, 1, "a"): (0.1, 0.3),  # same budget as width 2 depth 0, worse
    ("reflectionflow", 1, 1, "a"): (0.6, 0.9),
    ("reflectionflow", 1, 1, "b"): (0.4, 0.5),
}


def write_job(folder: Path, preset: str, width: int, depth: int, verifier: str, checked: bool) -> dict:
    images = width * (depth + 1)
    scores = SCORES[(preset, width, depth, verifier)]
    outcomes = [
        PromptOutcome(i, "colors", s, True, (s >= 0.5) if checked else None) for i, s in enumerate(scores)
    ]
    budget = Budget(images=2 * images, nfe=2 * images * 28, verifier=Usage(calls=2 * images, tokens_in=300))
    result = job_result(
        job={
            "preset": preset,
            "choices": {"search": preset},
            "overrides": [
                f"search={preset}",
                f"search.width={width}",
                f"search.depth={depth}",
                f"verifier.chat.model={verifier}",
                "generator=flux_tiny",
            ],
        },
        search={"width": width, "depth": depth, "budget": None},
        shard={"index": 0, "count": 1},
        outcomes=outcomes,
        budget=budget,
        job_seconds={"total": 3.25},
    )
    write_result(folder, result)
    return result


@pytest.fixture
def sweep(tmp_path) -> tuple[Path, dict[str, dict]]:
    results = {}
    for number, key in enumerate(SCORES):
        results[str(number)] = write_job(tmp_path / str(number), *key, checked=True)
    return tmp_path, results


def test_rows_equal_the_result_files_and_series_split_on_varying_overrides(sweep):
    root, results = sweep
    rows, ordered = load_rows(root)
    assert len(rows) == len(results)
    assert [results[row.job] for row in rows] == ordered
    for row in rows:
        result = results[row.job]
        assert (row.preset, row.width, row.depth, row.prompts) == (
            result["preset"],
            result["width"],
            result["depth"],
            2,
        )
        assert row.mean_score == result["mean_score"] and row.accuracy == result["accuracy"]
        assert row.images == result["budget"]["images"] / 2 and row.nfe == result["budget"]["nfe"] / 2
        assert row.tokens_in == 300 / 2 and row.job_seconds == 3.25
        # generator=flux_tiny is common to all jobs and search.* places a job on the axes: not in the label
        assert row.series == f"{row.preset} verifier.chat.model={result['job']['overrides'][3].split('=')[1]}"
    assert [(r.series, r.images) for r in rows] == sorted((r.series, r.images) for r in rows)


def test_table_and_plot_hold_the_result_files_numbers(sweep):
    root, results = sweep
    paths = aggregate(root)
    rows, _ = load_rows(root)

    parsed = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [line["job"] for line in parsed] == [row.job for row in rows]
    for line in parsed:
        result = results[line["job"]]
        assert float(line["mean_score"]) == result["mean_score"]
        assert float(line["accuracy"]) == result["accuracy"]
        assert float(line["images"]) == result["per_prompt_budget"]["images"]
        assert float(line["nfe"]) == result["per_prompt_budget"]["nfe"]
        assert int(line["width"]) == result["width"] and line["budget"] == ""

    markdown = paths["table"].read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(COLUMNS) + " |"
    for line, row in zip(markdown[2:], rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        result = results[row.job]
        assert cells[COLUMNS.index("mean_score")] == cell(result["mean_score"])
        assert cells[COLUMNS.index("accuracy")] == cell(result["accuracy"])
        assert cells[COLUMNS.index("nfe")] == cell(result["per_prompt_budget"]["nfe"])

    with Image.open(paths["plot"]) as image:
        image.verify()
    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG" and image.size == (1000, 800)  # 2 x 2 panels: score and accuracy

    figure = plot_scaling(rows)
    (score_images, score_nfe), (accuracy_images, _) = figure.axes[:2], figure.axes[2:]
    series = sorted({row.series for row in rows})
    for ax, x_key, metric in [
        (score_images, "images", "mean_score"),
        (score_nfe, "nfe", "mean_score"),
        (accuracy_images, "images", "accuracy"),
    ]:
        assert [line.get_label() for line in ax.lines] == series
        scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
        for name, dots, line in zip(series, scatters, ax.lines, strict=True):
            points = [
                (r["per_prompt_budget"][x_key], r[metric])
                for r in results.values()
                if " ".join([r["preset"], f"verifier.chat.model={r['job']['overrides'][3].split('=')[1]}"])
                == name
            ]
            assert sorted(map(tuple, dots.get_offsets().tolist())) == sorted(points)
            assert list(zip(*line.get_data(), strict=True)) == best_per_budget(points)


def test_best_per_budget_keeps_the_best_job_at_each_budget():
    assert best_per_budget([(2, 0.4), (1, 0.3), (2, 0.6), (4, 0.5)]) == [(1, 0.3), (2, 0.6), (4, 0.5)]
    assert best_per_budget([(2, 0.4, "a"), (2, 0.6, "b"), (2, 0.6, "c")]) == [(2, 0.6, "b")]  # first of equals


def test_plot_has_standard_errors_from_the_per_prompt_results(sweep):
    root, results = sweep
    rows, ordered = load_rows(root)
    for row, result in zip(rows, ordered, strict=True):
        scores = [o["score"] for o in result["per_prompt"]]
        verdicts = [float(o["correct"]) for o in result["per_prompt"]]
        assert row.score_se == pytest.approx(statistics.stdev(scores) / math.sqrt(len(scores)))
        assert row.accuracy_se == pytest.approx(statistics.stdev(verdicts) / math.sqrt(len(verdicts)))
    assert standard_error([0.5]) is None  # one prompt: no spread to measure

    figure = plot_scaling(rows)
    title = figure.get_suptitle()
    assert title.startswith("2 prompts.") and "chosen on these same prompts" in title
    for ax, (metric, x_key) in zip(figure.axes, [("mean_score", "images"), ("mean_score", "nfe"),
                                                 ("accuracy", "images"), ("accuracy", "nfe")], strict=True):
        lines = scaling_lines(rows, metric, x_key)
        bars = [c for c in ax.collections if isinstance(c, LineCollection)]
        assert len(bars) == len(lines)
        for points, bar in zip(lines.values(), bars, strict=True):
            for (x, y, error), segment in zip(points, bar.get_segments(), strict=True):
                assert segment.flatten().tolist() == pytest.approx([x, y - error, x, y + error])
        assert sorted(ax.get_xticks()) == readable_ticks([getattr(r, x_key) for r in rows])
    noise = next(r for r in rows if (r.preset, r.width, r.depth) == ("noise", 2, 0))
    [noise_line] = [line for series, line in scaling_lines(rows, "mean_score", "images").items()
                    if series.startswith("noise")]
    assert (2, 0.6, noise.score_se) in [tuple(p) for p in noise_line]  # the better of the two 2-image jobs


def test_readable_ticks_leave_out_crowded_values():
    assert readable_ticks([1, 2, 2, 4, 8]) == [1, 2, 4, 8]
    assert readable_ticks([8, 9, 16, 17, 24, 64]) == [8, 16, 24, 64]


def test_plot_without_a_checker_has_one_row_of_panels(tmp_path):
    write_job(tmp_path / "0", "noise", 1, 0, "a", checked=False)
    write_job(tmp_path / "1", "noise", 2, 0, "a", checked=False)
    paths = aggregate(tmp_path)
    with Image.open(paths["plot"]) as image:
        assert image.size == (1000, 400)
    assert "| - |" in paths["table"].read_text()  # accuracy: missing, not 0


def test_merged_shards_count_once(tmp_path):
    shards = []
    for index in range(2):
        result = write_job(tmp_path / "run", "noise", 1, 0, "a", checked=False)
        result["shard"] = {"index": index, "count": 2}
        write_result(tmp_path / "run", result, f".shard-{index:05d}-of-00002")
        shards.append({"dir": str(tmp_path / "run"), "shard": result["shard"]})
    merged = write_job(tmp_path / "run", "noise", 1, 0, "a", checked=False) | {"merged_from": shards}
    write_result(tmp_path / "run", merged)
    rows, results = load_rows(tmp_path)
    assert [row.job for row in rows] == ["run"] and results == [merged]


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"error: no result files with finished prompts under {tmp_path}"):
        aggregate_cli([str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        aggregate_cli(["--merge", str(tmp_path)])
    assert exit_info.value.code == 2 and "--merge and --out go together" in capsys.readouterr().err
    write_job(tmp_path / "0", "noise", 1, 0, "a", checked=False)
    with pytest.raises(SystemExit, match=f"error: no job under {tmp_path} logged to W&B"):
        aggregate_cli([str(tmp_path), "--wandb"])


def test_callback_skips_a_sweep_without_results(tmp_path, caplog):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    AggregateCallback().on_multirun_end(config)
    assert "nothing to aggregate: no result files" in caplog.text and not list(tmp_path.iterdir())


def test_legend_labels_shorten_long_paths_only():
    long = "reflectionflow weights.lora_path=/root/.cache/reflectionflow/recipes/shapes_corrector-d4e03e952147/lora"
    assert legend_label(long) == "reflectionflow weights.lora_path=.../shapes_corrector-d4e03e952147/lora"
    assert legend_label("noise weights.lora_path=-") == "noise weights.lora_path=-"
    assert legend_label("noise generator.true_cfg_scale=2.0") == "noise generator.true_cfg_scale=2.0"
