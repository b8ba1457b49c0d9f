"""Reflection tuning as a LightningModule: LoRA on the FLUX transformer, flow matching on target tokens.

Frozen VAE and text encoders stay outside the module's parameters (not checkpointed, not wrapped by
DDP/FSDP); the transformer is registered so strategies see it, but only its LoRA weights train and only
they go into checkpoints. Every random draw of a step (noise, timestep, VAE sample) comes from a generator
seeded by (seed, global step, rank, micro-batch), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from reflectionflow.config import ConfigError, check_option
from reflectionflow.models.corrector import (
    ATTENTION_MODES,
    CONDITION_POSITIONS,
    condition_ids,
    corrector_forward,
    dead_end_lora_parameters,
    latent_ids,
)
from reflectionflow.models.flow_matching import flow_matching_loss
from reflectionflow.models.latent_cache import LatentCache
from reflectionflow.models.lora import ADAPTER_NAME, add_lora, lora_state_dict
from reflectionflow.models.optim import build_optimizers, effective_lr
from reflectionflow.models.pipeline import encode_images, quiet_prompt_truncation
from reflectionflow.models.settings import CorrectorSettings


def shard_transformer(transformer, mesh) -> None:
    """FSDP2 for ModelParallelStrategy: one `fully_shard` unit per block, then the root (the embedders and
    output layers); `corrector_forward` runs inside each unit's hooks."""
    from torch.distributed.fsdp import fully_shard

    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)


