"""The corrector at FLUX.1-dev size on one GPU: training step time and memory, sampling, search throughput.

    python benchmarks/gpu.py            # on a CUDA machine (H100/H200 class: < 8 minutes); no download
    python benchmarks/gpu.py --small    # the same code at toy width on the CPU (what the test runs)

A FLUX.1-dev-shaped transformer (hidden 3072 = 24 heads x 128, 19 double + 38 single blocks) with random
weights, initialised on the device, in bf16, with the paper's rank-256 LoRA (`add_lora`, fp32, dead-end
adapters frozen as in training). When the card cannot hold all blocks with the training states, fewer are
built and the figures are extrapolated per block (said on each line). Prints one line per figure:

1. training step (`corrector_forward` + flow-matching loss + backward + the paper's Prodigy step) at 1024 px
   target / 512 px condition / 512 T5 tokens, batch 1 and the largest batch that fits, with and without
   gradient checkpointing: time, peak memory, and the ratio to the stock FLUX forward+backward (LoRA on
   every token) over the same tokens in the same run;
2. one 28-step corrected image: union vs causal attention + condition KV cache (`build_condition_cache`);
3. search throughput at width 4: `ReflectionFluxPipeline.generate` over 4 chains (VAE, CLIP and T5-XXL at
   full size with random weights), images/s, union and causal.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, replace

import torch
from diffusers import FluxTransformer2DModel

from reflectionflow.models.corrector import (
    build_condition_cache,
    condition_ids,
    corrector_forward,
    dead_end_lora_parameters,
    latent_ids,
)
from reflectionflow.models.flow_matching import flow_matching_loss
from reflectionflow.models.lora import add_lora
from reflectionflow.models.optim import Prodigy

FULL_DOUBLE, FULL_SINGLE = 19, 38


@dataclass(frozen=True)
class Shape:
    heads: int
    head_dim: int
    rope: tuple[int, int, int]
    double: int
    single: int
    text_dim: int
    pooled_dim: int
    lora_rank: int
    target_px: int
    condition_px: int
    text_tokens: int
    steps: int
    max_batch: int

    @property
    def blocks(self) -> int:
        return self.double + self.single

    def tokens(self, px: int) -> int:
        return (px // 16) ** 2  # 8x VAE, 2x2 packing


FLUX_DEV = Shape(heads=24, head_dim=128, rope=(16, 56, 56), double=FULL_DOUBLE, single=FULL_SINGLE, text_dim=4096,
                 pooled_dim=768, lora_rank=256, target_px=1024, condition_px=512, text_tokens=512, steps=28,
                 max_batch=32)
SMALL = Shape(heads=2, head_dim=16, rope=(4, 6, 6), double=1, single=2, text_dim=32, pooled_dim=32, lora_rank=4,
              target_px=128, condition_px=64, text_tokens=16, steps=4, max_batch=4)


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Modules created inside get their weights on `device` in `dtype` (no host copy, no download)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(shape: Shape, device: torch.device, dtype: torch.dtype) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    with built_on(device, dtype):
        transformer = FluxTransformer2DModel(
            in_channels=64, num_layers=shape.double, num_single_layers=shape.single, attention_head_dim=shape.head_dim,
            num_attention_heads=shape.heads, joint_attention_dim=shape.text_dim, pooled_projection_dim=shape.pooled_dim,
            guidance_embeds=True, axes_dims_rope=shape.rope,
        )
        add_lora(transformer, rank=shape.lora_rank, target_modules="paper")
    dead = set(dead_end_lora_parameters(transformer))
    for name, p in transformer.named_parameters():  # as ReflectionTuningModule.configure_model
        if name in dead:
            p.requires_grad_(False)
        elif p.requires_grad:
            p.data = p.data.float()
    return transformer.train()


def blocks_that_fit(device: torch.device) -> tuple[int, int]:
    """Double and single blocks to build: all 57 if weights + LoRA training states take at most ~55% of
    the card (the rest for activations), else proportionally fewer (figures then extrapolated per block)."""
    if device.type != "cuda":
        return FULL_DOUBLE, FULL_SINGLE
    free, _ = torch.cuda.mem_get_info(device)
    # bf16 FLUX.1-dev 23.8 GB + r256 LoRA fp32 3.7 GB x (weights, grads, 4 Prodigy states without p0 of B) ~ 44 GB
    needed = 44e9
    scale = min(1.0, 0.55 * free / needed)
    return max(1, round(FULL_DOUBLE * scale)), max(2, round(FULL_SINGLE * scale))


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_seconds(self, fn, repeats: int, warmup=None) -> float:
        """Median wall time of `fn` over `repeats` runs after one warm-up run (of `warmup` if given: the
        same code, cheaper)."""
        (warmup or fn)()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def peak_gb(self) -> str:
        if self.device.type != "cuda":
            return "peak n/a (CPU)"
        return f"peak {torch.cuda.max_memory_allocated(self.device) / 1e9:5.1f} GB (of the blocks built)"

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


class Inputs:
    """Random latents and text embeddings of one batch at the shape's resolutions, on the device."""

    def __init__(self, shape: Shape, batch: int, device: torch.device, dtype: torch.dtype):
        g = torch.Generator(device).manual_seed(batch)
        self.target = torch.randn(batch, shape.tokens(shape.target_px), 64, generator=g, device=device)
        self.cond = torch.randn(batch, shape.tokens(shape.condition_px), 64, generator=g, device=device, dtype=dtype)
        self.t5 = torch.randn(batch, shape.text_tokens, shape.text_dim, generator=g, device=device, dtype=dtype)
        self.pooled = torch.randn(batch, shape.pooled_dim, generator=g, device=device, dtype=dtype)
        side = shape.target_px // 16 * 2
        self.img_ids = latent_ids(side, side, device=device, dtype=dtype)
        self.cond_ids = condition_ids(shape.condition_px, device=device, dtype=dtype)
        self.txt_ids = torch.zeros(shape.text_tokens, 3, device=device, dtype=dtype)
        self.guidance = torch.ones(batch, device=device)
        self.generator = torch.Generator(device).manual_seed(0)


