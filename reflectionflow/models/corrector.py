"""The reflection corrector's forward pass: FLUX with a third token stream for the flawed image.

One joint-attention sequence per sample in every block: `[text | target | condition]`. Text and target
tokens go through diffusers' stock blocks unchanged; the condition stream is the small part diffusers has
no hook for: per block, an attention processor swapped in for the call adds the condition's keys and
values (and computes the condition's own attention output), and the condition's modulation (timestep 0,
guidance 1), MLP and residual run here with the block's own weights.

LoRA placement follows the paper's code: with `lora_on_target=False` the adapter path of the image-stream
layers (`x_embedder`; double-block `norm1`, `attn.to_q/k/v/out`, `ff`; every single-block layer) is
skipped for text/target tokens and taken for condition tokens. The switch happens inside each block
function, so gradient-checkpoint recomputation sees the same setting.

`attention="causal"` lets condition tokens attend only to themselves, so their keys/values depend only on
the condition latents and the pooled prompt: `build_condition_cache` computes them once and
`corrector_forward(..., cond_cache=...)` reuses them for every step and chain.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn
from torch.utils.checkpoint import checkpoint

from reflectionflow.config import check_option
from reflectionflow.models.lora import DOUBLE_BLOCK_IMAGE_STREAM, lora_disabled, lora_layers

ATTENTION_MODES = ("union", "causal")
CONDITION_POSITIONS = ("beside", "aligned")

Rope = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Shapes and ids


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
        raise ValueError(f"tokens: {n} tokens do not tile a {height}x{width} latent (shape {tuple(tokens.shape)})")
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


# --------------------------------------------------------------------------------------------------------
# Processor swapping


@contextlib.contextmanager
def _processor(attn: nn.Module, processor) -> Iterator[None]:
    previous = attn.processor
    attn.processor = processor
    try:
        yield
    finally:
        attn.processor = previous


def _qkv(attn: nn.Module, x: torch.Tensor, rope: Rope | None):
    """Per-head, RMS-normed, rotated query/key/value of `x` through the attention's image projections."""
    query = attn.norm_q(attn.to_q(x).unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(attn.to_k(x).unflatten(-1, (-1, attn.head_dim)))
    value = attn.to_v(x).unflatten(-1, (-1, attn.head_dim))
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    return query, key, value


def _attend(attn: nn.Module, query, key, value) -> torch.Tensor:
    out = dispatch_attention_fn(
        query,
        key,
        value,
        backend=getattr(attn.processor, "_attention_backend", None),
        parallel_config=getattr(attn.processor, "_parallel_config", None),
    )
    return out.flatten(2, 3).to(query.dtype)


class ConditionAttnProcessor:
    """FLUX attention with the condition's keys/values joined to the `[text | target]` sequence.

    `cond_qkv` holds the condition's query/key/value for this block (uncached forward), `cond_kv` only its
    key/value (cached causal inference). After the call, `cond_output` holds the condition tokens' attention
    output (before `to_out`), or None when the condition's queries were not given.
    """

    def __init__(self, mode: str, cond_qkv=None, cond_kv=None):
        self.mode = mode
        self.cond_qkv = cond_qkv
        self.cond_kv = cond_kv if cond_kv is not None else (cond_qkv[1:] if cond_qkv is not None else None)
        self.cond_output: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("ConditionAttnProcessor does not support attention_mask")
        query, key, value = _qkv(attn, hidden_states, None)
        if encoder_hidden_states is not None:
            text_q = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            text_k = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        main_len = query.shape[1]
        if self.cond_kv is None:
            out = _attend(attn, query, key, value)
        else:
            cond_k, cond_v = (t.expand(query.shape[0], -1, -1, -1) for t in self.cond_kv)
            key = torch.cat([key, cond_k], dim=1)
            value = torch.cat([value, cond_v], dim=1)
            if self.cond_qkv is not None and self.mode == "union":
                out = _attend(attn, torch.cat([query, self.cond_qkv[0]], dim=1), key, value)
                out, self.cond_output = out[:, :main_len], out[:, main_len:]
            else:
                out = _attend(attn, query, key, value)
                if self.cond_qkv is not None:
                    self.cond_output = _attend(attn, *self.cond_qkv)

        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


# --------------------------------------------------------------------------------------------------------
# Condition stream: per-block pre-attention (modulation + qkv) and post-attention update


def _double_cond_pre(block, cond, cond_temb, cond_rope):
    norm_cond, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(cond, emb=cond_temb)
    return _qkv(block.attn, norm_cond, cond_rope), (gate_msa, shift_mlp, scale_mlp, gate_mlp)


def _double_cond_post(block, cond, attn_out, modulation):
    gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    attn_out = block.attn.to_out[1](block.attn.to_out[0](attn_out))
    cond = cond + gate_msa.unsqueeze(1) * attn_out
    norm_cond = block.norm2(cond) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return cond + gate_mlp.unsqueeze(1) * block.ff(norm_cond)


def _single_cond_pre(block, cond, cond_temb, cond_rope):
    norm_cond, gate = block.norm(cond, emb=cond_temb)
    mlp = block.act_mlp(block.proj_mlp(norm_cond))
    return _qkv(block.attn, norm_cond, cond_rope), (gate, mlp)


def _single_cond_post(block, cond, attn_out, modulation):
    gate, mlp = modulation
    return cond + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_out, mlp], dim=2))


