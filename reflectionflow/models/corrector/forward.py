"""The corrector's forward pass, the condition KV cache, and what FSDP2 and LoRA training need from them.

Every block runs diffusers' stock code over `[text | target]` with the condition attention processor swapped
in, then the condition stream's update with the same block's weights.

LoRA placement follows the paper's code: with `lora_on_target=False` the adapter path of the image-stream
layers (`x_embedder`; double-block `norm1`, `attn.to_q/k/v/out`, `ff`; every single-block layer) is
skipped for text/target tokens and taken for condition tokens. The switch happens inside each block
function, so gradient-checkpoint recomputation sees the same setting.

`attention="causal"` lets condition tokens attend only to themselves, so their keys/values depend only on
the condition latents and the pooled prompt: `build_condition_cache` computes them once and
`corrector_forward(..., cond_cache=...)` reuses them for every step and chain.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from reflectionflow.config import check_option
from reflectionflow.models.corrector.attention import ATTENTION_MODES, KV, Rope, attend, condition_attention
from reflectionflow.models.corrector.condition_stream import DOUBLE_BLOCK, SINGLE_BLOCK, ConditionStream
from reflectionflow.models.lora import DOUBLE_BLOCK_IMAGE_STREAM, lora_disabled, lora_layers


@dataclass
class ConditionKVCache:
    """Per-block keys/values of condition tokens (causal mode), each (B_cond, N_cond, heads, head_dim).

    B_cond is 1 (shared by every sample of a batch) or the batch size; `select` picks rows for chains.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def select(self, index: torch.Tensor | list[int]) -> ConditionKVCache:
        index = torch.as_tensor(index, device=self.keys[0].device, dtype=torch.long)
        return ConditionKVCache([k[index] for k in self.keys], [v[index] for v in self.values])

    def per_block(self) -> list[KV]:
        return list(zip(self.keys, self.values, strict=True))


@dataclass(frozen=True)
class CorrectorBlock:
    """One FLUX block as the corrector runs it.

    `target_lora_filter` picks the block's LoRA layers that text/target tokens pass through (None: all of
    them, as single blocks run every token through the same layers). In the `last` block the condition's
    update is skipped: it feeds nothing.
    """

    module: nn.Module
    condition_stream: ConditionStream
    target_lora_filter: re.Pattern | None
    last: bool


@dataclass(frozen=True)
class SharedBlockInputs:
    """What every block of one forward reads and none changes; the condition's entries are None without a
    condition (or with a cached one)."""

    attention: str
    lora_on_target: bool
    temb: torch.Tensor
    rope: Rope
    cond_temb: torch.Tensor | None
    cond_rope: Rope | None


def _corrector_blocks(transformer) -> list[CorrectorBlock]:
    kinds = [(b, DOUBLE_BLOCK, DOUBLE_BLOCK_IMAGE_STREAM) for b in transformer.transformer_blocks]
    kinds += [(b, SINGLE_BLOCK, None) for b in transformer.single_transformer_blocks]
    return [CorrectorBlock(*kind, last=i == len(kinds) - 1) for i, kind in enumerate(kinds)]


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _call_as_forward(module: nn.Module, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, run as `module`'s forward when FSDP2 shards `module`.

    The corrector uses a block's (or the root's) layers outside the stock `forward`, so FSDP2's hooks
    (all-gather before, reshard and gradient reduce-scatter after) must wrap the whole computation.
    """
    if not _is_fsdp(module):
        return fn(*args, **kwargs)
    module.forward = fn  # an instance attribute shadows the class forward for this one call
    try:
        return module(*args, **kwargs)
    finally:
        del module.forward


def _run_block(
    block: CorrectorBlock,
    shared: SharedBlockInputs,
    hidden: torch.Tensor,
    text: torch.Tensor,
    cond: torch.Tensor | None,
    cond_kv: KV | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One FLUX block over `[text | target]` (stock code) plus the condition stream, if any.

    `hidden`, `text` and `cond` are explicit arguments, so gradient checkpointing sees the tensors that
    carry gradients; `cond_kv` is this block's cached condition keys/values (causal inference) or None.
    """
    module, stream = block.module, block.condition_stream
    stock = functools.partial(type(module).forward, module) if _is_fsdp(module) else module
    cond_qkv = modulation = None
    if cond is not None:
        cond_qkv, modulation = stream.before_attention(module, cond, shared.cond_temb, shared.cond_rope)
    target_lora = [] if shared.lora_on_target else lora_layers(module, block.target_lora_filter)
    with (
        condition_attention(module.attn, shared.attention, cond_qkv=cond_qkv, cond_kv=cond_kv) as processor,
        lora_disabled(target_lora),
    ):
        text, hidden = stock(
            hidden_states=hidden, encoder_hidden_states=text, temb=shared.temb, image_rotary_emb=shared.rope
        )
    if cond is not None and not block.last:
        cond = stream.after_attention(module, cond, processor.cond_output, modulation)
    return hidden, text, cond


