"""Dropout and multi-head attention for the SG-MFT head, fast on CPUs as well as GPUs.

A head-only training step on CPU (cached features, the tuning workload) spent a third of
its time drawing dropout masks: ``torch.bernoulli_`` costs ~12 ns an element on a CPU core,
a multiply 0.5. ``nn.MultiheadAttention`` added more: on a CPU, attention with dropout goes
through the math path of ``scaled_dot_product_attention``, which draws its mask the same
way and checks every row for full masking. On a CPU in training, these layers draw their
keep-masks as 16-bit integers from numpy's PCG64 (seeded from torch's generator, so
``torch.manual_seed`` still makes a run repeatable) and compute attention as batched 3-D
matmuls. Everywhere else (GPUs, inference) they call torch's own kernels."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_MASK_LEVELS = 1 << 16
"""A keep-mask element is a uniform 16-bit integer: the drop probability is exact to 1/65,536."""


def _keep_scale(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of 0 (dropped) and 1/(1-p) (kept), each element dropped with probability p."""
    seed = int(torch.randint(0, 2**62, ()).item())  # from torch's generator: manual_seed governs it
    count = math.prod(shape)
    # PCG64's raw 64-bit words, four draws each: ~7x faster than Generator.bytes for the same bits
    draws = np.random.PCG64(seed).random_raw(-(-count // 4)).view(np.int16)[:count]
    keep = draws >= round(p * _MASK_LEVELS) - _MASK_LEVELS // 2
    # numpy turns the bool mask into floats ~3x faster than torch's .to() on one core
    scale = np.multiply(keep, np.float32(1.0 / (1.0 - p)), dtype=np.float32)
    return torch.from_numpy(scale.reshape(shape)).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` (not in place), with the CPU keep-mask drawn as above."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    return x * _keep_scale(x.shape, p, x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) that draws its CPU masks with :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An additive attention bias from a key mask (B, L), True for real tokens: (B, 1, 1, L)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias), dropped out with probability p, times v; q, k, v: (B, H, L, d).

    ``bias`` broadcasts to (B, H, Lq, Lk) with a size-1 head dimension, as
    :func:`padding_bias` makes it. On a CPU with dropout, heads are folded into the batch
    of 3-D matmuls, and the scale and bias are applied by the score matmul itself
    (``baddbmm``): two fewer passes over the scores than matmul, scale and add.
    """
    if p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    batch, heads, length, width = q.shape
    folded = lambda t: t.reshape(batch * heads, t.shape[2], width)  # noqa: E731
    q3, k3, v3 = folded(q), folded(k), folded(v)
    scale = 1.0 / math.sqrt(width)
    if bias is None:
        scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)
    else:
        bias3 = bias.expand(batch, heads, -1, k.shape[2]).reshape(batch * heads, -1, k.shape[2])
        scores = torch.baddbmm(bias3, q3, k3.transpose(1, 2), alpha=scale)
    probs = dropout(torch.softmax(scores, dim=-1), p, training=True)
    return torch.bmm(probs, v3).view(batch, heads, length, width)


class Attention(nn.Module):
    """Multi-head attention of ``query`` over ``context``, honouring the context's padding.

    Its parameters are an ``nn.MultiheadAttention``'s (``attn.in_proj_weight``,
    ``attn.out_proj``...), with that module's initialisation and names, so model
    directories and seeds mean what they meant; the forward is :func:`attend`.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        mha = self.attn
        batch, length, width = query.shape
        if query is context:  # self-attention: one projection for q, k and v
            q, k, v = F.linear(query, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, mha.in_proj_weight[:width], mha.in_proj_bias[:width])
            k, v = F.linear(context, mha.in_proj_weight[width:], mha.in_proj_bias[width:]).chunk(2, dim=-1)
        heads = lambda t: t.unflatten(-1, (mha.num_heads, mha.head_dim)).transpose(1, 2)  # noqa: E731  (B, H, L, d)
        out = attend(heads(q), heads(k), heads(v), padding_bias(context_mask, q.dtype), mha.dropout if self.training else 0.0)
        return mha.out_proj(out.transpose(1, 2).reshape(batch, length, width))