class ReflectionTuningModule(L.LightningModule):
    """Train the corrector LoRA on (flawed image, enhanced image, reflection) batches."""

    def __init__(
        self,
        path: str = "tiny",
        weight_dtype: str = "float32",
        lora_rank: int = 256,
        lora_alpha: float | None = None,
        lora_target_modules: str | list[str] = "paper",
        lora_dropout: float = 0.0,
        attention: str = "union",
        lora_on_target: bool = False,
        condition_size: int = 512,
        condition_position: str = "beside",
        guidance: float = 1.0,
        timestep_mean: float = 0.0,
        timestep_std: float = 1.0,
        max_sequence_length: int = 512,
        sample_latents: bool = True,
        cache_latents: bool = False,
        gradient_checkpointing: bool = False,
        text_embeddings: str | None = None,
        concurrent_loads: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        check_option("model.attention", attention, ATTENTION_MODES)  # before FLUX is loaded
        check_option("model.condition_position", condition_position, CONDITION_POSITIONS)
        if cache_latents and sample_latents:
            raise ConfigError("model.cache_latents needs model.sample_latents=false: sampled latents differ "
                              "every step, so there is nothing to reuse")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        self.pipe = None  # the FluxPipeline; its transformer is registered as `self.transformer`
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor (FLOP/s, MFU)
        self._micro_step = (-1, 0)  # (global step, micro-batch within it)
        self.latent_cache = LatentCache() if cache_latents else None

    # ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FLUX loaded straight onto this rank's device (no device -> CPU -> device round trip), by
        `concurrent_loads` ranks of a node at a time (each stages the pipeline in host memory, ~34 GB for
        FLUX.1-dev: all 8 at once is ~270 GB), then the LoRA, and the FSDP2 sharding under FSDP2Strategy."""
        if self.pipe is not None:
            return
        from reflectionflow.models.loading import load_flux_pipeline

        hp = self.hparams
        quiet_prompt_truncation()
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        local_rank, per_node = (trainer.local_rank, trainer.num_devices) if trainer is not None else (0, 1)
        at_once = hp.concurrent_loads or per_node
        for turn in range(-(-per_node // at_once)):
            if local_rank // at_once == turn:
                self.pipe = load_flux_pipeline(hp.path, dtype=getattr(torch, hp.weight_dtype), device=device,
                                               text_encoders=not hp.text_embeddings)
            if at_once < per_node:
                trainer.strategy.barrier("configure_model:load")
        for component in self._frozen_encoders():
            component.requires_grad_(False).eval()
        add_lora(self.pipe.transformer, rank=hp.lora_rank, alpha=hp.lora_alpha,
                 target_modules=hp.lora_target_modules, dropout=hp.lora_dropout)
        dead = set(dead_end_lora_parameters(self.pipe.transformer, hp.lora_on_target))
        for name, p in self.pipe.transformer.named_parameters():
            if name in dead:
                p.requires_grad_(False)
            elif p.requires_grad:  # LoRA trains in fp32 even on bf16 base weights
                p.data = p.data.float()
        if hp.gradient_checkpointing:
            self.pipe.transformer.enable_gradient_checkpointing()
        self.transformer = self.pipe.transformer.train()
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is not None:
            shard_transformer(self.transformer, mesh["data_parallel"])

    def _frozen_encoders(self) -> list[torch.nn.Module]:
        """VAE, and CLIP and T5 unless the data brings precomputed text embeddings."""
        return [c for c in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2) if c is not None]

    def on_fit_start(self) -> None:
        for component in self._frozen_encoders():
            component.to(self.device)

    def configure_optimizers(self):
        from reflectionflow.models.strategies import shards_parameters

        params = [p for p in self.transformer.parameters() if p.requires_grad]
        return build_optimizers(params, self.optimizer_factory, self.lr_scheduler_factory, default_lr=1e-4,
                                sharded=shards_parameters(self.trainer.strategy))

    # ---------------------------------------------------------------------------------------------------
    def _step_generator(self) -> torch.Generator:
        step, micro = self._micro_step
        micro = micro + 1 if step == self.global_step else 0
        self._micro_step = (self.global_step, micro)
        key = (self.hparams.seed * 1_000_003 + self.global_step) * 4099 + self.global_rank * 67 + micro
        return torch.Generator(self.device).manual_seed(key % (2**63))

    @torch.no_grad()
    def encode_batch(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Frozen encoders: target/condition latents and the (pooled CLIP, T5) text embeddings (or the
        batch's precomputed ones, `data.text_embeddings`).

        Latents are VAE samples (FLUX's VAE), or the posterior mode with `sample_latents=False` for a VAE
        trained without sampling (the shapes VAE: its posterior std is ~1, noise as large as the signal),
        then with `cache_latents` each distinct image is encoded once (`models.latent_cache`)."""
        vae, sample = self.pipe.vae, self.hparams.sample_latents
        if self.latent_cache is not None:  # the posterior mode of images seen before, from the cache
            target = self.latent_cache.encode(vae, batch["image"].to(self.device))
            condition = self.latent_cache.encode(vae, batch["condition"].to(self.device))
        else:
            target = encode_images(vae, batch["image"].to(self.device), generator=generator, sample=sample)
            condition = encode_images(vae, batch["condition"].to(self.device), generator=generator, sample=sample)
        if "t5_embeds" in batch:  # precomputed (data.text_embeddings)
            t5, pooled = batch["t5_embeds"].to(self.device), batch["pooled_embeds"].to(self.device)
        elif self.pipe.text_encoder_2 is None:
            raise ValueError("model.text_embeddings is set (no text encoders loaded) but the batch has no "
                             "t5_embeds; set data.text_embeddings")
        else:
            t5, pooled, _ = self.pipe.encode_prompt(
                prompt=list(batch["prompt"]), prompt_2=list(batch["t5_text"]), device=self.device,
                max_sequence_length=self.hparams.max_sequence_length,
            )
        return {"target": target, "condition": condition, "t5": t5, "pooled": pooled}

    def flow_matching_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The shared flow-matching loss (`models.flow_matching`) on the target tokens of the joint sequence."""
        hp = self.hparams
        enc = self.encode_batch(batch, generator)
        b = enc["target"].shape[0]
        scale = self.pipe.vae_scale_factor
        target_size = batch["image"].shape[-2:]
        dtype = self.transformer.dtype
        img_ids = latent_ids(target_size[0] // scale, target_size[1] // scale, device=self.device, dtype=dtype)
        cond_ids = condition_ids(batch["condition"].shape[-1], device=self.device, dtype=dtype, vae_scale_factor=scale,
                                 position=hp.condition_position)

        def predict(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return corrector_forward(
                self.transformer,
                hidden_states=xt.to(dtype),
                encoder_hidden_states=enc["t5"].to(dtype),
                pooled_projections=enc["pooled"].to(dtype),
                timestep=t.to(dtype),
                img_ids=img_ids,
                txt_ids=torch.zeros(enc["t5"].shape[1], 3, device=self.device, dtype=dtype),
                guidance=torch.full((b,), hp.guidance, device=self.device) if self.transformer.config.guidance_embeds else None,
                cond_hidden_states=enc["condition"].to(dtype),
                cond_ids=cond_ids,
                attention=hp.attention,
                lora_on_target=hp.lora_on_target,
            )

        return flow_matching_loss(predict, enc["target"], generator, hp.timestep_mean, hp.timestep_std)

    def count_step_flops(self, batch: dict) -> int:
        """FLOPs of the transformer's forward and backward for one batch of this shape, counted on a
        meta-device copy (no memory, no compute): the model FLOPs MFU is measured against, so without the
        checkpointing recomputation and the frozen encoders; the frozen weights get no weight gradients."""
        from diffusers import FluxTransformer2DModel
        from torch.utils.flop_counter import FlopCounterMode

        hp = self.hparams
        config = self.transformer.config
        scale = self.pipe.vae_scale_factor
        b, (height, width) = batch["image"].shape[0], batch["image"].shape[-2:]
        rows, cols = height // scale // 2, width // scale // 2  # packed 2x2 latent tokens
        condition_px = batch["condition"].shape[-1]
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
            add_lora(model, rank=hp.lora_rank, alpha=hp.lora_alpha, target_modules=hp.lora_target_modules)
            dead = set(dead_end_lora_parameters(model, hp.lora_on_target))
            for name, p in model.named_parameters():
                if name in dead:
                    p.requires_grad_(False)
            inputs = dict(
                hidden_states=torch.zeros(b, rows * cols, config.in_channels),
                encoder_hidden_states=torch.zeros(b, hp.max_sequence_length, config.joint_attention_dim),
                pooled_projections=torch.zeros(b, config.pooled_projection_dim), timestep=torch.zeros(b),
                img_ids=latent_ids(2 * rows, 2 * cols), txt_ids=torch.zeros(hp.max_sequence_length, 3),
                guidance=torch.zeros(b) if config.guidance_embeds else None,
                cond_hidden_states=torch.zeros(b, (condition_px // scale // 2) ** 2, config.in_channels),
                cond_ids=condition_ids(condition_px, vae_scale_factor=scale, position=hp.condition_position),
            )
            with FlopCounterMode(display=False) as counter:
                corrector_forward(model, attention=hp.attention, lora_on_target=hp.lora_on_target, **inputs).sum().backward()
        return counter.get_total_flops()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.flops_per_batch is None:
            self.flops_per_batch = self.count_step_flops(batch)
        loss = self.flow_matching_loss(batch, self._step_generator())
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.transformer.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
            if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm, batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # What the LR monitor cannot show for Prodigy, whose `lr` (1.0) only scales its estimated step size.
        self.log("train/lr_effective", effective_lr(self.trainer.optimizers[0]), batch_size=1)

    # ---------------------------------------------------------------------------------------------------
    def corrector_settings(self) -> CorrectorSettings:
        """What sampling this corrector must repeat (saved beside its LoRA as `reflectionflow.json`)."""
        hp = self.hparams
        return CorrectorSettings(
            base_model=str(hp.path), rank=hp.lora_rank, condition_size=hp.condition_size,
            condition_position=hp.condition_position, attention=hp.attention, lora_on_target=hp.lora_on_target,
            max_sequence_length=hp.max_sequence_length,
        )

    def lora_state(self) -> dict[str, torch.Tensor]:
        """Full (gathered) LoRA weights, on every rank: works unsharded and under FSDP2."""
        state = lora_state_dict(self.transformer, ADAPTER_NAME)
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in state.items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints hold what trains (the LoRA), not the frozen FLUX weights; FSDP2 and DeepSpeed leave
        the frozen ones out before gathering (`FSDP2Strategy`, `exclude_frozen_parameters`)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