class TrainingBench:
    def __init__(self, transformer, shape: Shape, device: torch.device, dtype: torch.dtype, timer: Timer):
        self.transformer, self.shape, self.device, self.dtype, self.timer = transformer, shape, device, dtype, timer
        params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = Prodigy(params, lr=1.0, use_bias_correction=True, safeguard_warmup=True, weight_decay=0.01)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, inputs: Inputs, stock: bool) -> None:
        model, dtype = self.transformer, self.dtype

        def corrector(xt, t):
            return corrector_forward(
                model, hidden_states=xt.to(dtype), encoder_hidden_states=inputs.t5, pooled_projections=inputs.pooled,
                timestep=t.to(dtype), img_ids=inputs.img_ids, txt_ids=inputs.txt_ids, guidance=inputs.guidance,
                cond_hidden_states=inputs.cond, cond_ids=inputs.cond_ids,
            )

        def stock_flux(xt, t):  # the same tokens as one joint image sequence through diffusers' forward
            joint = torch.cat([xt.to(dtype), inputs.cond], dim=1)
            out = model(hidden_states=joint, encoder_hidden_states=inputs.t5, pooled_projections=inputs.pooled,
                        timestep=t.to(dtype), img_ids=torch.cat([inputs.img_ids, inputs.cond_ids]),
                        txt_ids=inputs.txt_ids, guidance=inputs.guidance).sample
            return out[:, : xt.shape[1]]

        with self._autocast():
            loss = flow_matching_loss(stock_flux if stock else corrector, inputs.target, inputs.generator)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def measure(self, batch: int, stock: bool, repeats: int) -> tuple[float, str] | None:
        """(seconds per step, peak memory) or None when the batch does not fit."""
        self.timer.reset_peak()
        try:
            inputs = Inputs(self.shape, batch, self.device, self.dtype)
            seconds = self.timer.median_seconds(lambda: self.step(inputs, stock), repeats)
            return seconds, self.timer.peak_gb()
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        finally:
            self.timer.reset_peak()

    def largest_batch(self, repeats: int) -> tuple[int, tuple[float, str]]:
        """Doubling from 2 until a step does not fit; the last batch that did, with its figures."""
        best, batch = None, 2
        while batch <= self.shape.max_batch:
            result = self.measure(batch, stock=False, repeats=repeats)
            if result is None:
                break
            best, batch = (batch, result), batch * 2
        return best