def dead_end_lora_parameters(transformer, lora_on_target: bool = False) -> list[str]:
    """LoRA parameters the corrector never uses, so they can never get a gradient.

    With `lora_on_target=False` the LoRA only acts on condition tokens, and the last block's condition
    update is skipped (it feeds nothing): that block's query, MLP and output-projection adapters are dead
    ends. Freezing them keeps DDP from waiting for their gradients (no `find_unused_parameters`).
    """
    if lora_on_target:
        return []
    last = f"single_transformer_blocks.{len(transformer.single_transformer_blocks) - 1}."
    dead = (last + "attn.to_q.", last + "proj_mlp.", last + "proj_out.")
    return [n for n, _ in transformer.named_parameters() if "lora_" in n and n.startswith(dead)]


def _check(name: str, tensor: torch.Tensor | None, expected: str, ok: bool) -> None:
    if not ok:
        shape = None if tensor is None else tuple(tensor.shape)
        raise ValueError(f"{name}: expected {expected}, got shape {shape}")


def _cond_embedding(transformer, pooled_projections, dtype):
    """Condition tokens' AdaLN embedding: timestep 0 and guidance 1, with the prompt's pooled embedding."""
    batch = pooled_projections.shape[0]
    zero = torch.zeros(batch, device=pooled_projections.device, dtype=dtype)
    if transformer.config.guidance_embeds:
        return transformer.time_text_embed(zero, torch.full_like(zero, 1000.0), pooled_projections)
    return transformer.time_text_embed(zero, pooled_projections)


def build_condition_cache(
    transformer,
    *,
    cond_hidden_states: torch.Tensor,
    cond_ids: torch.Tensor,
    pooled_projections: torch.Tensor,
) -> ConditionKVCache:
    """Keys/values of the condition tokens in every block, for `attention="causal"` inference.

    They depend only on the condition latents and the pooled prompt embedding, so one cache serves all
    denoising steps and all chains that share the (flawed image, prompt) pair.
    """
    _check("cond_hidden_states", cond_hidden_states, "(B, N_cond, in_channels)", cond_hidden_states.ndim == 3)
    _check("cond_ids", cond_ids, f"({cond_hidden_states.shape[1]}, 3)",
           tuple(cond_ids.shape) == (cond_hidden_states.shape[1], 3))
    cond = transformer.x_embedder(cond_hidden_states)
    cond_temb = _cond_embedding(transformer, pooled_projections, cond.dtype)
    cond_rope = transformer.pos_embed(cond_ids)
    keys, values = [], []
    for block in _corrector_blocks(transformer):
        module, stream = block.module, block.condition_stream
        (query, key, value), modulation = stream.before_attention(module, cond, cond_temb, cond_rope)
        keys.append(key)
        values.append(value)
        if not block.last:
            attention_output = attend(query, key, value, module.attn.processor)
            cond = stream.after_attention(module, cond, attention_output, modulation)
    return ConditionKVCache(keys, values)


