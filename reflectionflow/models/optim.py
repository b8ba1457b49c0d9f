"""Optimizer + LR scheduler from Hydra partials, shared by every LightningModule of the project."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def build_optimizers(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[..., torch.optim.Optimizer] | None,
    lr_scheduler: Callable[..., Any] | None,
    default_lr: float,
):
    """`configure_optimizers`' return value: the configured optimizer (AdamW at `default_lr` if none) and,
    when configured, a per-step scheduler (`diffusers.optimization.get_scheduler` partials take `optimizer=`)."""
    params = list(params)
    opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(params, lr=default_lr)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(optimizer=opt), "interval": "step"}}
