"""The corrector's joint attention: FLUX's `[text | target]` attention with the condition tokens' keys and
values appended, by an attention processor swapped in for one stock block call (diffusers has no other hook
between a block's projections and its attention).

`union` lets every token attend to every token; `causal` lets condition tokens attend only to themselves,
so their keys and values do not depend on the target and can be cached across steps and chains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

ATTENTION_MODES = ("union", "causal")

Rope = tuple[torch.Tensor, torch.Tensor]
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
KV = tuple[torch.Tensor, torch.Tensor]


def image_qkv(attn: nn.Module, x: torch.Tensor, rope: Rope | None) -> QKV:
    """Per-head, RMS-normed, rotated query/key/value of `x` through the attention's image projections."""
    query = attn.norm_q(attn.to_q(x).unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(attn.to_k(x).unflatten(-1, (-1, attn.head_dim)))
    value = attn.to_v(x).unflatten(-1, (-1, attn.head_dim))
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    return query, key, value


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, processor) -> torch.Tensor:
    """Attention of (B, N, heads, head_dim) tensors -> (B, N, heads * head_dim) through diffusers' dispatcher,
    with the backend and parallel config that `set_attention_backend`/`enable_parallelism` gave `processor`.
    """
    out = dispatch_attention_fn(
        query,
        key,
        value,
        backend=getattr(processor, "_attention_backend", None),
        parallel_config=getattr(processor, "_parallel_config", None),
    )
    return out.flatten(2, 3).to(query.dtype)


class ConditionAttnProcessor:
    """FLUX attention with the condition's keys/values joined to the `[text | target]` sequence.

    `cond_qkv` holds the condition's query/key/value for this block (uncached forward), `cond_kv` only its
    key/value (cached causal inference). After the call, `cond_output` holds the condition tokens' attention
    output (before `to_out`), or None when the condition's queries were not given. `_attention_backend` and
    `_parallel_config` are the ones of the processor this one stands in for, so its attention runs as the
    stock block's would.
    """

    def __init__(
        self,
        mode: str,
        cond_qkv: QKV | None = None,
        cond_kv: KV | None = None,
        attention_backend=None,
        parallel_config=None,
    ):
        self.mode = mode
        self.cond_qkv = cond_qkv
        self.cond_kv = cond_kv if cond_kv is not None else (cond_qkv[1:] if cond_qkv is not None else None)
        self.cond_output: torch.Tensor | None = None
        self._attention_backend = attention_backend
        self._parallel_config = parallel_config

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        if attention_mask is not None:
            raise ValueError("ConditionAttnProcessor does not support attention_mask")
        query, key, value = image_qkv(attn, hidden_states, None)
        if encoder_hidden_states is not None:
            text = encoder_hidden_states
            text_q = attn.norm_added_q(attn.add_q_proj(text).unflatten(-1, (-1, attn.head_dim)))
            text_k = attn.norm_added_k(attn.add_k_proj(text).unflatten(-1, (-1, attn.head_dim)))
            text_v = attn.add_v_proj(text).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        main_len = query.shape[1]
        if self.cond_kv is None:
            out = attend(query, key, value, self)
        else:
            cond_k, cond_v = (t.expand(query.shape[0], -1, -1, -1) for t in self.cond_kv)
            key = torch.cat([key, cond_k], dim=1)
            value = torch.cat([value, cond_v], dim=1)
            if self.cond_qkv is not None and self.mode == "union":
                out = attend(torch.cat([query, self.cond_qkv[0]], dim=1), key, value, self)
                out, self.cond_output = out[:, :main_len], out[:, main_len:]
            else:
                out = attend(query, key, value, self)
                if self.cond_qkv is not None:
                    self.cond_output = attend(*self.cond_qkv, self)

        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


@contextlib.contextmanager
def condition_attention(
    attn: nn.Module, mode: str, cond_qkv: QKV | None = None, cond_kv: KV | None = None
) -> Iterator[ConditionAttnProcessor]:
    """`attn` runs a `ConditionAttnProcessor` (with the attention settings of the processor it replaces)
    inside the block; the processor is yielded so that the caller can read its `cond_output`."""
    stock = attn.processor
    attn.processor = ConditionAttnProcessor(
        mode,
        cond_qkv=cond_qkv,
        cond_kv=cond_kv,
        attention_backend=getattr(stock, "_attention_backend", None),
        parallel_config=getattr(stock, "_parallel_config", None),
    )
    try:
        yield attn.processor
    finally:
        attn.processor = stock
