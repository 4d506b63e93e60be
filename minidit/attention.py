"""Multi-head self-attention and cross-attention, fused and explicit side by side.

Each head h projects the tokens to queries, keys and values and mixes the values with
the softmax of the scaled query-key similarities [Transformer, Eq. 1]:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V              d = D / heads
    MultiHead(X) = concat(head_1, ..., head_H) W_o,   head_h = Attention(X W_q^h, X W_k^h, X W_v^h)

Self-attention takes Q, K and V from the same tokens; cross-attention takes Q from the
image tokens and K, V from a separate context sequence (a DiT conditioning variant
[DiT, Sec. 3.2]). Two interchangeable backends compute the same thing:

- ``"sdpa"`` (default): `F.scaled_dot_product_attention`, which picks a fused kernel
  (flash / memory-efficient) and never materialises the L x L weight matrix;
- ``"explicit"``: the formula above written out, kept for reading, testing and for
  returning the attention weights (plots of what each token looks at).

A key mask m [B, Lk] (True = a real token, False = padding) hides keys from every query: their
scores become −∞ before the softmax, so padding receives exactly zero weight and what sits in a
padded position cannot change the output,

    softmax(Q K^T / sqrt(d) + M) V,     M_ij = 0 where m_j, −∞ elsewhere

References: [Transformer] Vaswani et al. 2017, "Attention is all you need";
[DiT] Peebles, Xie 2023.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("sdpa", "explicit")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_key_mask(mask: torch.Tensor | None, B: int, Lk: int) -> torch.Tensor | None:
    """Check a key mask (bool [B, Lk], True = attend) and return it as [B, 1, 1, Lk] for the heads."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, Lk):
        raise ValueError(f"the key mask must be a bool tensor [{B}, {Lk}] (True = a real token), "
                         f"got {mask.dtype} {list(mask.shape)}")
    if B > 0 and mask.device.type == "cpu" and not bool(mask.any(dim=1).all()):
        raise ValueError("every row of the key mask needs at least one True: a query must see some key")
    return mask[:, None, None, :]


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d) + M) V written out, also returning the weights.

    Args:
        q: queries [B, H, Lq, d]. k, v: keys and values [B, H, Lk, d].
        mask: None, or bool [B, 1, 1, Lk] (`check_key_mask`): False hides that key.

    Returns:
        (out [B, H, Lq, d], weights [B, H, Lq, Lk]); each row of weights sums to one.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # M = −∞ on padding
    weights = scores.softmax(dim=-1)  # softmax over the keys
    return weights @ v, weights


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention with the chosen backend; shapes as `explicit_attention`."""
    if _check_backend(backend) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # bool mask: True = attend
    return explicit_attention(q, k, v, mask)[0]


class Attention(nn.Module):
    """Multi-head self-attention with one fused Linear producing Q, K and V.

    Args:
        dim: token width D (divisible by `num_heads`).
        num_heads: number of heads H; each head has width d = D / H.
        qkv_bias: whether the Q, K, V projection has a bias.
        backend: "sdpa" (fused, default) or "explicit".
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.backend = _check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # W_q, W_k, W_v stacked
        self.proj = nn.Linear(dim, dim)  # W_o

    def forward(self, x: torch.Tensor, return_weights: bool = False, mask: torch.Tensor | None = None):
        """Attend from every token to every token.

        Args:
            x: tokens [B, L, D].
            return_weights: also return the attention weights [B, H, L, L]
                (forces the explicit path).
            mask: None, or bool [B, L]: False marks padding, which no token attends to.

        Returns:
            Tokens [B, L, D], or (tokens, weights) when `return_weights`.
        """
        B, L, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x [B, L, D]
        # splitting before the head reshape keeps the backward a cheap concatenation
        q, k, v = (u.reshape(B, L, H, D // H).transpose(1, 2) for u in (q, k, v))  # 3 x [B, H, L, d]
        mask = check_key_mask(mask, B, L)
        if return_weights:
            out, weights = explicit_attention(q, k, v, mask)
        else:
            out = attend(q, k, v, self.backend, mask)  # [B, H, L, d]
        out = out.transpose(1, 2).reshape(B, L, D)  # [B, L, H*d]: heads side by side
        out = self.proj(out)
        return (out, weights) if return_weights else out


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from `x`, keys and values from `context`.

    Args:
        dim: token width D of `x` (divisible by `num_heads`).
        num_heads: number of heads H.
        context_dim: width of the context tokens (default: D).
        qkv_bias: whether the projections have a bias.
        backend: "sdpa" (fused, default) or "explicit".
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        backend: str = "sdpa",
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.backend = _check_backend(backend)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)  # W_k, W_v stacked
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_weights: bool = False,
                context_mask: torch.Tensor | None = None):
        """Attend from each token of `x` to the tokens of `context`.

        Args:
            x: query tokens [B, L, D].
            context: context tokens [B, Lc, Dc].
            return_weights: also return the weights [B, H, L, Lc] (explicit path).
            context_mask: None, or bool [B, Lc]: False marks padded context tokens (never attended).

        Returns:
            Tokens [B, L, D], or (tokens, weights) when `return_weights`.
        """
        B, L, D = x.shape
        Lc = context.shape[1]
        H = self.num_heads
        q = self.q(x).reshape(B, L, H, D // H).transpose(1, 2)  # [B, H, L, d]
        k, v = self.kv(context).split(D, dim=-1)  # 2 x [B, Lc, D]
        k, v = (u.reshape(B, Lc, H, D // H).transpose(1, 2) for u in (k, v))  # 2 x [B, H, Lc, d]
        mask = check_key_mask(context_mask, B, Lc)
        if return_weights:
            out, weights = explicit_attention(q, k, v, mask)
        else:
            out = attend(q, k, v, self.backend, mask)  # [B, H, L, d]
        out = out.transpose(1, 2).reshape(B, L, D)  # [B, L, H*d]
        out = self.proj(out)
        return (out, weights) if return_weights else out
