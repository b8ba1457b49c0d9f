"""Seeds and noise perturbations as pure functions, so a resumed run redraws exactly what it would have."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(
    base_seed: int, prompt_index: int, chain: int, round_index: int, stream: str = "noise"
) -> int:
    """A 31-bit seed that depends only on its arguments (not on run order, sharding or earlier prompts)."""
    key = f"{base_seed}/{prompt_index}/{chain}/{round_index}/{stream}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def perturb_noise(noise: torch.Tensor, seed: int, min_cosine: float) -> torch.Tensor:
    """A random noise of the same norm whose cosine similarity to `noise` is uniform in [min_cosine, 1].

    Zero-order search explores this neighbourhood of its current best noise: a random direction
    orthogonal to `noise` is mixed in at a random angle, keeping the norm a Gaussian sample would have.
    """
    generator = torch.Generator().manual_seed(seed)
    flat = noise.flatten().double()
    norm = flat.norm()
    unit = flat / norm.clamp_min(1e-12)
    direction = torch.randn(flat.shape, generator=generator, dtype=torch.float64)
    direction = direction - (direction @ unit) * unit
    direction = direction / direction.norm().clamp_min(1e-12)
    cosine = min_cosine + (1.0 - min_cosine) * torch.rand((), generator=generator, dtype=torch.float64)
    mixed = cosine * unit + (1.0 - cosine**2).sqrt() * direction
    return (mixed * norm).reshape(noise.shape).to(noise.dtype)
