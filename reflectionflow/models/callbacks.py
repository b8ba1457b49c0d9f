"""Training callbacks: diffusers-format LoRA snapshots, validation panels, data statistics, checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from reflectionflow.models.lora import save_lora
from reflectionflow.sheets import contact_sheet, png_bytes


def _run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def _every(trainer: L.Trainer, every_n_steps: int, state: dict) -> bool:
    """True once per optimizer step that is a multiple of `every_n_steps` (not per micro-batch)."""
    step = trainer.global_step
    if every_n_steps <= 0 or step == 0 or step % every_n_steps or state.get("last") == step:
        return False
    state["last"] = step
    return True


class EveryNSteps(L.Callback, ABC):
    """Runs `run(trainer, pl_module)` every N optimizer steps and once more when training ends (unless it
    just ran at that step), so a run's last state is always measured."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._state: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _every(trainer, self.every_n_steps, self._state):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._state.get("last") != trainer.global_step:
            self.run(trainer, pl_module)

    @abstractmethod
    def run(self, trainer, pl_module) -> None:
        """The periodic work."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written to a temporary name and renamed into place: a run killed mid-write leaves
    the previous checkpoint intact instead of a truncated one, so `resume=true` always finds a good file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` every N optimizer steps, plus one when training ends, so a finished
    run can be extended (`resume=true trainer.max_steps=...`) from exactly where it stopped.

    With `save_last="link"`, `last.ckpt` is a symbolic link to the newest checkpoint instead of a second
    copy of it, replaced atomically: a run killed while relinking still has a `last.ckpt` to resume from."""

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            if link.is_dir() and not link.is_symlink():  # a DeepSpeed directory from an older run
                shutil.rmtree(link)
            partial = link.with_name(f".{link.name}.partial")
            partial.unlink(missing_ok=True)
            partial.symlink_to(os.path.relpath(filepath, link.parent))
            os.replace(partial, link)
        trainer.strategy.barrier()

    def load_state_dict(self, state_dict: dict) -> None:
        """A moved run directory's state with its paths re-based onto the new `dirpath`: Lightning drops the
        state instead, then writes `last-v1.ckpt` beside `last.ckpt` and never prunes the older files."""
        previous = state_dict.get("dirpath")
        if previous and self.dirpath and previous != self.dirpath:
            state_dict = _rebased(state_dict, previous, self.dirpath)
        super().load_state_dict(state_dict)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._prune(trainer)

    def _prune(self, trainer: L.Trainer) -> None:
        """Keep the newest `save_top_k` step checkpoints on disk, also those the checkpoint state never knew
        (a run killed between writing one checkpoint and removing the oldest)."""
        if self.save_top_k <= 0 or not trainer.is_global_zero:
            return
        steps = step_checkpoints(Path(self.dirpath))
        for path in steps[: max(0, len(steps) - self.save_top_k)]:
            trainer.strategy.remove_checkpoint(path)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


def _rebased(state: dict, old_dir: str, new_dir: str) -> dict:
    """`ModelCheckpoint` state whose paths under `old_dir` point under `new_dir` instead."""

    def moved(path):
        if isinstance(path, str) and path.startswith(old_dir + os.sep):
            return new_dir + path[len(old_dir) :]
        return path

    return {
        key: {moved(p): v for p, v in value.items()} if key == "best_k_models" else moved(value)
        for key, value in state.items()
    } | {"dirpath": new_dir}


# step-N.ckpt, or step-N-vK.ckpt: Lightning's name for a step written again beside the first
_STEP_CHECKPOINT = re.compile(r"step-(\d+)(?:-v(\d+))?\.ckpt")


def step_checkpoints(dirpath: Path) -> list[Path]:
    """The `step-N.ckpt` checkpoints (files, or directories for sharded strategies) of `dirpath`, oldest
    first by the step in their name (atomic writes leave no partial file under that name)."""
    found = [
        ((int(m.group(1)), int(m.group(2) or -1)), path)
        for path in dirpath.glob("step-*.ckpt")
        if (m := _STEP_CHECKPOINT.fullmatch(path.name))
    ]
    return [path for _, path in sorted(found)]


def is_checkpoint(path: Path) -> bool:
    """A whole `torch.save` archive (a zip file), or a directory (a sharded strategy's checkpoint); checked
    without unpickling it."""
    import zipfile

    return path.is_dir() or zipfile.is_zipfile(path)


