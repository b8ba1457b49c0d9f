"""Optimizer + LR scheduler from Hydra partials, shared by every LightningModule of the project, and the
paper's Prodigy made correct under sharding."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

SHARDED_FLAG = "fsdp_in_use"  # the optimizer argument that says each rank holds only a shard (Prodigy's name)


def build_optimizers(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[..., torch.optim.Optimizer] | None,
    lr_scheduler: Callable[..., Any] | None,
    default_lr: float,
    sharded: bool = False,
):
    """`configure_optimizers`' return value: the configured optimizer (AdamW at `default_lr` if none) and,
    when configured, a per-step scheduler (`diffusers.optimization.get_scheduler` partials take `optimizer=`).

    `sharded` (the strategy gives each rank a shard of the parameters: FSDP, DeepSpeed ZeRO) is passed on to
    optimizers whose statistics span all parameters (`fsdp_in_use=True`: Prodigy's step size `d`)."""
    params = list(params)
    if optimizer is None:
        opt = torch.optim.AdamW(params, lr=default_lr)
    elif sharded and SHARDED_FLAG in inspect.signature(optimizer).parameters:
        opt = optimizer(params, **{SHARDED_FLAG: True})
    else:
        opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(optimizer=opt), "interval": "step"}}


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The step size the first parameter group trains at: `d x lr` for Prodigy (its `lr` is a multiplier
    of the estimated `d`, 1.0 by default), the scheduled `lr` for other optimizers."""
    group = optimizer.param_groups[0]
    return float(group["d"] * group["lr"]) if "d" in group else float(group["lr"])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (a view: in-place updates reach the parameter), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


class Prodigy(torch.optim.Optimizer):
    """The paper's optimizer: prodigyopt 1.1's Prodigy (Adam with an estimated step size `d`), with the `d`
    estimate correct when each rank holds a shard of the parameters.

    `d` comes from two sums over all parameters. prodigyopt sums them over the shard a rank holds unless
    `fsdp_in_use` is set, and then reduces them with a tensor it puts on `.cuda()` (no CPU runs) and takes
    the shard of an FSDP2 DTensor through `flatten`, which fails on unevenly sharded tensors. Here the
    sums are taken on each rank's local shard and reduced once per step over all ranks (`fsdp_in_use`,
    set by `build_optimizers` when the strategy shards, and implied by DTensor parameters), on the
    parameters' device; the optimizer states keep the parameters' type, so FSDP2 checkpoints gather and
    re-shard them like the parameters. Unsharded, the steps are prodigyopt's (tested against it); its
    `slice_p` (an approximation) is not offered.
    """

    def __init__(self, params, lr: float = 1.0, betas=(0.9, 0.999), beta3: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = float("inf"), fsdp_in_use: bool = False):
        for name, value, ok in (("lr", lr, lr > 0), ("eps", eps, eps > 0), ("d0", d0, d0 > 0),
                                ("betas[0]", betas[0], 0 <= betas[0] < 1), ("betas[1]", betas[1], 0 <= betas[1] < 1)):
            if not ok:
                raise ValueError(f"Prodigy: invalid {name} {value}")
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay, d=d0, d0=d0,
                        d_max=d0, d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
                        use_bias_correction=use_bias_correction, decouple=decouple,
                        safeguard_warmup=safeguard_warmup, fsdp_in_use=fsdp_in_use)
        super().__init__(params, defaults)

    def _sharded(self) -> bool:
        return any(group[SHARDED_FLAG] or any(_is_dtensor(p) for p in group["params"])
                   for group in self.param_groups)

    def _init_state(self, p: torch.Tensor, sharded: bool) -> None:
        state = self.state[p]
        state["step"] = 0
        state["s"] = torch.zeros_like(p.detach())
        nonzero = _local(p.detach()).any().to(torch.float32).reshape(1)
        if sharded:  # one decision for all shards, or a gathered checkpoint would mix layouts
            _all_reduce(nonzero, dist.ReduceOp.MAX)
        # An all-zero start (LoRA's B) keeps a scalar zero, as prodigyopt does, to save memory.
        state["p0"] = p.detach().clone() if nonzero.item() else torch.tensor(0.0, device=_local(p).device,
                                                                                 dtype=p.dtype)
        if self.param_groups[0]["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(p.detach())
        state["exp_avg_sq"] = torch.zeros_like(p.detach())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k, d, d_max, d_coef = first["k"], first["d"], first["d_max"], first["d_coef"]
        lr = max(group["lr"] for group in self.param_groups)
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1
        dlr = d * lr * bias_correction
        sharded = self._sharded()

        sums: torch.Tensor | None = None  # (sum of grad . (p0 - p), sum of |s|) over this rank's shards
        for group in self.param_groups:
            if group["lr"] not in (lr, 0.0):
                raise RuntimeError("Prodigy: parameter groups may differ in lr only by setting it to 0")
            d0 = group["d0"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "step" not in self.state[p]:
                    self._init_state(p, sharded)
                state = self.state[p]
                grad, data = _local(p.grad), _local(p)
                if group["weight_decay"] != 0 and not group["decouple"]:
                    grad.add_(data, alpha=group["weight_decay"])
                if sums is None:
                    sums = torch.zeros(2, dtype=torch.float64, device=grad.device)
                if group["lr"] > 0.0:
                    s = _local(state["s"])
                    sums[0] += (d / d0) * dlr * torch.dot(grad.reshape(-1), (_local(state["p0"]) - data).reshape(-1))
                    if beta1 > 0:
                        _local(state["exp_avg"]).mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                    _local(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                    s.mul_(beta3).add_(grad, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
                    sums[1] += s.abs().sum()
        if sums is None:
            return loss
        if sharded:
            _all_reduce(sums)
        delta_numerator, d_denom = sums.tolist()
        if d_denom == 0 or lr == 0.0:  # no gradient yet, or every group frozen (lr 0): nothing to learn from
            return loss

        d_numerator = first["d_numerator"] * beta3 + delta_numerator
        d_hat = d_coef * d_numerator / d_denom
        if d == first["d0"]:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])

        for group in self.param_groups:
            group.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat)
            decay, eps = group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                data = _local(p)
                denom = _local(state["exp_avg_sq"]).sqrt().add_(d * eps)
                if decay != 0 and group["decouple"]:
                    data.add_(data, alpha=-decay * dlr)
                if beta1 > 0:
                    data.addcdiv_(_local(state["exp_avg"]), denom, value=-dlr)
                else:
                    data.addcdiv_(_local(p.grad), denom, value=-dlr * d)
            group["k"] = k + 1
        return loss