_COND_STREAM = {"double": (_double_cond_pre, _double_cond_post), "single": (_single_cond_pre, _single_cond_post)}


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _module_call(module: nn.Module, fn, *args):
    """`fn(*args)`, run as `module`'s forward when FSDP2 shards `module`.

    The corrector uses a block's (or the root's) layers outside the stock `forward`, so FSDP2's hooks
    (all-gather before, reshard and gradient reduce-scatter after) must wrap the whole computation.
    """
    if not _is_fsdp(module):
        return fn(*args)
    module.forward = fn  # an instance attribute shadows the class forward for this one call
    try:
        return module(*args)
    finally:
        del module.forward


def _run_block(kind, block, stock_lora_off, mode, hidden, text, cond, temb, cond_temb, rope, cond_rope, cond_kv, last):
    """One FLUX block over `[text | target]` (stock code) plus the condition stream, if any."""
    stock = functools.partial(type(block).forward, block) if _is_fsdp(block) else block
    pre, post = _COND_STREAM[kind]
    cond_qkv = modulation = None
    if cond is not None:
        cond_qkv, modulation = pre(block, cond, cond_temb, cond_rope)
    processor = ConditionAttnProcessor(mode, cond_qkv=cond_qkv, cond_kv=cond_kv)
    with _processor(block.attn, processor), lora_disabled(stock_lora_off):
        text, hidden = stock(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
    if cond is not None and not last:  # the last block's condition output feeds nothing
        cond = post(block, cond, processor.cond_output, modulation)
    return hidden, text, cond


# --------------------------------------------------------------------------------------------------------
# Public API


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

    def per_block(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.keys, self.values, strict=True))


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


def _blocks(transformer):
    double = [("double", b) for b in transformer.transformer_blocks]
    return double + [("single", b) for b in transformer.single_transformer_blocks]


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
    _check("cond_ids", cond_ids, f"({cond_hidden_states.shape[1]}, 3)", tuple(cond_ids.shape) == (cond_hidden_states.shape[1], 3))
    cond = transformer.x_embedder(cond_hidden_states)
    cond_temb = _cond_embedding(transformer, pooled_projections, cond.dtype)
    cond_rope = transformer.pos_embed(cond_ids)
    keys, values = [], []
    blocks = _blocks(transformer)
    for i, (kind, block) in enumerate(blocks):
        pre, post = _COND_STREAM[kind]
        (query, key, value), modulation = pre(block, cond, cond_temb, cond_rope)
        keys.append(key)
        values.append(value)
        if i < len(blocks) - 1:
            cond = post(block, cond, _attend(block.attn, query, key, value), modulation)
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
    _check("img_ids", img_ids, f"({n_target}, 3) matching hidden_states tokens", tuple(img_ids.shape) == (n_target, 3))
    n_text = encoder_hidden_states.shape[1]
    _check("txt_ids", txt_ids, f"({n_text}, 3) matching encoder_hidden_states tokens", tuple(txt_ids.shape) == (n_text, 3))
    if cond_hidden_states is not None:
        if cond_ids is None:
            raise ValueError(f"cond_ids: required with cond_hidden_states of shape {tuple(cond_hidden_states.shape)}")
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
            raise ValueError(f"cond_cache: cache batch {cond_cache.batch_size} matches neither 1 nor batch {batch}")

    args = (transformer, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
            guidance, cond_hidden_states, cond_ids, attention, lora_on_target, cond_cache)
    return _module_call(transformer, _corrector_body, *args)


def _corrector_body(transformer, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
                    txt_ids, guidance, cond_hidden_states, cond_ids, attention, lora_on_target, cond_cache):
    switch = not lora_on_target
    with lora_disabled(lora_layers(transformer.x_embedder) if switch else []):
        hidden = transformer.x_embedder(hidden_states)
    dtype = hidden.dtype
    if guidance is not None:
        temb = transformer.time_text_embed(timestep.to(dtype) * 1000, guidance.to(dtype) * 1000, pooled_projections)
    else:
        temb = transformer.time_text_embed(timestep.to(dtype) * 1000, pooled_projections)
    text = transformer.context_embedder(encoder_hidden_states)
    rope = transformer.pos_embed(torch.cat([txt_ids, img_ids], dim=0))

    cond = cond_temb = cond_rope = None
    if cond_hidden_states is not None:
        cond = transformer.x_embedder(cond_hidden_states)
        cond_temb = _cond_embedding(transformer, pooled_projections, dtype)
        cond_rope = transformer.pos_embed(cond_ids)
    cached = cond_cache.per_block() if cond_cache is not None else None

    blocks = _blocks(transformer)
    for i, (kind, block) in enumerate(blocks):
        if switch:
            stock_lora_off = lora_layers(block, DOUBLE_BLOCK_IMAGE_STREAM if kind == "double" else None)
        else:
            stock_lora_off = []
        args = (kind, block, stock_lora_off, attention, hidden, text, cond, temb, cond_temb, rope, cond_rope,
                cached[i] if cached else None, i == len(blocks) - 1)
        if torch.is_grad_enabled() and transformer.gradient_checkpointing:
            hidden, text, cond = checkpoint(_module_call, block, _run_block, *args, use_reentrant=False)
        else:
            hidden, text, cond = _module_call(block, _run_block, *args)

    hidden = transformer.norm_out(hidden, temb)
    return transformer.proj_out(hidden)