def print_training(bench: TrainingBench, extrapolate: float, note: str, repeats: int) -> None:
    for checkpointing in (True, False):
        if checkpointing:
            bench.transformer.enable_gradient_checkpointing()
        else:
            bench.transformer.disable_gradient_checkpointing()
        label = "checkpointing" if checkpointing else "no checkpointing"
        rows = [(1, bench.measure(1, stock=False, repeats=repeats))]
        if rows[0][1] is not None:
            largest = bench.largest_batch(repeats)
            if largest is not None:
                rows.append(largest)
        for batch, result in rows:
            if result is None:
                print(f"train step  {label:16s} batch {batch:2d}: does not fit{note}")
                continue
            seconds, peak = result
            stock = bench.measure(batch, stock=True, repeats=repeats)
            ratio = f"{seconds / stock[0]:.3f}x stock ({stock[0] * extrapolate:.3f} s)" if stock else "stock OOM"
            print(f"train step  {label:16s} batch {batch:2d}: {seconds * extrapolate:7.3f} s/step "
                  f"{batch / (seconds * extrapolate):6.2f} samples/s  {peak}  {ratio}{note}")


@torch.no_grad()
def print_sampling(transformer, shape: Shape, device, dtype, timer: Timer, extrapolate: float, note: str) -> None:
    inputs = Inputs(shape, 1, device, dtype)
    common = dict(encoder_hidden_states=inputs.t5, pooled_projections=inputs.pooled, txt_ids=inputs.txt_ids,
                  guidance=inputs.guidance, img_ids=inputs.img_ids)

    def sample(attention: str, steps: int = shape.steps):
        def run():
            latents = inputs.target.to(dtype)
            extra = dict(cond_hidden_states=inputs.cond, cond_ids=inputs.cond_ids)
            if attention == "causal":
                extra = dict(cond_cache=build_condition_cache(transformer, pooled_projections=inputs.pooled, **extra))
            for step in range(steps):
                t = torch.full((1,), 1 - step / steps, device=device, dtype=dtype)
                velocity = corrector_forward(transformer, hidden_states=latents, timestep=t, attention=attention,
                                             **extra, **common)
                latents = latents - velocity / steps
        return run

    union = timer.median_seconds(sample("union"), 1, warmup=sample("union", 2)) * extrapolate
    causal = timer.median_seconds(sample("causal"), 1, warmup=sample("causal", 2)) * extrapolate
    print(f"{shape.steps}-step corrected image: union {union:.2f} s, causal + KV cache {causal:.2f} s, "
          f"{union / causal:.2f}x faster{note}")


