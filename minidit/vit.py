"""The Vision Transformer: images as sequences of patches, read by pre-norm transformer blocks.

An image [C, H, W] is cut into L = (H/P)(W/P) patches of P x P pixels; each flattened patch
is mapped to a token of width D, a position code is added, and a stack of blocks mixes
the tokens [ViT, Eq. 1-3]:

    z_0 = [x_cls; x_p^1 E; ...; x_p^L E] + E_pos
    z'_l = z_{l-1} + MSA(LN(z_{l-1})),     z_l = z'_l + MLP(LN(z'_l))
    y = LN(z_L^0) W_head                    (class token; or the mean of the patch tokens)

The fixed 2-D sine-cosine position code of MAE and DiT gives half of the D dimensions
to each axis; along one axis, with omega_i = 1 / 10000^(2i / (D/2)), i = 0..D/4-1,

    emb(pos) = [sin(pos * omega_0..), cos(pos * omega_0..)]     (D/2 numbers)
    E_pos[row r, column c] = [emb(c), emb(r)]                  (D numbers)

(the column code first, as in MAE, so that weights trained there line up here).

What a trained ViT looks at: each block's attention weights A_l [B, H, L, L], and their
rollout through the residual stream [Rollout, Eq. 1], Ā_l = ½·mean_h(A_l) + ½·I,

    R = Ā_depth ··· Ā_2 Ā_1       (row i: how much each input token feeds output token i)

References: [ViT] Dosovitskiy et al. 2021; [MAE] He et al. 2022; [DiT] Peebles, Xie 2023;
[Rollout] Abnar, Zuidema 2020 (quantifying attention flow in transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from minidit.attention import BACKENDS, Attention


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping P x P patches, in row-major order.

    Args:
        x: images [B, C, H, W], H and W divisible by P.

    Returns:
        Tokens `[B, L, P*P*C]`, L = (H/P)(W/P); each token flattened as (row, column, channel).
    """
    B, C, H, W = x.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size={P}")
    x = x.reshape(B, C, H // P, P, W // P, P)  # [B, C, h, P, w, P]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, P, P, C]
    return x.reshape(B, (H // P) * (W // P), P * P * C)  # [B, L, P*P*C]


def unpatchify(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: tokens `[B, L, P*P*C]` -> images [B, C, height, width]."""
    B, L, N = tokens.shape
    P = patch_size
    h, w = height // P, width // P
    if h * w != L or N % (P * P):
        raise ValueError(f"{L} tokens of width {N} do not tile a {height}x{width} image with P={P}")
    C = N // (P * P)
    x = tokens.reshape(B, h, w, P, P, C)  # [B, h, w, P, P, C]
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, h, P, w, P]
    return x.reshape(B, C, height, width)  # [B, C, H, W]


class PatchEmbed(nn.Module):
    """Patch embedding x_p E: a Linear on patchified pixels, or the same map as a strided Conv2d.

    A Conv2d with kernel = stride = P applies one weight matrix to each patch, so the two
    kinds compute the same function when conv.weight [D, C, P, P] is the Linear weight
    `[D, P*P*C]` with its columns reordered to (row, column, channel).
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, kind: str = "linear"):
        super().__init__()
        if kind not in ("linear", "conv"):
            raise ValueError(f"kind must be 'linear' or 'conv', got {kind!r}")
        self.patch_size, self.kind = patch_size, kind
        if kind == "linear":
            self.proj = nn.Linear(patch_size * patch_size * in_channels, dim)
        else:
            self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, L, D]."""
        if self.kind == "linear":
            return self.proj(patchify(x, self.patch_size))  # [B, L, D]
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, L, D]


def sincos_pos_embed_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos omega), cos(pos omega)] with omega_i = 1/10000^(2i/dim): pos [L] -> [L, dim]."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim/2]
    angles = pos.to(torch.float64)[:, None] * omega[None, :]  # [L, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # [L, dim]


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The fixed 2-D code of MAE/DiT: [emb(column), emb(row)] per token, row-major -> [L, dim]."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sin-cos code, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # [L]: 0,0,..,1,1,..
    cols = torch.arange(grid_w).repeat(grid_h)  # [L]: 0,1,..,0,1,..
    return torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], 1)


class Mlp(nn.Sequential):
    """Linear -> GELU (tanh approximation, as in DiT) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then + MLP(LN(x)) [ViT, Eq. 2-3]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_attention: bool = False, mask: torch.Tensor | None = None):
        """Tokens [B, L, D] -> [B, L, D]; with `return_attention` also the weights [B, H, L, L].
        `mask` (bool [B, L], False = padding) hides padded tokens from every query."""
        if return_attention:  # the weights come from the explicit softmax(QK^T/sqrt(d)) path
            h, weights = self.attn(self.norm1(x), return_weights=True, mask=mask)
        else:
            h, weights = self.attn(self.norm1(x), mask=mask), None
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return (x, weights) if return_attention else x


@dataclass(frozen=True)
class ViTConfig:
    """A ViT classifier. `pool`: "cls" (class token) or "mean"; `pos_embed`: "sincos" or "learned"."""

    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    hidden_size: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = "cls"
    pos_embed: str = "learned"
    patch_embed: str = "linear"
    attention_backend: str = "sdpa"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        for name, value, valid in [
            ("pool", self.pool, ("cls", "mean")),
            ("pos_embed", self.pos_embed, ("sincos", "learned")),
            ("patch_embed", self.patch_embed, ("linear", "conv")),
            ("attention_backend", self.attention_backend, BACKENDS),
        ]:
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")


VIT_CONFIGS = {
    # sin-cos positions and mean pooling train faster than learned ones and a class token
    # ("Better plain ViT baselines", Beyer et al. 2022); sized for ~10 MNIST epochs in 10 CPU minutes
    "vit-mnist": ViTConfig(pool="mean", pos_embed="sincos"),
    "vit-cifar10": ViTConfig(
        image_size=32, patch_size=4, in_channels=3, hidden_size=384, depth=8, num_heads=6,
        pool="mean", pos_embed="sincos",
    ),
}


class ViT(nn.Module):
    """Vision Transformer classifier: images [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        D, grid = c.hidden_size, c.image_size // c.patch_size
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, D, kind=c.patch_embed)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if c.pool == "cls" else None
        n_tokens = grid * grid + (c.pool == "cls")
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, D) * 0.02)
        else:  # fixed; the class token (if any) gets the zero code
            code = torch.cat([torch.zeros(n_tokens - grid * grid, D), sincos_pos_embed_2d(D, grid, grid)])
            self.register_buffer("pos_embed", code[None], persistent=False)  # [1, n_tokens, D]
        self.blocks = nn.ModuleList(
            Block(D, c.num_heads, c.mlp_ratio, c.attention_backend) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, c.num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)  # start from uniform class probabilities
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Images [B, C, H, W] (C, H, W as configured) -> logits [B, num_classes].

        With `return_attention`: (logits, [A_1, ..., A_depth]), each A_l [B, H, L, L] the
        attention weights of block l (L counts the class token first, if there is one).
        """
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"x must have shape [B, {c.in_channels}, {c.image_size}, {c.image_size}], "
                f"got {list(x.shape)}"
            )
        z = self.patch_embed(x)  # [B, L, D]
        if self.cls_token is not None:
            z = torch.cat([self.cls_token.expand(len(z), -1, -1), z], dim=1)  # [B, 1+L, D]
        z = z + self.pos_embed
        maps = []
        for block in self.blocks:
            z, A = block(z, return_attention=True) if return_attention else (block(z), None)
            maps.append(A)
        z = self.norm(z)
        pooled = z[:, 0] if c.pool == "cls" else z.mean(dim=1)  # [B, D]
        logits = self.head(pooled)
        return (logits, maps) if return_attention else logits


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout [Rollout, Eq. 1]: R = Ā_depth ··· Ā_1 with Ā_l = ½·mean_h(A_l) + ½·I.

    Args:
        maps: the weights of each block, first block first, each [B, H, L, L] with rows
            summing to 1 (as `ViT.forward(x, return_attention=True)` returns them).

    Returns:
        R [B, L, L], rows summing to 1: R[b, i, j] is the share of input token j in output token i.
    """
    if not maps or any(A.ndim != 4 or A.shape[-1] != A.shape[-2] for A in maps):
        raise ValueError(f"maps must be a non-empty list of [B, H, L, L] weights, got {[tuple(A.shape) for A in maps]}")
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)  # [L, L]
    R = eye.expand(maps[0].shape[0], -1, -1)  # [B, L, L]
    for A in maps:
        A_bar = 0.5 * A.mean(dim=1) + 0.5 * eye  # heads averaged, plus the residual path: [B, L, L]
        R = A_bar @ R  # the later block acts on what the earlier ones produced
    return R


def make_vit(name: str, **overrides) -> ViT:
    """Build a ViT from a preset in `VIT_CONFIGS`, with fields overridden by keyword."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT config {name!r}; valid names: {sorted(VIT_CONFIGS)}")
    return ViT(replace(VIT_CONFIGS[name], **overrides))
