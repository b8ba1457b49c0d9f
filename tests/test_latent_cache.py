"""The latent cache: equal images are encoded once and give exactly the fresh encoding."""

import pytest
import torch
from diffusers import AutoencoderKL

from reflectionflow.config import ConfigError
from reflectionflow.models.latent_cache import LatentCache
from reflectionflow.models.module import ReflectionTuningModule
from reflectionflow.models.pipeline import encode_images


def test_each_distinct_image_is_encoded_once_and_equals_a_fresh_encoding(tiny_flux_path):
    vae = AutoencoderKL.from_pretrained(tiny_flux_path / "vae").eval()
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = torch.cat([pixels, pixels[:2]])  # two images twice within one batch
    cache = LatentCache()
    fresh = encode_images(vae, batch)
    assert torch.allclose(cache.encode(vae, batch), fresh, atol=1e-6) and cache.encoded == 4 == len(cache)
    again = cache.encode(vae, pixels.flip(0))
    assert torch.allclose(again, fresh[:4].flip(0), atol=1e-6) and cache.encoded == 4  # nothing new encoded


def test_sampled_latents_cannot_be_cached():
    with pytest.raises(ConfigError, match="sample_latents=false"):
        ReflectionTuningModule(cache_latents=True, sample_latents=True)
