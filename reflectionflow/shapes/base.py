"""A FLUX-architecture text-to-image model trained from scratch: the shapes world's base model.

A toy-size `FluxTransformer2DModel` is trained with the shared flow-matching loss (`models.flow_matching`)
on (prompt or detailed caption, image) pairs encoded by the frozen domain VAE, reading the text recipe's
pretrained CLIP and T5 encoders, frozen as FLUX's are.
With `pooled_dropout` the pooled CLIP vector is that of "" for a share of the examples while T5 reads the
prompt, so the model learns to read a prompt's detail from T5's tokens, as FLUX does and as the corrector
must (its reflection reaches it through T5 only): trained without it, the miniature drew from the pooled
vector alone (another prompt's T5 tokens cost 3 points, another prompt's pooled vector 29, docs/shapes.md).
Classifier-free guidance comes from prompt dropout: both encoders read "" (what `ReflectionFluxPipeline`'s
`true_cfg_scale` feeds a base model's unconditional branch, as FluxPipeline with `negative_prompt=""`;
a pooled prompt kept in that branch would carry the prompt into it and leave nothing for guidance). The
product is a diffusers `FluxPipeline` directory that `load_flux_pipeline` loads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from reflectionflow.models.corrector import latent_ids
from reflectionflow.models.flow_matching import flow_matching_loss
from reflectionflow.models.latent_cache import LatentCache
from reflectionflow.models.optim import build_optimizers
from reflectionflow.models.pipeline import ReflectionFluxPipeline, encode_images, quiet_prompt_truncation
from reflectionflow.models.tiny import flux_dev_scheduler
from reflectionflow.shapes.evaluation import Judged, accuracy_by_category, judge, verdict_sheet
from reflectionflow.shapes.text import load_text_encoders
from reflectionflow.shapes.world import PromptSpec, heldout_eval_set

log = logging.getLogger(__name__)


def build_flux_pipeline(vae_path: str, text_path: str, transformer: dict, seed: int = 0):
    """A FluxPipeline of a fresh toy-size transformer around the trained VAE and the pretrained, frozen
    text encoders (and tokenizers) of the text recipe, as FLUX's transformer is trained on frozen ones."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    text = load_text_encoders(text_path)
    vae = AutoencoderKL.from_pretrained(Path(vae_path) / "vae")
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,
        joint_attention_dim=text["text_encoder_2"].config.d_model,
        pooled_projection_dim=text["text_encoder"].config.hidden_size,
        guidance_embeds=False,
        **transformer,
    )
    return FluxPipeline(transformer=model, vae=vae.requires_grad_(False).eval(), scheduler=flux_dev_scheduler(),
                        **text)


@torch.no_grad()
def sample_accuracy(
    flux,
    n_per_category: int,
    image_size: int,
    num_inference_steps: int,
    true_cfg_scale: float,
    max_sequence_length: int,
    seed: int = 0,
    batch: int = 32,
    specs: Sequence[PromptSpec] | None = None,
) -> tuple[dict[str, Any], list[Judged]]:
    """Single-sample checker accuracy on the held-out prompts (`n_per_category` per category, or `specs`)
    through `ReflectionFluxPipeline`, and the samples with their verdicts."""
    pipe = ReflectionFluxPipeline(flux, max_sequence_length=max_sequence_length)
    size = image_size

    def samples(start: int, chunk) -> list:
        noises = torch.stack([pipe.initial_noise(seed + start + i, size, size) for i in range(len(chunk))])
        return pipe.generate([s.prompt for s in chunk], noises=noises, height=size, width=size,
                             num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale)

    specs = heldout_eval_set(n_per_category, seed) if specs is None else specs
    judged = judge(specs, samples, batch)
    accuracy, per_tag = accuracy_by_category(judged)
    return {"accuracy": accuracy, "per_tag": per_tag}, judged


class TextToImageModule(L.LightningModule):
    def __init__(
        self,
        vae_path: str,
        text_path: str,
        transformer: dict,
        prompt_dropout: float = 0.1,
        pooled_dropout: float = 0.0,
        max_sequence_length: int = 24,
        timestep_mean: float = 0.0,
        timestep_std: float = 1.0,
        image_size: int = 48,
        eval_per_category: int = 16,
        eval_steps: int = 20,
        eval_true_cfg_scale: float = 3.0,
        cache_latents: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        quiet_prompt_truncation()
        # The pipeline is no nn.Module: the frozen VAE stays out of parameters and checkpoints.
        self.pipe = build_flux_pipeline(vae_path, text_path, dict(transformer), seed)
        self.transformer = self.pipe.transformer.train()  # the text encoders stay frozen
        self.latent_cache = LatentCache() if cache_latents else None

    def on_fit_start(self) -> None:
        for frozen in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            frozen.to(self.device)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return build_optimizers(params, self.optimizer_factory, self.lr_scheduler_factory, default_lr=3e-4)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        generator = torch.Generator(self.device).manual_seed((hp.seed * 1_000_003 + self.global_step) % 2**63)
        pixels = batch["image"]
        b = pixels.shape[0]
        x0 = self.latents(batch)
        keep = torch.rand(b, generator=generator, device=self.device) >= hp.prompt_dropout
        prompts = [p if k else "" for p, k in zip(batch["prompt"], keep.tolist(), strict=True)]
        keep_pooled = torch.rand(b, generator=generator, device=self.device) >= hp.pooled_dropout
        clip_texts = [p if k else "" for p, k in zip(prompts, keep_pooled.tolist(), strict=True)]
        t5, pooled, _ = self.pipe.encode_prompt(
            prompt=clip_texts, prompt_2=prompts, device=self.device, max_sequence_length=hp.max_sequence_length
        )
        scale = self.pipe.vae_scale_factor
        img_ids = latent_ids(pixels.shape[-2] // scale, pixels.shape[-1] // scale, device=self.device)
        txt_ids = torch.zeros(t5.shape[1], 3, device=self.device)

        def predict(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                hidden_states=xt,
                encoder_hidden_states=t5,
                pooled_projections=pooled,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]

        loss = flow_matching_loss(predict, x0, generator, hp.timestep_mean, hp.timestep_std)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """Packed VAE latents of the batch's images (the mode: the VAE was trained without sampling); with
        `cache_latents`, each image of a fixed pool is encoded once and reused in later epochs."""
        if self.latent_cache is None:
            return encode_images(self.pipe.vae, batch["image"])
        return self.latent_cache.encode(self.pipe.vae, batch["image"])

    @torch.no_grad()
    def export(self, path: Path) -> None:
        """The trained FluxPipeline (diffusers format) at `path`, its held-out accuracy in metrics.json and a
        sheet of held-out samples with the checker's verdicts (samples.png)."""
        hp = self.hparams
        self.pipe.to("cpu")
        self.transformer.eval()
        path.mkdir(parents=True, exist_ok=True)
        self.pipe.save_pretrained(path, safe_serialization=True)
        metrics, judged = sample_accuracy(
            self.pipe,
            hp.eval_per_category,
            hp.image_size,
            hp.eval_steps,
            hp.eval_true_cfg_scale,
            hp.max_sequence_length,
            seed=hp.seed,
        )
        metrics.update(
            global_step=self.global_step, true_cfg_scale=hp.eval_true_cfg_scale, steps=hp.eval_steps
        )
        log.info(
            "base model single-sample held-out accuracy: %.1f%% %s",
            100 * metrics["accuracy"],
            metrics["per_tag"],
        )
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        title = f"base model: held-out samples ({hp.eval_steps} steps, guidance {hp.eval_true_cfg_scale:g})"
        verdict_sheet(judged, title).save(path / "samples.png")
