"""Corrector cost on a small CPU FLUX: condition-stream overhead, and causal + KV cache vs union sampling.

    python benchmarks/corrector.py [--threads 2] [--repeats 5]

1. forward+backward of `corrector_forward` (256 target + 64 condition + 64 text tokens, LoRA on the
   paper's targets) vs the stock `FluxTransformer2DModel` forward+backward over the same 384 tokens:
   overhead ratio (goal <= 1.15).
2. one 28-step image with a condition: causal attention + condition KV cache vs union (goal >= 1.15x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

from reflectionflow.models.corrector import (
    build_condition_cache,
    condition_ids,
    corrector_forward,
    latent_ids,
)
from reflectionflow.models.lora import add_lora

N_TARGET, N_COND, N_TEXT, STEPS = 256, 64, 64, 28


def small_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    )
    add_lora(model, rank=32)
    return model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = small_transformer()
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, N_TEXT, 256, generator=g)
    pooled = torch.randn(1, 128, generator=g)
    target = torch.randn(1, N_TARGET, 64, generator=g)
    cond = torch.randn(1, N_COND, 64, generator=g)
    common = dict(encoder_hidden_states=text, pooled_projections=pooled, txt_ids=torch.zeros(N_TEXT, 3),
                  guidance=torch.tensor([1.0]))
    t = torch.tensor([0.7])
    target_ids, cond_ids = latent_ids(32, 32), condition_ids(128)

    def corrector_step():
        out = corrector_forward(model, hidden_states=target, timestep=t, img_ids=target_ids,
                                cond_hidden_states=cond, cond_ids=cond_ids, **common)
        out.square().mean().backward()

    joint = torch.cat([target, cond], dim=1)
    joint_ids = torch.cat([target_ids, cond_ids])

    def stock_step():
        out = model(hidden_states=joint, timestep=t, img_ids=joint_ids, **common).sample
        out.square().mean().backward()

    corrector_s = median_seconds(corrector_step, args.repeats)
    stock_s = median_seconds(stock_step, args.repeats)
    model.zero_grad(set_to_none=True)

    def sample(attention: str):
        def run():
            with torch.no_grad():
                latents = target.clone()
                extra = dict(cond_hidden_states=cond, cond_ids=cond_ids)
                if attention == "causal":
                    extra = dict(cond_cache=build_condition_cache(model, pooled_projections=pooled, **extra))
                for step in range(STEPS):
                    sigma = 1 - step / STEPS
                    v = corrector_forward(model, hidden_states=latents, timestep=torch.tensor([sigma]),
                                          img_ids=target_ids, attention=attention, **extra, **common)
                    latents = latents - v / STEPS
        return run

    union_s = median_seconds(sample("union"), max(1, args.repeats // 2))
    causal_s = median_seconds(sample("causal"), max(1, args.repeats // 2))

    print(f"tokens: target {N_TARGET}, condition {N_COND}, text {N_TEXT}; threads {args.threads}")
    print(f"forward+backward  corrector {corrector_s * 1000:.1f} ms   stock (same {N_TARGET + N_COND + N_TEXT} tokens) "
          f"{stock_s * 1000:.1f} ms   overhead {corrector_s / stock_s:.3f}x")
    print(f"{STEPS}-step sample   union {union_s:.3f} s   causal+kv-cache {causal_s:.3f} s")
    print(f"causal+kv-cache speedup {union_s / causal_s:.2f}x")


if __name__ == "__main__":
    main()
