"""Where the corrector's tokens come from and where they sit: FLUX's 2x2 packing of VAE latents into tokens,
and the RoPE ids that place target tokens on their latent grid and condition tokens beside or on it."""

from __future__ import annotations

import torch

from reflectionflow.config import check_option

CONDITION_POSITIONS = ("beside", "aligned")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, H/2 * W/2, 4C) tokens (FLUX 2x2 patch packing)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents: height and width must be even, got shape {tuple(latents.shape)}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4C) tokens -> (B, C, height, width) latents; `height`/`width` are latent sizes (pixels / 8)."""
    b, n, c4 = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(
            f"tokens: {n} tokens do not tile a {height}x{width} latent (shape {tuple(tokens.shape)})"
        )
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids (N, 3) of packed tokens of a `height`x`width` latent: (0, row, column)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def condition_ids(
    condition_size: int, device=None, dtype=torch.float32, vae_scale_factor: int = 8, position: str = "beside"
) -> torch.Tensor:
    """RoPE ids of a `condition_size`-pixel square condition image.

    `beside` (the paper's): the delta `(0, -condition_size // 16)` (FLUX's 8x VAE: the condition's width in
    tokens) is added to axes 1 and 2 of the ids: rows stay, columns move left by that many tokens, so the
    condition sits beside the target rather than on top of it. Other VAEs shift by their own token width.
    `aligned`: the target's own ids (OminiControl's choice for spatially aligned conditions), so a condition
    token and the target token at the same place share their position (the shapes miniature's recipe).
    """
    check_option("condition_position", position, CONDITION_POSITIONS)
    latent = condition_size // vae_scale_factor
    ids = latent_ids(latent, latent, device=device, dtype=dtype)
    if position == "beside":
        ids[:, 2] -= latent // 2
    return ids
