"""What a training run directory keeps across launches: CSV rows, the W&B run, each launch's config."""

import csv

from conftest import compose_app
from hydra.utils import instantiate

from reflectionflow.models.run_history import ResumableCSVLogger, RunDirWandbLogger


def rows(metrics_csv) -> list[dict]:
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def test_a_resumed_csv_logger_appends_to_the_rows_of_the_first_launch(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="logs", version="")
    for step in (0, 1):
        first.log_metrics({"train/loss": 1.0 + step}, step=step)
    first.finalize("success")
    resumed = ResumableCSVLogger(tmp_path, name="logs", version="", append=True)
    resumed.log_metrics({"train/loss": 3.0}, step=2)
    resumed.log_metrics({"train/loss": 4.0, "val/loss": 5.0}, step=3)  # a new column: the header grows
    resumed.finalize("success")
    logged = rows(tmp_path / "logs" / "metrics.csv")
    assert [(r["step"], r["train/loss"]) for r in logged] == [
        ("0", "1.0"),
        ("1", "2.0"),
        ("2", "3.0"),
        ("3", "4.0"),
    ]
    assert logged[3]["val/loss"] == "5.0" and logged[0]["val/loss"] == ""


def test_rows_reach_the_disk_with_each_checkpoint(tmp_path):
    """A run killed after a checkpoint keeps the rows up to it (Lightning flushes every 100 steps)."""
    logger = ResumableCSVLogger(tmp_path, name="logs", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.after_save_checkpoint(None)
    assert [r["step"] for r in rows(tmp_path / "logs" / "metrics.csv")] == ["0"]


def test_every_launch_reopens_the_run_directory_s_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    ids = []
    for _ in range(2):
        logger = RunDirWandbLogger(save_dir=str(tmp_path), project="reflectionflow")
        ids.append(logger.experiment.id)
        wandb.finish()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert ids[0] == ids[1] == (tmp_path / "wandb" / "run-id").read_text()
    assert runs and all(name.endswith(f"-{ids[0]}") for name in runs)  # offline-run-<time>-<id>


def test_a_launch_into_a_run_directory_keeps_the_earlier_launch_s_hydra_files(tmp_path):
    """Hydra overwrites `.hydra/*.yaml` with each launch; the train config's callback keeps the earlier ones."""
    saved = tmp_path / ".hydra"
    for launch in (1, 2, 3):
        cfg = compose_app("train", f"hydra.run.dir={tmp_path}", f"seed={launch}", hydra_node=True)
        for callback in cfg.hydra.callbacks.values():
            instantiate(callback).on_run_start(config=cfg)
        saved.mkdir(exist_ok=True)  # what Hydra writes next
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (saved / name).write_text(f"seed: {launch}\n")
    assert (saved / "config.yaml").read_text() == "seed: 3\n"
    for launch in (1, 2):
        kept = saved / f"launch-{launch}"
        assert sorted(p.name for p in kept.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        assert (kept / "overrides.yaml").read_text() == f"seed: {launch}\n"
