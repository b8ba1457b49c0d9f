"""The condition tokens' own path through a FLUX block, with the block's weights.

diffusers' stock blocks carry text and target tokens; the condition tokens only join their attention (see
`attention.py`). Around it they need what the block does to its image tokens: before, the AdaLN modulation
(from the condition's own embedding: timestep 0, guidance 1) and query/key/value; after, the gated residual
and the MLP. Double and single blocks differ in both halves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reflectionflow.models.corrector.attention import QKV, Rope, image_qkv

Modulation = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ConditionStream:
    """The condition's steps around the joint attention of one kind of block.

    `before_attention(block, cond, cond_temb, cond_rope) -> (query/key/value, modulation)`;
    `after_attention(block, cond, attention_output, modulation) -> cond` for the next block.
    """

    before_attention: Callable[[nn.Module, torch.Tensor, torch.Tensor, Rope], tuple[QKV, Modulation]]
    after_attention: Callable[[nn.Module, torch.Tensor, torch.Tensor, Modulation], torch.Tensor]


def _double_block_before_attention(block, cond, cond_temb, cond_rope):
    norm_cond, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(cond, emb=cond_temb)
    return image_qkv(block.attn, norm_cond, cond_rope), (gate_msa, shift_mlp, scale_mlp, gate_mlp)


def _double_block_after_attention(block, cond, attention_output, modulation):
    gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    attention_output = block.attn.to_out[1](block.attn.to_out[0](attention_output))
    cond = cond + gate_msa.unsqueeze(1) * attention_output
    norm_cond = block.norm2(cond) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return cond + gate_mlp.unsqueeze(1) * block.ff(norm_cond)


def _single_block_before_attention(block, cond, cond_temb, cond_rope):
    norm_cond, gate = block.norm(cond, emb=cond_temb)
    mlp = block.act_mlp(block.proj_mlp(norm_cond))
    return image_qkv(block.attn, norm_cond, cond_rope), (gate, mlp)


def _single_block_after_attention(block, cond, attention_output, modulation):
    gate, mlp = modulation
    return cond + gate.unsqueeze(1) * block.proj_out(torch.cat([attention_output, mlp], dim=2))


DOUBLE_BLOCK = ConditionStream(_double_block_before_attention, _double_block_after_attention)
SINGLE_BLOCK = ConditionStream(_single_block_before_attention, _single_block_after_attention)