def full_size_pipeline(transformer, shape: Shape, device, dtype):
    """A FluxPipeline around `transformer`: FLUX.1-dev's VAE, CLIP-L and T5-XXL sizes (toy sizes with
    --small), random weights, tokenizers built by rule (reflectionflow.models.tiny)."""
    from diffusers import AutoencoderKL, FluxPipeline

    from reflectionflow.models.tiny import (
        _corpus,
        build_tokenizers,
        clip_text_encoder,
        flux_dev_scheduler,
        t5_encoder,
    )

    clip_tok, t5_tok = build_tokenizers(_corpus())
    small = shape.text_dim < 4096
    with built_on(device, dtype):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
            block_out_channels=(8, 8, 16, 16) if small else (128, 256, 512, 512), layers_per_block=1 if small else 2,
            norm_num_groups=8 if small else 32, use_quant_conv=False, use_post_quant_conv=False,
        )
        clip = clip_text_encoder(clip_tok, **(
            dict(hidden_size=shape.pooled_dim, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                 projection_dim=shape.pooled_dim) if small else
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768)))
        t5 = t5_encoder(t5_tok, **(
            dict(d_model=shape.text_dim, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8)
            if small else
            dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")))
    flux = FluxPipeline(transformer=transformer.eval(), vae=vae.eval(), text_encoder=clip.eval(),
                        text_encoder_2=t5.eval(), tokenizer=clip_tok, tokenizer_2=t5_tok, scheduler=flux_dev_scheduler())
    flux.set_progress_bar_config(disable=True)
    return flux


def print_search(transformer, shape: Shape, device, dtype, timer: Timer, extrapolate: float, note: str) -> None:
    import numpy as np
    from PIL import Image

    from reflectionflow.models.pipeline import ReflectionFluxPipeline

    flux = full_size_pipeline(transformer, shape, device, dtype)
    width = 4
    rng = np.random.default_rng(0)
    flawed = [Image.fromarray(rng.integers(0, 256, (shape.target_px, shape.target_px, 3), dtype=np.uint8))
              for _ in range(width)]
    prompts = ["a photo of a red bench and a blue cat"] * width
    reflections = [f"make object {i} larger and move it to the left" for i in range(width)]
    for attention in ("union", "causal"):
        pipe = ReflectionFluxPipeline(flux, attention=attention, condition_size=shape.condition_px,
                                      max_sequence_length=shape.text_tokens, micro_batch=width)
        noises = torch.stack([pipe.initial_noise(seed, shape.target_px, shape.target_px) for seed in range(width)])

        def round_of_chains(steps: int = shape.steps, pipe=pipe, noises=noises):
            pipe.generate(prompts, noises=noises, height=shape.target_px, width=shape.target_px, conditions=flawed,
                          reflections=reflections, num_inference_steps=steps)

        seconds = timer.median_seconds(round_of_chains, 1, warmup=lambda: round_of_chains(2)) * extrapolate
        print(f"search width {width} ({attention:6s}): {width / seconds:.3f} corrected images/s "
              f"({seconds:.1f} s per round of {width} chains, {shape.steps} steps, VAE + text encoders included){note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="toy width on the CPU (tests the script)")
    parser.add_argument("--repeats", type=int, default=1, help="timed training steps per figure after a warm-up")
    args = parser.parse_args()
    if args.small:
        device, dtype, shape = torch.device("cpu"), torch.float32, SMALL
        torch.set_num_threads(2)
        print("device: CPU (--small: toy width, the same code)")
    elif not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing measured (python benchmarks/gpu.py --small runs the code on CPU)")
        return
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        double, single = blocks_that_fit(device)
        shape = replace(FLUX_DEV, double=double, single=single)
        print(f"device: {torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 1e9:.0f} GB")
    extrapolate = (FULL_DOUBLE + FULL_SINGLE) / shape.blocks if not args.small else 1.0
    note = f"  (extrapolated from {shape.blocks} of 57 blocks)" if extrapolate != 1.0 else ""
    print(f"transformer: hidden {shape.heads * shape.head_dim} ({shape.heads} heads x {shape.head_dim}), "
          f"{shape.double} + {shape.single} blocks, LoRA r{shape.lora_rank}; tokens: target "
          f"{shape.tokens(shape.target_px)} ({shape.target_px} px), condition {shape.tokens(shape.condition_px)} "
          f"({shape.condition_px} px), text {shape.text_tokens}")
    start = time.perf_counter()
    timer = Timer(device)
    transformer = build_transformer(shape, device, dtype)
    bench = TrainingBench(transformer, shape, device, dtype, timer)
    print_training(bench, extrapolate, note, args.repeats)
    del bench
    transformer.disable_gradient_checkpointing()
    transformer.zero_grad(set_to_none=True)
    timer.reset_peak()
    print_sampling(transformer, shape, device, dtype, timer, extrapolate, note)
    print_search(transformer, shape, device, dtype, timer, extrapolate, note)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
