"""The flow-matching objective shared by the corrector LoRA and the base text-to-image model.

`x_t = (1 - t) x0 + t noise`, velocity target `noise - x0`, `t = sigmoid(N(mean, std))` (logit-normal).
Both modules call this one function, so the base model is trained with exactly the corrector's loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def flow_matching_loss(
    predict_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    generator: torch.Generator,
    timestep_mean: float = 0.0,
    timestep_std: float = 1.0,
) -> torch.Tensor:
    """MSE between `predict_velocity(x_t, t)` and `noise - x0` for packed latent tokens `x0` (B, N, C).

    `t` is drawn before the noise, both from `generator`, so a step's draws are a pure function of it.
    """
    x0 = x0.float()
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=generator, device=x0.device) * timestep_std + timestep_mean)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return F.mse_loss(predict_velocity(xt, t).float(), noise - x0)
