"""Reflection tuning: `python -m reflectionflow.train experiment=genref` (or `experiment=tiny` on a CPU).

Composes `reflectionflow/conf/train/train.yaml`, resolves `recipe://` references (training missing recipes
first), checks the cheap things (strategy, model path, shards) so bad input fails in one line before any
model loads, then builds everything with `hydra.utils.instantiate` and runs a Lightning `Trainer.fit`.
`resume=true` continues from the newest complete checkpoint in `<run dir>/checkpoints/`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L  # imported before Hydra's logging config, which takes off Lightning's own handlers
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reflectionflow.config import (
    ConfigError,
    check_secret_interpolations,
    check_top_level_keys,
    redact_secrets,
    redacted_argv,
)
from reflectionflow.console import quiet_third_party, shown_path
from reflectionflow.recipes import RecipeError, is_built, mark_built, product_dir, resolve_references

log = logging.getLogger(__name__)


def run_name(run_dir: str) -> str:
    """A run's name from its directory: the directory's name, with the sweep's for a multirun job (whose
    directory is its job number)."""
    path = Path(run_dir)
    return f"{path.parent.name}-{path.name}" if path.name.isdigit() else path.name


OmegaConf.register_new_resolver("rf.run_name", run_name, replace=True)  # conf/train/logger/wandb.yaml

_GPU_ONLY_STRATEGIES = ("deepspeed",)
_FSDP_STRATEGIES = ("fsdp2strategy", "modelparallelstrategy", "fsdp", "fsdpstrategy")


def _deepspeed_stage(strategy) -> int:
    """The ZeRO stage of a DeepSpeed strategy given as a name (`deepspeed_stage_3_offload`) or an object."""
    if isinstance(strategy, DictConfig | dict):
        return int(strategy.get("stage", 2))
    digits = [part for part in str(strategy).split("_") if part.isdigit()]
    return int(digits[0]) if digits else 2


def _strategy_name(cfg: DictConfig) -> str:
    strategy = cfg.trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig | dict):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1].lower()
    return str(strategy).lower()


def check_config(cfg: DictConfig) -> None:
    """Fail fast, in one line each, on what would otherwise fail deep inside a run."""
    from reflectionflow.models.loading import resolve_model_path

    strategy = _strategy_name(cfg)
    if isinstance(cfg.trainer.get("strategy", "auto"), str):
        from lightning.pytorch.strategies import StrategyRegistry

        known = ["auto", *StrategyRegistry.available_strategies()]
        if strategy not in known:
            raise ConfigError(f"trainer.strategy={strategy} is not a Lightning strategy; use one of: {', '.join(known)}")
    if "deepspeed" in strategy and _deepspeed_stage(cfg.trainer.strategy) == 3:
        raise ConfigError(
            "DeepSpeed ZeRO-3 is not supported: Lightning builds the model inside deepspeed.zero.Init, which "
            "partitions the frozen text encoders and VAE that no engine manages; use trainer=fsdp (FSDP2 shards "
            "the transformer's weights)"
        )
    optimizer = str(cfg.model.get("optimizer", {}).get("_target_", "")) if cfg.model.get("optimizer") else ""
    if optimizer.startswith("bitsandbytes.") and strategy in _FSDP_STRATEGIES:
        raise ConfigError(
            f"optimizer {optimizer} with trainer=fsdp: bitsandbytes' 8-bit states do not support FSDP2's DTensor "
            "shards; use trainer=ddp with it, or optimizer=prodigy or adamw with trainer=fsdp"
        )
    if any(name in strategy for name in _GPU_ONLY_STRATEGIES):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer={strategy}: DeepSpeed runs on CUDA GPUs only and this machine has none; "
                "use trainer=ddp or trainer=fsdp here"
            )
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("trainer=deepspeed needs DeepSpeed: pip install 'reflectionflow[deepspeed]'") from None
    text_callbacks = [f"callbacks.{name}=null" for name in ("validation", "validation_metrics")
                      if cfg.get("callbacks", {}).get(name) is not None]
    if cfg.data.get("text_embeddings") and text_callbacks:
        raise ConfigError(
            "data.text_embeddings: the text encoders are not loaded, and the validation panels and metrics "
            f"encode new texts; set {' '.join(text_callbacks)}"
        )
    if cfg.model.get("path"):
        resolve_model_path(cfg.model.path, "model.path")
    if cfg.get("ckpt_path"):
        check_checkpoint_file(Path(cfg.ckpt_path))


def check_checkpoint_file(path: Path) -> None:
    """`ckpt_path` exists and is a checkpoint (`callbacks.is_checkpoint`)."""
    from reflectionflow.models.callbacks import is_checkpoint

    if not path.exists():
        raise ConfigError(f"ckpt_path={path} does not exist")
    if not is_checkpoint(path):
        raise ConfigError(f"ckpt_path={path} is not a Lightning checkpoint (not a torch.save archive)")


def check_text_embedding_settings(cfg: DictConfig, settings: dict) -> None:
    """Precomputed text embeddings (`data.text_embeddings`) must come from the trained model's encoders, at
    its T5 length and weight dtype, or training would see other embeddings than inference."""
    wanted = {"model": cfg.model.get("path"), "max_sequence_length": cfg.model.get("max_sequence_length"),
              "dtype": cfg.model.get("weight_dtype")}
    for key, written in settings.items():
        if wanted[key] is not None and str(written) != str(wanted[key]):
            raise ConfigError(
                f"data.text_embeddings={cfg.data.text_embeddings} were written with {key}={written}, but the run "
                f"trains with {wanted[key]}; write them again with the run's model.{key.replace('dtype', 'weight_dtype')}"
            )


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """`ckpt_path=...` as given, or with `resume=true` the run directory's newest complete checkpoint."""
    from reflectionflow.models.callbacks import newest_complete_checkpoint

    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)  # checked by check_config
    if cfg.get("resume"):
        newest = newest_complete_checkpoint(run_dir / "checkpoints")
        if newest is not None:
            return str(newest)
        log.warning("resume=true but %s holds no checkpoint: starting from scratch", run_dir / "checkpoints")
    return None


