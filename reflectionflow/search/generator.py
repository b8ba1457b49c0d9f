"""The generator interface the search drives, a deterministic backend, and the FLUX adapter.

One round's chains go through `Generator.generate` as one call; the generator micro-batches them and
reports each image through `on_result` as soon as its micro-batch is done, so the engine can verify
image i while image i+1's micro-batch is still denoising.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from reflectionflow.models.loading import LORA_WEIGHT_NAME

log = logging.getLogger(__name__)
ResultCallback = Callable[[int, "GenerationResult"], None]


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make. `condition` None = the base model; otherwise the corrector regenerates it.

    `prompt` is the text used for this image (maybe refined); the pooled CLIP text is `original_prompt`.
    `noise` (the packed initial noise) overrides `seed` when given.
    """

    prompt: str
    original_prompt: str
    seed: int
    noise: torch.Tensor | None = None
    condition: Image.Image | None = None
    reflection: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    image: Image.Image
    nfe: int  # transformer forward passes this image cost


class Generator(Protocol):
    def initial_noise(self, seed: int) -> torch.Tensor:
        """The initial noise `seed` stands for (zero-order search perturbs it)."""
        ...

    def generate(
        self, requests: Sequence[GenerationRequest], on_result: ResultCallback | None = None
    ) -> list[GenerationResult]:
        """Make one image per request, in order; call `on_result(i, result)` as each one is ready."""
        ...


def corrector_settings_of(
    lora_path: str | None,
    *,
    attention: str | None,
    lora_on_target: bool | None,
    condition_size: int | None,
    condition_position: str | None,
    max_sequence_length: int | None,
):
    """The corrector settings `FluxGenerator` samples `lora_path` with: the LoRA's (`models.settings`),
    with the generator's explicit values (None = not set) checked against them; every bad value fails
    before loading."""
    from reflectionflow.config import check_option
    from reflectionflow.models import settings as corrector_settings
    from reflectionflow.models.corrector import ATTENTION_MODES, CONDITION_POSITIONS
    from reflectionflow.models.loading import resolve_lora_path

    if condition_position is not None:
        check_option("generator.condition_position", condition_position, CONDITION_POSITIONS)
    if attention is not None:
        check_option("generator.attention", attention, ATTENTION_MODES)
    explicit = dict(attention=attention, lora_on_target=lora_on_target, condition_size=condition_size,
                    condition_position=condition_position, max_sequence_length=max_sequence_length)
    if lora_path is not None:
        lora_path = resolve_lora_path(lora_path, "generator.lora_path")
    keys = {name: f"generator.{name}" for name in explicit}
    keys["max_sequence_length"] = "generator.corrector_max_sequence_length"
    return corrector_settings.resolve(lora_path, explicit, keys)


