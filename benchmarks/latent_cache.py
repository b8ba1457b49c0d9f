"""Base-model training steps with cached VAE latents (`model.cache_latents` + `data.pool_size`) vs encoding
every batch (the baseline), measured in the same run on the shapes base recipe's model and batch size.

    python benchmarks/latent_cache.py [--vae DIR] [--steps 20]

Both arms run the recipe module's own `training_step`, backward and an AdamW step on the same pool batches;
the cached arm's batches are encoded once before timing (what every epoch after the first costs).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from omegaconf import OmegaConf

from reflectionflow.config import compose


def base_module(vae: str, cache_latents: bool):
    """The `experiment=shapes_base` module (its config composed, not copied) on the VAE at `vae`."""
    from reflectionflow.shapes.base import TextToImageModule

    cfg = compose("train", ["experiment=shapes_base", f"model.vae_path={vae}", f"model.cache_latents={cache_latents}"])
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("_target_", "_convert_", "optimizer", "lr_scheduler"):
        kwargs.pop(key, None)
    return TextToImageModule(**kwargs), cfg.data.batch_size, cfg.data.pool_size


def samples_per_second(module, batches: list[dict], steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    start = 0.0
    for step, batch in enumerate(itertools.islice(itertools.cycle(batches), steps + 1)):
        if step == 1:  # the first step (allocations, AdamW state) is not timed
            start = time.perf_counter()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * batches[0]["image"].shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="shapes VAE product dir (default: the shapes_vae recipe's product)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, default=4, help="distinct pool batches cycled through")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from reflectionflow.recipes import built_product
    from reflectionflow.shapes.pairs import ShapesPairsDataModule

    vae = args.vae or built_product("shapes_vae")
    encoding, batch_size, pool_size = base_module(str(vae), cache_latents=False)
    cached, _, _ = base_module(str(vae), cache_latents=True)
    loader = ShapesPairsDataModule(batch_size=batch_size, pool_size=pool_size).train_dataloader()
    batches = list(itertools.islice(loader, args.batches))
    for batch in batches:
        cached.latents(batch)  # the pool's first epoch
    baseline = samples_per_second(encoding, batches, args.steps)
    fast = samples_per_second(cached, batches, args.steps)
    print(f"shapes base training step, batch {batch_size}, {args.steps} steps, VAE {vae}")
    print(f"encoding every batch (baseline): {baseline:6.1f} samples/s")
    print(f"cached latents:                  {fast:6.1f} samples/s  ({fast / baseline:.2f}x)")


if __name__ == "__main__":
    main()
