"""Does a corrector read its flawed image and its reflection? Flow-matching losses with real and swapped inputs.

On one fixed batch and fixed noise, at a few timesteps, the corrector's loss with its real inputs is
compared with the same corrector given another sample's flawed image (shuffled across the batch, the
baseline measured in the same call), no image, another sample's reflection and the prompt alone. A ratio
real / shuffled near 1 means the input is ignored. `copy` is the loss of predicting the flawed image itself
as the clean target, what merely copying would reach. When target and condition tile the same grid
(condition_size == target size), tokens are split into those the edit changed (their latents differ by
more than `EDITED_TOKEN_MSE`) and those it left alone: a corrector that edits copies the unchanged ones.

One implementation for the training callback (`callbacks.ValidationMetrics`), the shapes recipe's export
and `benchmarks/condition_use.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reflectionflow.data.transforms import t5_text
from reflectionflow.models.corrector import condition_ids, corrector_forward, latent_ids
from reflectionflow.models.pipeline import encode_images
from reflectionflow.models.settings import CorrectorSettings

EDITED_TOKEN_MSE = 0.5
"""Mean squared latent difference between a target token and its condition token above which the edit
changed that token (unchanged tokens of the shapes triplets differ by ~0.05 from JPEG and antialiasing,
edited ones by ~2)."""
TIMES = (0.3, 0.6, 0.9)


@torch.no_grad()
def condition_use(
    flux,
    transformer,
    batch: dict,
    settings: CorrectorSettings,
    times: Sequence[float] = TIMES,
    seed: int = 0,
    guidance: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Per timestep, the losses and ratios described in the module docstring, with the forward the
    corrector was trained with (`settings`; `guidance`: the guidance embedding value of its training).

    `batch`: `image` and `condition` (B, 3, H, W) in [-1, 1], lists `prompt` and `reflection` (B >= 2).
    Keys per timestep: `real`, `shuffled_condition`, `no_condition`, `shuffled_reflection`, `prompt_only`,
    `copy`, the ratios `condition_ratio` (real / shuffled condition) and `reflection_ratio`, and with a
    token split `real_edited`, `real_unchanged`, `copy_unchanged`, `no_condition_unchanged`, `edited_share`.
    """
    batch_size = batch["image"].shape[0]
    if batch_size < 2:
        raise ValueError("condition_use needs at least 2 samples (the shuffled inputs come from another one)")
    device, dtype = transformer.device, transformer.dtype
    prompts, reflections = list(batch["prompt"]), list(batch["reflection"])
    shuffled = reflections[1:] + reflections[:1]
    texts = {"real": [t5_text(p, r) for p, r in zip(prompts, reflections, strict=True)],
             "shuffled": [t5_text(p, r) for p, r in zip(prompts, shuffled, strict=True)],
             "prompt_only": prompts}
    encoded = {name: flux.encode_prompt(prompt=prompts, prompt_2=t5, device=device,
                                        max_sequence_length=settings.max_sequence_length)[:2]
               for name, t5 in texts.items()}
    target = encode_images(flux.vae, batch["image"].to(device, dtype))
    condition = encode_images(flux.vae, batch["condition"].to(device, dtype))
    black = encode_images(flux.vae, torch.full_like(batch["condition"], -1.0).to(device, dtype))
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    scale = flux.vae_scale_factor
    height, width = batch["image"].shape[-2:]
    img_ids = latent_ids(height // scale, width // scale, device=device, dtype=dtype)
    cond_ids = condition_ids(batch["condition"].shape[-1], device=device, dtype=dtype, vae_scale_factor=scale,
                             position=settings.condition_position)
    guidance_embedding = None
    if transformer.config.guidance_embeds:
        guidance_embedding = torch.full((batch_size,), guidance, device=device)

    def token_losses(t: float, text: str, cond: torch.Tensor) -> torch.Tensor:
        t5, pooled = encoded[text]
        velocity = corrector_forward(
            transformer, hidden_states=(1 - t) * target + t * noise, encoder_hidden_states=t5.to(dtype),
            pooled_projections=pooled.to(dtype), timestep=torch.full((batch_size,), t, device=device, dtype=dtype),
            img_ids=img_ids, txt_ids=torch.zeros(t5.shape[1], 3, device=device, dtype=dtype), guidance=guidance_embedding,
            cond_hidden_states=cond, cond_ids=cond_ids, attention=settings.attention,
            lora_on_target=settings.lora_on_target,
        )
        return ((velocity.float() - (noise - target).float()) ** 2).mean(-1)  # (B, N) per token

    same_grid = condition.shape[1] == target.shape[1]
    edited = ((target - condition).float() ** 2).mean(-1) > EDITED_TOKEN_MSE if same_grid else None
    results = {}
    for t in times:
        real = token_losses(t, "real", condition)
        no_condition = token_losses(t, "real", black)
        copy = ((target - condition).float() ** 2).mean(-1) / t**2 if same_grid else None
        row = {
            "real": real.mean().item(),
            "shuffled_condition": token_losses(t, "real", condition.roll(1, 0)).mean().item(),
            "no_condition": no_condition.mean().item(),
            "shuffled_reflection": token_losses(t, "shuffled", condition).mean().item(),
            "prompt_only": token_losses(t, "prompt_only", condition).mean().item(),
        }
        row["condition_ratio"] = row["real"] / row["shuffled_condition"]
        row["reflection_ratio"] = row["real"] / row["shuffled_reflection"]
        if edited is not None:
            row["copy"] = copy.mean().item()
            row["edited_share"] = edited.float().mean().item()
            if edited.any():
                row["real_edited"] = real[edited].mean().item()
            if (~edited).any():
                row["real_unchanged"] = real[~edited].mean().item()
                row["copy_unchanged"] = copy[~edited].mean().item()
                row["no_condition_unchanged"] = no_condition[~edited].mean().item()
        results[f"{t:g}"] = row
    return results


def flattened(results: dict[str, dict[str, float]], prefix: str = "diagnostics") -> dict[str, float]:
    """`{"diagnostics/t0.3/condition_ratio": ...}` for loggers."""
    return {f"{prefix}/t{t}/{name}": value for t, row in results.items() for name, value in row.items()}
