"""Two ways for a DiT block to read text tokens: cross-attention (PixArt-α) and joint attention (MMDiT).

Both keep the DiT's adaLN-Zero modulation of the image tokens x [B, N, D] from a condition vector
and both read the text tokens c [B, L, D] of `minidit.text.TextEncoder` with a key mask m [B, L]
(padding is never attended). Notation of `minidit.dit`: modulate(u, β, γ) = u (1 + γ) + β, and the
gates α start at zero, so every block is the identity at initialisation.

Cross-attention [PixArt-α, Sec. 2.3]: the modulation comes from t alone (s = t_emb); the text
enters through a cross-attention layer between self-attention and the MLP:

    x ← x + α1 · SelfAttn(modulate(LN(x), β1, γ1))
    x ← x + CrossAttn(LN(x), c; m)                      (its output projection starts at zero)
    x ← x + α2 · MLP(modulate(LN(x), β2, γ2))

Joint attention, the MMDiT block [SD3, Sec. 4, Fig. 2]: text and image tokens keep their own
weights (modulation, Q/K/V, output projection, MLP) but attend in ONE sequence, so image tokens
read text and text tokens read the image; the modulation comes from s = t_emb + MLP(c̄), the
pooled text. For each stream u ∈ {x, c} with its own weights:

    (q_u, k_u, v_u) = modulate(LN(u), β1_u, γ1_u) W_qkv_u
    [o_c; o_x] = Attn([q_c; q_x], [k_c; k_x], [v_c; v_x]; [m; 1])
    u ← u + α1_u · o_u W_o_u,     u ← u + α2_u · MLP_u(modulate(LN(u), β2_u, γ2_u))

With the text weights equal to the image weights this is one adaLN-Zero block on [c; x]
(`tests/test_text.py` checks it).

References: [PixArt-α] Chen et al. 2024; [SD3] Esser et al. 2024; [DiT] Peebles, Xie 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minidit.attention import Attention, CrossAttention, attend, check_key_mask, explicit_attention
from minidit.vit import Mlp


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, L, D] * (1 + scale [B, D]) + shift [B, D] (as `minidit.dit.modulate`)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class _Stream(nn.Module):
    """One stream's weights in a block: LNs, adaLN-Zero modulation (6 vectors), attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=backend)  # its qkv and proj; the attention is joint
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.zero_init()

    def zero_init(self) -> None:
        """β = γ = α = 0: the stream's update is zero, its block the identity."""
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def qkv(self, u: Tensor, shift: Tensor, scale: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V [B, H, L, d] of the modulated stream u [B, L, D]."""
        B, L, D = u.shape
        q, k, v = self.attn.qkv(_modulate(self.norm1(u), shift, scale)).split(D, dim=-1)
        return tuple(w.reshape(B, L, heads, D // heads).transpose(1, 2) for w in (q, k, v))


class TextCrossAttentionBlock(nn.Module):
    """PixArt-α's block: adaLN-Zero on s [B, D], cross-attention to the text c [B, L, D] (module docstring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "sdpa"):
        super().__init__()
        self.stream = _Stream(dim, num_heads, mlp_ratio, backend)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, backend=backend)
        self.zero_init()

    def zero_init(self) -> None:
        """Gates and modulation zero, and the cross-attention's output projection zero: the identity."""
        self.stream.zero_init()
        nn.init.zeros_(self.cross_attn.proj.weight)
        nn.init.zeros_(self.cross_attn.proj.bias)

    def forward(self, x: Tensor, s: Tensor, c: Tensor, mask: Tensor | None = None,
                return_weights: bool = False):
        """x [B, N, D], s [B, D], c [B, L, D], mask [B, L] -> x [B, N, D] (and the cross-attention
        weights [B, H, N, L] from image tokens to words, with `return_weights`)."""
        st = self.stream
        shift1, scale1, gate1, shift2, scale2, gate2 = st.modulation(s).chunk(6, dim=1)
        x = torch.addcmul(x, gate1[:, None], st.attn(_modulate(st.norm1(x), shift1, scale1)))
        read = self.cross_attn(self.norm_cross(x), c, return_weights=return_weights, context_mask=mask)
        read, weights = read if return_weights else (read, None)
        x = x + read
        x = torch.addcmul(x, gate2[:, None], st.mlp(_modulate(st.norm2(x), shift2, scale2)))
        return (x, weights) if return_weights else x


class MMDiTBlock(nn.Module):
    """SD3's joint-attention block: image and text streams with their own weights, one attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "sdpa"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.image = _Stream(dim, num_heads, mlp_ratio, backend)
        self.text = _Stream(dim, num_heads, mlp_ratio, backend)

    def zero_init(self) -> None:
        """Both streams' gates and modulation zero: the identity on x and on c."""
        self.image.zero_init()
        self.text.zero_init()

    def forward(self, x: Tensor, c: Tensor, s: Tensor, mask: Tensor | None = None,
                return_weights: bool = False):
        """x [B, N, D], c [B, L, D], s [B, D], mask [B, L] -> (x, c), both updated (and the joint
        attention weights [B, H, L + N, L + N], text first, with `return_weights`)."""
        B, N, D = x.shape
        L, H = c.shape[1], self.num_heads
        mod_x = self.image.modulation(s).chunk(6, dim=1)  # β1, γ1, α1, β2, γ2, α2 of the image stream
        mod_c = self.text.modulation(s).chunk(6, dim=1)
        qkv_c = self.text.qkv(c, mod_c[0], mod_c[1], H)  # each [B, H, L, d]
        qkv_x = self.image.qkv(x, mod_x[0], mod_x[1], H)  # each [B, H, N, d]
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(qkv_c, qkv_x))  # the joined sequence [c; x]
        joint = None if mask is None else torch.cat([mask, mask.new_ones(B, N)], dim=1)  # image keys always seen
        joint = check_key_mask(joint, B, L + N)
        if return_weights:
            from_all, weights = explicit_attention(q, k, v, joint)
        else:
            from_all, weights = attend(q, k, v, self.backend, joint), None  # [B, H, L + N, d]
        from_all = from_all.transpose(1, 2).reshape(B, L + N, D)
        o_c, o_x = from_all[:, :L], from_all[:, L:]
        c = self._finish(c, o_c, self.text, mod_c)
        x = self._finish(x, o_x, self.image, mod_x)
        return (x, c, weights) if return_weights else (x, c)

    @staticmethod
    def _finish(u: Tensor, o: Tensor, st: _Stream, mod: tuple[Tensor, ...]) -> Tensor:
        """u + α1 · o W_o, then u + α2 · MLP(modulate(LN(u), β2, γ2)), with the stream's own weights."""
        _, _, gate1, shift2, scale2, gate2 = mod
        u = torch.addcmul(u, gate1[:, None], st.attn.proj(o))
        return torch.addcmul(u, gate2[:, None], st.mlp(_modulate(st.norm2(u), shift2, scale2)))