def corrector_forward(
    transformer,
    *,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    cond_hidden_states: torch.Tensor | None = None,
    cond_ids: torch.Tensor | None = None,
    attention: str = "union",
    lora_on_target: bool = False,
    cond_cache: ConditionKVCache | None = None,
) -> torch.Tensor:
    """Velocity for the target tokens, `(B, N_target, C)`; see the module docstring for the semantics.

    `cond_cache` (from `build_condition_cache`, causal mode only) replaces `cond_hidden_states`/`cond_ids`.
    With no condition and no active LoRA on the text/target path this equals the stock FLUX forward exactly.
    """
    config = transformer.config
    check_option("attention", attention, ATTENTION_MODES)
    _check("hidden_states", hidden_states, f"(B, N_target, {config.in_channels})",
           hidden_states.ndim == 3 and hidden_states.shape[-1] == config.in_channels)
    batch, n_target = hidden_states.shape[:2]
    _check("encoder_hidden_states", encoder_hidden_states, f"({batch}, L, {config.joint_attention_dim})",
           encoder_hidden_states.ndim == 3 and encoder_hidden_states.shape[0] == batch
           and encoder_hidden_states.shape[-1] == config.joint_attention_dim)
    _check("pooled_projections", pooled_projections, f"({batch}, {config.pooled_projection_dim})",
           tuple(pooled_projections.shape) == (batch, config.pooled_projection_dim))
    _check("timestep", timestep, f"({batch},)", timestep.ndim == 1 and timestep.shape[0] == batch)
    _check("img_ids", img_ids, f"({n_target}, 3) matching hidden_states tokens",
           tuple(img_ids.shape) == (n_target, 3))
    n_text = encoder_hidden_states.shape[1]
    _check("txt_ids", txt_ids, f"({n_text}, 3) matching encoder_hidden_states tokens",
           tuple(txt_ids.shape) == (n_text, 3))
    if cond_hidden_states is not None:
        if cond_ids is None:
            raise ValueError(
                f"cond_ids: required with cond_hidden_states of shape {tuple(cond_hidden_states.shape)}"
            )
        _check("cond_hidden_states", cond_hidden_states, f"({batch}, N_cond, {config.in_channels})",
               cond_hidden_states.ndim == 3 and cond_hidden_states.shape[0] == batch
               and cond_hidden_states.shape[-1] == config.in_channels)
        _check("cond_ids", cond_ids, f"({cond_hidden_states.shape[1]}, 3) matching cond_hidden_states tokens",
               tuple(cond_ids.shape) == (cond_hidden_states.shape[1], 3))
    elif cond_ids is not None:
        raise ValueError(f"cond_ids: given with shape {tuple(cond_ids.shape)} but cond_hidden_states is None")
    if cond_cache is not None:
        if attention != "causal":
            raise ValueError("cond_cache: a condition KV cache is only valid with attention='causal'")
        if cond_hidden_states is not None:
            raise ValueError("cond_cache: pass either cond_cache or cond_hidden_states, not both")
        if cond_cache.batch_size not in (1, batch):
            raise ValueError(
                f"cond_cache: cache batch {cond_cache.batch_size} matches neither 1 nor batch {batch}"
            )

    return _call_as_forward(
        transformer, _corrector_body, transformer,
        hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
        guidance=guidance, cond_hidden_states=cond_hidden_states, cond_ids=cond_ids, attention=attention,
        lora_on_target=lora_on_target, cond_cache=cond_cache,
    )


def _corrector_body(
    transformer, *, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
    guidance, cond_hidden_states, cond_ids, attention, lora_on_target, cond_cache,
) -> torch.Tensor:
    """`corrector_forward` after its checks, run as the root module's forward under FSDP2."""
    with lora_disabled([] if lora_on_target else lora_layers(transformer.x_embedder)):
        hidden = transformer.x_embedder(hidden_states)
    dtype = hidden.dtype
    if guidance is not None:
        temb = transformer.time_text_embed(
            timestep.to(dtype) * 1000, guidance.to(dtype) * 1000, pooled_projections
        )
    else:
        temb = transformer.time_text_embed(timestep.to(dtype) * 1000, pooled_projections)
    text = transformer.context_embedder(encoder_hidden_states)
    cond = cond_temb = cond_rope = None
    if cond_hidden_states is not None:
        cond = transformer.x_embedder(cond_hidden_states)
        cond_temb = _cond_embedding(transformer, pooled_projections, dtype)
        cond_rope = transformer.pos_embed(cond_ids)
    shared = SharedBlockInputs(
        attention=attention,
        lora_on_target=lora_on_target,
        temb=temb,
        rope=transformer.pos_embed(torch.cat([txt_ids, img_ids], dim=0)),
        cond_temb=cond_temb,
        cond_rope=cond_rope,
    )
    cached = cond_cache.per_block() if cond_cache is not None else None

    for i, block in enumerate(_corrector_blocks(transformer)):
        cond_kv = cached[i] if cached else None
        if torch.is_grad_enabled() and transformer.gradient_checkpointing:
            hidden, text, cond = checkpoint(
                _call_as_forward, block.module, _run_block, block, shared, hidden, text, cond, cond_kv,
                use_reentrant=False,
            )
        else:
            hidden, text, cond = _call_as_forward(
                block.module, _run_block, block, shared, hidden, text, cond, cond_kv
            )

    hidden = transformer.norm_out(hidden, temb)
    return transformer.proj_out(hidden)