def train(cfg: DictConfig, extra_callbacks=()):
    """Run one training job; returns the fitted Lightning `Trainer` (`trainer.lightning_module`), or None
    when the run is a recipe whose product is already cached.

    `extra_callbacks` are appended to the configured ones (programmatic use: benchmarks, notebooks).
    """
    check_secret_interpolations(cfg)
    check_top_level_keys(cfg, "train")
    resolve_references(cfg)  # recipe://<name> -> the product's path, trained first if missing
    check_config(cfg)
    product = product_dir(cfg)  # recipes (`recipe:` node): a cached product skips training
    if product is not None and is_built(product):
        log.info("recipe %s: reusing %s", cfg.recipe.name, product)
        return None
    run_dir = Path(cfg.paths.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "check"):
        datamodule.check()  # shard patterns / URLs, before any model loads
    check_text_embedding_settings(cfg, getattr(datamodule, "text_embedding_settings", {}))
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    callbacks += list(extra_callbacks)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir))
    with redacted_argv():  # W&B's run starts here and records the command line
        for logger in trainer.loggers:
            logger.log_hyperparams(redact_secrets(OmegaConf.to_container(cfg, resolve=True)))
    trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint_to_resume(cfg, run_dir))
    if product is not None and trainer.is_global_zero:
        model.export(product)
        mark_built(product)
    if trainer.is_global_zero:
        log.info(closing_block(trainer, run_dir, product))
    return trainer


def closing_block(trainer, run_dir: Path, product: Path | None) -> str:
    """The run's last console lines: where its LoRA, last checkpoint, validation sheets and logs are."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    lines = [f"trained {trainer.global_step} steps into {shown_path(run_dir)}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    places = {"product": product, "LoRA": run_dir / "lora" / "final",
              "checkpoint": last.resolve() if last.exists() else None, "validation": run_dir / "validation"}
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            places["logs"] = Path(logger.log_dir) / "metrics.csv"
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            places["W&B"] = Path(run.dir).parent if run.offline else run.url  # offline: for `wandb sync`
    for label, place in places.items():
        if isinstance(place, str):
            lines.append(f"  {label:<11}{place}")
        elif place is not None and place.exists():
            lines.append(f"  {label:<11}{shown_path(place)}{'/' if place.is_dir() else ''}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf/train", config_name="train")
def main(cfg: DictConfig) -> None:
    from reflectionflow.data.sources import ShardSourceError
    from reflectionflow.models.loading import ModelNotFoundError

    quiet_third_party()
    try:
        train(cfg)
    except (ConfigError, ModelNotFoundError, ShardSourceError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
