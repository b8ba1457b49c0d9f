"""The reflection corrector: FLUX with a third token stream for the flawed image.

One joint-attention sequence per sample in every block: `[text | target | condition]`. Text and target
tokens go through diffusers' stock blocks unchanged; the condition stream is the small part diffusers has
no hook for: per block, an attention processor swapped in for the call adds the condition's keys and
values (and computes the condition's own attention output), and the condition's modulation (timestep 0,
guidance 1), MLP and residual run with the block's own weights.

- `latents.py`: packing latents into tokens, and the RoPE ids of target and condition tokens
- `attention.py`: the attention processor that joins the condition's keys/values to the block's attention
- `condition_stream.py`: the condition's per-block steps before and after that attention
- `forward.py`: `corrector_forward`, `build_condition_cache` and what training needs (FSDP2, dead-end LoRA)
"""

from reflectionflow.models.corrector.attention import ATTENTION_MODES
from reflectionflow.models.corrector.forward import (
    ConditionKVCache,
    build_condition_cache,
    corrector_forward,
    dead_end_lora_parameters,
)
from reflectionflow.models.corrector.latents import (
    CONDITION_POSITIONS,
    condition_ids,
    latent_ids,
    pack_latents,
    unpack_latents,
)

__all__ = [
    "ATTENTION_MODES",
    "CONDITION_POSITIONS",
    "ConditionKVCache",
    "build_condition_cache",
    "condition_ids",
    "corrector_forward",
    "dead_end_lora_parameters",
    "latent_ids",
    "pack_latents",
    "unpack_latents",
]
