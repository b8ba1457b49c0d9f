"""The corrector's LoRA adapter: the paper's target modules, rank 256 by default, diffusers-format files,
and the per-layer switch that skips the adapter for some tokens (text and target tokens in the corrector,
every token in the base model)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from reflectionflow.models.settings import CorrectorSettings

ADAPTER_NAME = "reflection"

# The paper's target set (OminiControl's): the image-stream layers of every block plus x_embedder. A regex,
# so single-block `proj_out` is taken and the final `proj_out` is not.
PAPER_TARGET_MODULES = (
    r"^(x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_q|attn\.to_k|attn\.to_v))$"
)
# The paper's set plus the double blocks' text-stream layers: the text tokens' own projections, modulation
# and MLP, so the corrector can also learn how to read a reflection (these apply to every token).
PAPER_AND_TEXT_TARGET_MODULES = (
    PAPER_TARGET_MODULES[:-2]
    + r"|transformer_blocks\.\d+\.(norm1_context\.linear|attn\.add_[qkv]_proj|attn\.to_add_out|ff_context\.net\.2))$"
)
TARGET_PRESETS = {"paper": PAPER_TARGET_MODULES, "paper_and_text": PAPER_AND_TEXT_TARGET_MODULES}
# Double-block layers that process the image stream (the text stream has its own `*_context`/`add_*` layers),
# as names relative to the block.
DOUBLE_BLOCK_IMAGE_STREAM = re.compile(
    r"^(norm1\.linear|attn\.to_[qkv]|attn\.to_out\.0|ff\.net\.\d+(\.proj)?)(\.|$)"
)


def add_lora(
    transformer,
    rank: int = 256,
    alpha: float | None = None,
    target_modules: str | list[str] = "paper",
    dropout: float = 0.0,
    adapter_name: str = ADAPTER_NAME,
    init: str | bool = "gaussian",
):
    """Add a trainable peft LoRA to `transformer` (freezing the rest); returns the adapter's parameters.

    `target_modules` is a preset name (`paper`), a regex, or a list of module-name suffixes (peft rules).
    `alpha` defaults to `rank` (scale 1).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    if isinstance(target_modules, str):
        target_modules = TARGET_PRESETS.get(target_modules, target_modules)
    else:
        target_modules = list(target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=init,
        target_modules=target_modules,
    )
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=adapter_name)
    transformer.set_adapter(adapter_name)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(transformer, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's (diffusers-compatible) key names."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def save_lora(
    transformer,
    directory: str | os.PathLike,
    settings: CorrectorSettings,
    adapter_name: str = ADAPTER_NAME,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter in diffusers format (`FluxPipeline.load_lora_weights(directory)` reads it) and
    the settings it was trained with (`reflectionflow.json`, read back when it is sampled).

    The peft config is saved as adapter metadata, so rank, alpha and targets survive a reload even when
    `alpha != rank`. `state_dict` lets distributed training pass an already-gathered full state.
    """
    from diffusers import FluxPipeline

    from reflectionflow.models.settings import write

    directory = Path(directory)
    state_dict = lora_state_dict(transformer, adapter_name) if state_dict is None else state_dict
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    FluxPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=state_dict,
        transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict(),
        safe_serialization=True,
    )
    write(settings, directory)
    return directory


def lora_layers(module: nn.Module, name_filter: re.Pattern | None = None) -> list[nn.Module]:
    """peft's LoRA layers inside `module`; with `name_filter`, only those whose name relative to `module`
    it matches (for example `DOUBLE_BLOCK_IMAGE_STREAM`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        sub for name, sub in module.named_modules()
        if isinstance(sub, BaseTunerLayer) and (name_filter is None or name_filter.match(name))
    ]


@contextlib.contextmanager
def lora_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """Skip the adapter path of `layers` (peft's per-layer switch; no LoRA matmuls are paid).

    Sets peft's `_disable_adapters` flag directly: `enable_adapters(False)` would also flip `requires_grad`
    of the adapter weights, which must keep training.
    """
    if any(getattr(layer, "merged", False) for layer in layers):
        raise ValueError(
            "a fused (merged) LoRA cannot be switched off per token; unfuse it or use lora_on_target=True"
        )
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer._disable_adapters = flag