def newest_complete_checkpoint(dirpath: Path) -> Path | None:
    """The checkpoint `resume=true` continues from: the highest step's complete one (`is_checkpoint`), which
    is newer than `last.ckpt` when a run was killed between writing it and relinking `last.ckpt`."""
    for path in reversed(step_checkpoints(dirpath)):
        if is_checkpoint(path):
            return path
    last = dirpath / "last.ckpt"
    return last if last.exists() else None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps of `max_steps` (Lightning's counts the batches of an
    epoch, and a streamed dataset has one endless epoch: `Epoch 0/-2 ... 60/60`); a resumed run starts at
    its step. The bar closes at the last step, before Lightning's closing lines."""

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(desc="train", total=trainer.max_steps if trainer.max_steps > 0 else None,
                    initial=trainer.global_step, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self._leave:  # Lightning's resets the bar to the epoch's batches instead
            self.train_progress_bar = self.init_train_tqdm()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes
            if bar.n == bar.total:
                bar.close()


class LoraSnapshots(L.Callback):
    """Every N optimizer steps and at the end: `<run>/lora/step-NNNNNNN/` (loadable by
    `FluxPipeline.load_lora_weights`), keeping the last K, plus `<run>/lora/final/`."""

    def __init__(self, every_n_steps: int = 500, keep_last: int = 3, dirname: str = "lora"):
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.dirname = dirname
        self._state: dict = {}

    def _save(self, trainer: L.Trainer, module, name: str) -> None:
        state = module.lora_state()  # a collective under FSDP2: every rank calls it
        if trainer.is_global_zero:
            root = _run_dir(trainer) / self.dirname
            save_lora(module.transformer, root / name, module.corrector_settings(), state_dict=state)
            snapshots = sorted(root.glob("step-*"))
            for old in snapshots[: max(0, len(snapshots) - self.keep_last)]:
                shutil.rmtree(old)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _every(trainer, self.every_n_steps, self._state):
            self._save(trainer, pl_module, f"step-{trainer.global_step:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "final")
        if trainer.is_global_zero:
            log_lora_artifact(trainer, _run_dir(trainer) / self.dirname / "final")


def log_lora_artifact(trainer: L.Trainer, lora_dir: Path) -> None:
    """The LoRA directory as a W&B model artifact of each W&B run (`<run name>-lora`, aliases `final` and
    `step-N`, its `reflectionflow.json` as metadata), so a run's weights are found from its page."""
    from reflectionflow.models.settings import SETTINGS_FILE

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            settings = lora_dir / SETTINGS_FILE
            metadata = json.loads(settings.read_text()) if settings.is_file() else {}
            artifact = wandb.Artifact(f"{re.sub(r'[^A-Za-z0-9_.-]', '-', run.name)}-lora", type="model",
                                      metadata=metadata | {"step": trainer.global_step})
            artifact.add_dir(str(lora_dir))
            run.log_artifact(artifact, aliases=["final", f"step-{trainer.global_step}"])


class ValidationPanels(EveryNSteps):
    """Every N steps, correct the datamodule's fixed held-out flawed images with their reflections: one
    sheet per step in `<run>/validation/step-NNNNNNN.png`, a row per sample of `flawed | corrected |
    target` enlarged to `cell` pixels and captioned with the prompt and the reflection (the PNG's text holds
    them whole); in W&B the sheet and a `validation/samples` table (prompt, reflection, the three images)."""

    def __init__(self, every_n_steps: int = 500, num_inference_steps: int = 28, guidance_scale: float = 3.5,
                 seed: int = 0, cell: int = 256):
        super().__init__(every_n_steps)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.cell = cell

    @torch.no_grad()
    def run(self, trainer, pl_module) -> None:
        from reflectionflow.models.pipeline import ReflectionFluxPipeline

        samples = getattr(trainer.datamodule, "validation_samples", lambda: [])()
        if not samples:
            return
        pipe = ReflectionFluxPipeline.with_settings(pl_module.pipe, pl_module.corrector_settings())
        was_training = pl_module.training
        pl_module.eval()
        size = samples[0]["image"].size
        corrected = pipe(
            [s["prompt"] for s in samples],
            image=[s["condition"] for s in samples],
            reflection=[s["reflection"] for s in samples],
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[torch.Generator().manual_seed(self.seed + i) for i in range(len(samples))],
            height=size[1],
            width=size[0],
        )
        pl_module.train(was_training)
        self._log(trainer, samples, corrected)

    @rank_zero_only
    def _log(self, trainer, samples: list[dict], corrected: list[Image.Image]) -> None:
        step = trainer.global_step
        sheet = validation_sheet(samples, corrected, step, self.cell)
        out = _run_dir(trainer) / "validation"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step-{step:07d}.png").write_bytes(png_bytes(sheet))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("validation/panels", [sheet], step=step, caption=[sheet.info["Title"]])
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [[s["prompt"], s["reflection"], wandb.Image(s["condition"]), wandb.Image(c),
                         wandb.Image(s["image"])] for s, c in zip(samples, corrected, strict=True)]
                logger.log_table("validation/samples", columns=list(VALIDATION_COLUMNS), data=rows, step=step)


VALIDATION_COLUMNS = ("prompt", "reflection", "flawed", "corrected", "target")


def validation_sheet(samples: list[dict], corrected: list[Image.Image], step: int, cell: int) -> Image.Image:
    """A row per held-out sample: the flawed image captioned with the prompt, the correction with the
    reflection it followed, the target; all at the target's size."""
    rows = []
    for sample, image in zip(samples, corrected, strict=True):
        size = sample["image"].size
        rows.append([(sample["condition"].convert("RGB").resize(size), f"prompt: {sample['prompt']}"),
                     (image, f"reflection: {sample['reflection'] or '(none)'}"),
                     (sample["image"], "")])
    return contact_sheet(rows, cell=cell, title=f"step {step}: held-out flawed | corrected | target",
                         column_labels=["flawed", "corrected", "target"], max_caption_lines=10)


def samples_batch(samples: list[dict]) -> dict:
    """Validation samples (PIL `image`/`condition`, texts) as one training-style batch in [-1, 1]."""
    def pixels(images) -> torch.Tensor:
        arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0

    batch = {key: [s[key] for s in samples] for key in ("prompt", "reflection", "t5_text")}
    return batch | {"image": pixels(s["image"] for s in samples), "condition": pixels(s["condition"] for s in samples)}


class ValidationMetrics(EveryNSteps):
    """Every N steps on the datamodule's fixed held-out samples: `val/loss` (flow matching with a fixed
    generator, so the curve shows the model, not the draws) and whether the corrector reads its flawed
    image and its reflection (`models.diagnostics.condition_use`: real / shuffled loss ratios, edited vs
    unchanged tokens, at t = 0.3 / 0.6 / 0.9)."""

    def __init__(self, every_n_steps: int = 500, times: tuple[float, ...] = (0.3, 0.6, 0.9), seed: int = 0):
        super().__init__(every_n_steps)
        self.times = tuple(times)
        self.seed = seed

    @torch.no_grad()
    def run(self, trainer, pl_module) -> dict[str, float]:
        from reflectionflow.models.diagnostics import condition_use, flattened

        samples = getattr(trainer.datamodule, "validation_samples", lambda: [])()
        if len(samples) < 2:
            return {}
        hp = pl_module.hparams
        batch = samples_batch(samples)
        was_training = pl_module.training
        pl_module.eval()
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        metrics = {"val/loss": float(pl_module.flow_matching_loss(batch, generator))}
        results = condition_use(pl_module.pipe, pl_module.transformer, batch, pl_module.corrector_settings(),
                                self.times, self.seed, guidance=hp.guidance)
        metrics |= flattened(results)
        pl_module.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return metrics


class DataStats(L.Callback):
    """Logs the current subset weights of the warm-up schedule and the skipped-sample counts per reason."""

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = every_n_steps
        self._state: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _every(trainer, self.every_n_steps, self._state):
            return
        datamodule = trainer.datamodule
        metrics = {}
        if hasattr(datamodule, "subset_weights"):
            metrics.update({f"data/weight_{k}": float(v) for k, v in datamodule.subset_weights(trainer.global_step).items()})
        if hasattr(datamodule, "skipped_counts"):
            metrics.update({f"data/skipped_{k}": float(v) for k, v in datamodule.skipped_counts().items()})
        if metrics:
            pl_module.log_dict(metrics, batch_size=1, reduce_fx="max")


def batch_size(batch: dict) -> int:
    """Samples in a training batch (dicts of per-sample tensors or lists): Lightning's `ThroughputMonitor`
    counts samples with it (`callbacks.throughput`)."""
    first = next(iter(batch.values()))
    return first.shape[0] if hasattr(first, "shape") else len(first)
