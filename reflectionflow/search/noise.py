"""Seeds and noise perturbations as pure functions, so a resumed run redraws exactly what it would have."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


def derive_seed(
    base_seed: int, prompt_index: int, chain: int, round_index: int, stream: str = "noise"
) -> int:
    """A 31-bit seed that depends only on its arguments (not on run order, sharding or earlier prompts)."""
    key = f"{base_seed}/{prompt_index}/{chain}/{round_index}/{stream}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def _neighbour(
    noise: torch.Tensor, seed: int, draw_cosine: Callable[[torch.Generator], float | torch.Tensor]
) -> torch.Tensor:
    """`noise` turned towards a random direction orthogonal to it, to the cosine similarity `draw_cosine`
    gives (drawn after the direction, from the same generator), keeping its norm."""
    generator = torch.Generator().manual_seed(seed)
    flat = noise.flatten().double()
    norm = flat.norm()
    unit = flat / norm.clamp_min(1e-12)
    direction = torch.randn(flat.shape, generator=generator, dtype=torch.float64)
    direction = direction - (direction @ unit) * unit
    direction = direction / direction.norm().clamp_min(1e-12)
    cosine = torch.as_tensor(draw_cosine(generator), dtype=torch.float64)
    mixed = cosine * unit + (1.0 - cosine**2).sqrt() * direction
    return (mixed * norm).reshape(noise.shape).to(noise.dtype)


def perturb_noise(noise: torch.Tensor, seed: int, min_cosine: float) -> torch.Tensor:
    """A random noise of the same norm whose cosine similarity to `noise` is uniform in [min_cosine, 1]:
    a random direction orthogonal to `noise` is mixed in at a random angle, keeping the norm a Gaussian
    sample would have."""
    return _neighbour(
        noise, seed, lambda g: min_cosine + (1.0 - min_cosine) * torch.rand((), generator=g, dtype=torch.float64)
    )


def noise_at_cosine(noise: torch.Tensor, seed: int, cosine: float) -> torch.Tensor:
    """A random noise of the same norm at cosine similarity exactly `cosine` to `noise`: tt-scale-flux's
    zero-order neighbours (its `generate_neighbors(x, threshold)`)."""
    return _neighbour(noise, seed, lambda g: cosine)