def _micro_batches(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass
class DeterministicGenerator:
    """Renders a blocky image from a hash of everything that would influence a real generator.

    For tests and the synthetic benchmark: equal requests give equal images, a different prompt, noise,
    reflection or condition gives a different one. NFE is `num_inference_steps` per image;
    `seconds_per_image` emulates compute. Every request is kept in `requests` for inspection.
    """

    size: int = 64
    num_inference_steps: int = 28
    micro_batch: int = 4
    seconds_per_image: float = 0.0
    noise_shape: tuple[int, ...] = (16, 8, 8)
    requests: list[GenerationRequest] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def initial_noise(self, seed: int) -> torch.Tensor:
        return torch.randn(tuple(self.noise_shape), generator=torch.Generator().manual_seed(seed))

    def generate(
        self, requests: Sequence[GenerationRequest], on_result: ResultCallback | None = None
    ) -> list[GenerationResult]:
        with self._lock:
            self.requests.extend(requests)
        results: list[GenerationResult] = []
        for batch in _micro_batches(len(requests), self.micro_batch):
            time.sleep(self.seconds_per_image * len(batch))
            for i in batch:
                results.append(GenerationResult(self._render(requests[i]), self.num_inference_steps))
                if on_result is not None:
                    on_result(i, results[i])
        return results

    def _render(self, request: GenerationRequest) -> Image.Image:
        digest = hashlib.sha256()
        noise = request.noise if request.noise is not None else self.initial_noise(request.seed)
        for part in (request.prompt, request.original_prompt, request.reflection or ""):
            digest.update(part.encode() + b"\0")
        digest.update(noise.numpy().tobytes())
        if request.condition is not None:
            digest.update(request.condition.tobytes())
        rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
        blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        return Image.fromarray(blocks).resize((self.size, self.size), Image.Resampling.NEAREST)


class FluxGenerator:
    """The search's generator over `ReflectionFluxPipeline`: base FLUX for requests without a condition,
    the corrector (base + reflection LoRA, flawed image as condition) for the others.

    A thin adapter: it only turns requests into the pipeline's batched calls, one micro-batch at a time so
    the engine can score finished images while the next micro-batch denoises. The corrector's sampling
    settings (`attention`, `lora_on_target`, `condition_size`, `condition_position`,
    `corrector_max_sequence_length`) and the base model default to those the LoRA carries
    (`models.settings`); None = take the LoRA's, a value that contradicts them fails before loading.
    `text_cache_size` bounds the pipeline's CPU cache of text embeddings (entries, 4 MiB each at 512 T5
    tokens in bf16). `reflection_guidance_scale` (None = off) guides corrections by their reflection apart
    from their prompt (`ReflectionFluxPipeline.generate`), one more forward pass per step.
    """

    def __init__(
        self,
        model_path: str | None = None,
        lora_path: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        reflection_guidance_scale: float | None = None,
        attention: str | None = None,
        lora_on_target: bool | None = None,
        condition_size: int | None = None,
        condition_position: str | None = None,
        micro_batch: int = 4,
        max_sequence_length: int = 512,
        corrector_max_sequence_length: int | None = None,
        lora_weight_name: str = LORA_WEIGHT_NAME,
        text_cache_size: int = 256,
        cpu_offload: bool = False,
        compile: bool = False,
    ):
        from reflectionflow.models.pipeline import ReflectionFluxPipeline

        if micro_batch < 1:
            raise ValueError(f"generator.micro_batch must be >= 1, got {micro_batch}")
        if reflection_guidance_scale is not None and reflection_guidance_scale < 0:
            raise ValueError(f"generator.reflection_guidance_scale must be >= 0 or null, got {reflection_guidance_scale}")
        settings = corrector_settings_of(
            lora_path,
            attention=attention,
            lora_on_target=lora_on_target,
            condition_size=condition_size,
            condition_position=condition_position,
            # without a LoRA the (untrained) corrector reads the base model's T5 length
            max_sequence_length=corrector_max_sequence_length or (None if lora_path else max_sequence_length),
        )
        if model_path is None:
            model_path = settings.base_model
        elif lora_path is not None and model_path != settings.base_model:
            log.warning("the corrector LoRA %s was trained on %s; sampling it on generator.model_path=%s",
                        lora_path, settings.base_model, model_path)
        self.pipeline = ReflectionFluxPipeline.from_pretrained(
            model_path,
            lora_path,
            dtype=dtype,
            device="cpu" if cpu_offload else device,
            lora_weight_name=lora_weight_name,
            settings=settings,
            micro_batch=micro_batch,
            max_sequence_length=max_sequence_length,
            text_cache_size=text_cache_size,
        )
        self._accelerate(device, cpu_offload, compile)
        self.height, self.width = height, width
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.true_cfg_scale = true_cfg_scale
        self.reflection_guidance_scale = reflection_guidance_scale
        self.micro_batch = micro_batch

    def _accelerate(self, device: str, cpu_offload: bool, compile: bool) -> None:
        """`cpu_offload`: weights rest in CPU memory and each component runs on `device` in turn (FLUX.1-dev
        on a ~24 GB card, slower); `compile`: `torch.compile` of the transformer blocks (the first images
        of each kind, base / corrector / causal, pay the compilation)."""
        if cpu_offload:
            self.pipeline.enable_model_cpu_offload(device)
        if compile:
            self.pipeline.compile_transformer()

    def initial_noise(self, seed: int) -> torch.Tensor:
        return self.pipeline.initial_noise(seed, self.height, self.width)

    def generate(
        self, requests: Sequence[GenerationRequest], on_result: ResultCallback | None = None
    ) -> list[GenerationResult]:
        nfe = {
            False: self.pipeline.nfe_per_image(self.num_inference_steps, self.true_cfg_scale),
            True: self.pipeline.nfe_per_image(
                self.num_inference_steps, self.true_cfg_scale, self.reflection_guidance_scale
            ),
        }
        results: list[GenerationResult | None] = [None] * len(requests)
        base = [i for i, r in enumerate(requests) if r.condition is None]
        corrected = [i for i, r in enumerate(requests) if r.condition is not None]
        for group in (base, corrected):
            for batch in _micro_batches(len(group), self.micro_batch):
                indices = [group[j] for j in batch]
                chunk = [requests[i] for i in indices]
                noises = torch.stack(
                    [r.noise if r.noise is not None else self.initial_noise(r.seed) for r in chunk]
                )
                images = self.pipeline.generate(
                    [r.prompt for r in chunk],
                    noises=noises,
                    height=self.height,
                    width=self.width,
                    conditions=None if group is base else [r.condition for r in chunk],
                    reflections=[r.reflection for r in chunk],
                    original_prompts=[r.original_prompt for r in chunk],
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    true_cfg_scale=self.true_cfg_scale,
                    reflection_guidance_scale=self.reflection_guidance_scale,
                )
                for index, image in zip(indices, images, strict=True):
                    results[index] = GenerationResult(image, nfe[group is corrected])
                    if on_result is not None:
                        on_result(index, results[index])
        return results
