"""Train a domain VAE (diffusers `AutoencoderKL`) from scratch: the latent space of the shapes world.

Reconstruction L1 (foreground weighted) of the posterior mode plus a small KL; at export the latent statistics set the VAE's `shift_factor` and
`scaling_factor` (FLUX's convention, unit-variance latents for flow matching) and the exact checker
measures how many held-out scenes survive a round trip (`metrics.json`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from reflectionflow.models.optim import build_optimizers
from reflectionflow.shapes.evaluation import accuracy_by_category, judge
from reflectionflow.shapes.pairs import ShapesPairs, image_tensor, tensor_image
from reflectionflow.shapes.world import heldout_eval_set, render_scene, sample_scene
from reflectionflow.sheets import contact_sheet

log = logging.getLogger(__name__)


def build_autoencoder(
    block_out_channels: Sequence[int],
    latent_channels: int,
    layers_per_block: int,
    norm_num_groups: int,
    mid_block_attention: bool = False,
):
    """An `AutoencoderKL` downsampling by 2 ** (len(block_out_channels) - 1), no quant convs (as FLUX)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=mid_block_attention,
        shift_factor=0.0,  # FLUX's latent convention; export sets it (and scaling_factor) from the data
    )


@torch.no_grad()
def reconstructions(vae, n_per_category: int = 32, image_size: int = 48, seed: int = 0) -> list[tuple]:
    """(render, the checker's verdict on its VAE round trip) for correct renders of the held-out prompts."""
    rng = np.random.default_rng(seed)
    renders = []

    def round_trips(start: int, chunk) -> list:
        images = [render_scene(sample_scene(s, rng), image_size) for s in chunk]
        renders.extend(images)
        pixels = torch.stack([image_tensor(image) for image in images])
        recon = vae.decode(vae.encode(pixels.to(vae.device)).latent_dist.mode()).sample
        return [tensor_image(image) for image in recon]

    judged = judge(heldout_eval_set(n_per_category, seed), round_trips, batch=64)
    return list(zip(renders, judged, strict=True))


def reconstruction_sheet(pairs: list[tuple], per_category: int = 3):
    """Inputs next to their reconstructions, a row per category, captioned with the checker's verdict."""
    rows: dict[str, list] = {}
    for render, judged in pairs:
        row = rows.setdefault(judged.spec.tag, [])
        if len(row) < 2 * per_category:
            verdict = "ok" if judged.correct else "; ".join(judged.result.messages())
            row += [(render, "input"), (judged.image, f"reconstruction -- {verdict}")]
    return contact_sheet(list(rows.values()), cell=144, title="VAE: held-out renders and their round trips",
                         row_labels=list(rows))


class AutoencoderModule(L.LightningModule):
    def __init__(
        self,
        block_out_channels: Sequence[int] = (32, 64, 64),
        latent_channels: int = 16,
        layers_per_block: int = 1,
        norm_num_groups: int = 4,
        mid_block_attention: bool = False,
        kl_weight: float = 1e-6,
        latent_noise: float = 0.0,
        foreground_weight: float = 5.0,
        eval_per_category: int = 32,
        image_size: int = 48,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.vae = build_autoencoder(
            block_out_channels, latent_channels, layers_per_block, norm_num_groups, mid_block_attention
        )

    def configure_optimizers(self):
        params = self.vae.parameters()
        return build_optimizers(params, self.optimizer_factory, self.lr_scheduler_factory, default_lr=1e-3)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """L1 of the decoded posterior mode plus Gaussian noise of `latent_noise` times the batch's latent
        std, foreground pixels weighted up (the background is most of them).

        Not the posterior's own sample: colour is a small signal that the N(0, 1) noise of an untrained
        log-variance drowns. The fixed relative noise makes the decoder tolerate the small latent errors a
        diffusion model makes and pushes colours apart in the latent space (without it green and black
        codes lie so close that a sampled green square decodes black)."""
        pixels = batch["image"]
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mode()
        noise = torch.randn_like(latents) * latents.detach().std() * self.hparams.latent_noise
        recon = self.vae.decode(latents + noise).sample
        foreground = (pixels < 0.99).any(dim=1, keepdim=True)
        weights = 1.0 + (self.hparams.foreground_weight - 1.0) * foreground
        l1 = (weights * (recon - pixels).abs()).mean()
        loss = l1 + self.hparams.kl_weight * posterior.kl().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=pixels.shape[0])
        self.log("train/l1", F.l1_loss(recon, pixels), batch_size=pixels.shape[0])
        return loss

    @torch.no_grad()
    def export(self, path: Path) -> None:
        """`<path>/vae` (diffusers format, latent statistics in its config), `<path>/metrics.json` and a sheet
        of reconstructions next to their inputs (`reconstructions.png`)."""
        vae = self.vae.eval()
        stream = iter(ShapesPairs("train", self.hparams.image_size, seed=self.hparams.seed + 1))
        pixels = torch.stack([next(stream)["image"] for _ in range(256)]).to(self.device)
        latents = vae.encode(pixels).latent_dist.mode()
        vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
        pairs = reconstructions(vae, self.hparams.eval_per_category, self.hparams.image_size)
        accuracy, per_tag = accuracy_by_category([judged for _, judged in pairs])
        metrics = {"accuracy": accuracy, "per_tag": per_tag, "global_step": self.global_step}
        log.info("VAE reconstructions pass the checker: %.1f%% %s", 100 * accuracy, per_tag)
        path.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(path / "vae")
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        reconstruction_sheet(pairs).save(path / "reconstructions.png")
