"""What a training run directory keeps across launches (`resume=true`): every CSV row, one W&B run and
each launch's Hydra config, where Lightning and Hydra would start them afresh."""

from __future__ import annotations

import csv
import secrets
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

WANDB_RUN_ID_FILE = "run-id"  # in <run dir>/wandb/
LAUNCH_PREFIX = "launch-"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that continues an existing `metrics.csv` under its header (Lightning's
    deletes it)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose rows reach the disk with each checkpoint, so a killed run keeps every row up to its
    last checkpoint; with `append` (the resumed launch) the rows continue the existing `metrics.csv`."""

    def __init__(self, *args: Any, append: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.append = append

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.append:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()


def kept_wandb_run_id(save_dir: str | Path) -> str:
    """The W&B run id stored in `<save_dir>/wandb/run-id`, written by the run's first launch (exclusive
    create: ranks that race read the winner's)."""
    path = Path(save_dir) / "wandb" / WANDB_RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as file:
            file.write(secrets.token_hex(4))  # W&B ids: letters and digits
    except FileExistsError:
        pass
    return path.read_text().strip()


class RunDirWandbLogger(WandbLogger):
    """`WandbLogger` that reopens the run directory's W&B run on every launch (`resume="allow"`), instead of
    starting a new run per launch; an explicit `id` wins."""

    def __init__(self, save_dir: str, id: str | None = None, resume: str = "allow", **kwargs: Any):
        super().__init__(save_dir=save_dir, id=id or kept_wandb_run_id(save_dir), resume=resume, **kwargs)


def keep_previous_launch(output_dir: Path) -> Path | None:
    """Move the files an earlier launch saved in `output_dir` (Hydra's `.hydra/`) to `launch-<N>/` inside
    it, N counting launches from 1, before this launch's files take their place."""
    files = sorted(p for p in output_dir.glob("*.yaml") if p.is_file())
    if not files:
        return None
    number = 1 + len(list(output_dir.glob(f"{LAUNCH_PREFIX}*")))
    kept = output_dir / f"{LAUNCH_PREFIX}{number}"
    kept.mkdir()
    for path in files:
        shutil.move(path, kept / path.name)
    return kept


class LaunchConfigs(Callback):
    """Hydra callback (`hydra.callbacks` in conf/train/train.yaml): a launch into an existing run directory
    first keeps the earlier launch's `.hydra/{config,hydra,overrides}.yaml` as `.hydra/launch-<N>/`, so
    `.hydra/` holds the latest launch and `launch-1/`, `launch-2/`, ... the ones before it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is not None:
            keep_previous_launch(Path(config.hydra.run.dir) / subdir)
