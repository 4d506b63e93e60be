"""The Diffusion Transformer: a ViT that reads noisy latents x_t with t and y, and predicts eps.

The input [C, H, W] is patchified into L = (H/P)(W/P) tokens with the fixed 2-D sin-cos
code, passed through N blocks conditioned on t_emb and y_emb, decoded per token by a final
layer to `P*P*C'` numbers and unpatchified (C' = 2C when the variance is learned [IDDPM]).
The paper compares four ways for a block to see the condition [DiT, Sec. 3.2]:

    in-context:       [t_emb; y_emb; tokens] form one sequence; plain ViT blocks
    cross-attention:  x += CrossAttn(LN(x), [t_emb; y_emb]) after self-attention
    adaLN:            c = t_emb + y_emb;  (gamma, beta) = MLP(c);  adaLN(x) = LN(x)(1 + gamma) + beta
    adaLN-Zero:       also alpha = MLP(c), x += alpha * Attn(adaLN(x)), x += alpha * MLP(adaLN(x)),
                      with the MLP initialised to zero: every block is the identity at init

The label table has a null row (label num_classes) that training reaches by label dropout,
so one network predicts both eps(x_t, y) and eps(x_t, null), as classifier-free guidance
needs [CFG, Eq. 6] (`minidit.guidance.guided`).

Two more variants read a caption instead of a label (`minidit.text_blocks`): y is then the token
ids [B, L] of `minidit.text.Tokenizer`, read by the DiT's own text encoder, and the null caption
(every token `<null>`) plays the null label:

    text-cross-attention:  adaLN-Zero on t_emb, cross-attention to the text tokens [PixArt-α]
    mmdit:                 text and image streams with their own weights, one joint attention,
                           adaLN-Zero on t_emb + MLP(pooled text) [SD3]

With `second_time` the same DiT also reads a second time r (MeanFlow's average velocity over
[r, t], a shortcut model's step): t comes as pairs (t, r) [B, 2], and a second timestep embedder
adds the interval to the time embedding (the inputs (t, t − r) of [MeanFlow, Tab. 1]):

    t_emb ← t_emb(t) + Δ_emb(t − r),     Δ_emb zero at init; a single time [B] means r = t

Off by default: no new weights, and the forward pass is exactly the one-time model's.

References: [MeanFlow] Geng et al. 2025; [DiT] Peebles, Xie 2023; [IDDPM] Nichol, Dhariwal 2021; [CFG] Ho, Salimans 2022.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from minidit.attention import BACKENDS, Attention, CrossAttention
from minidit.embeddings import LabelEmbedder, TimestepEmbedder, check_conditioned_inputs
from minidit.guidance import drop_labels
from minidit.text import NULL, TextEncoder
from minidit.text_blocks import MMDiTBlock, TextCrossAttentionBlock
from minidit.vit import Block, Mlp, PatchEmbed, sincos_pos_embed_2d, unpatchify

TEXT_CONDITIONINGS = ("text-cross-attention", "mmdit")
CONDITIONINGS = ("adaln-zero", "adaln", "cross-attention", "in-context", *TEXT_CONDITIONINGS)


@dataclass(frozen=True)
class DiTConfig:
    """A Diffusion Transformer; `input_size` is the (square) side of the input in pixels or latents."""

    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: an unconditional model
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    conditioning: str = "adaln-zero"
    attention_backend: str = "sdpa"
    frequency_size: int = 256
    second_time: bool = False  # also read r: t as pairs (t, r) [B, 2] (MeanFlow, shortcut models)
    text_vocab: int = 0  # token ids of the captions (the text conditionings): minidit.text.Tokenizer.vocab_size
    text_length: int = 8  # L, tokens per caption
    text_depth: int = 2  # blocks of the text encoder

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads} and by 4"
            )
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError("num_classes must be >= 0 and class_dropout_prob in [0, 1)")
        if self.reads_text and (self.text_vocab <= NULL or self.num_classes != 0):
            raise ValueError(f"conditioning {self.conditioning!r} reads captions: it needs text_vocab (the "
                             f"tokenizer's vocab_size, > {NULL}) and num_classes=0, got text_vocab="
                             f"{self.text_vocab}, num_classes={self.num_classes}")

    @property
    def reads_text(self) -> bool:
        """Whether y is a caption's token ids [B, L] (the text conditionings) rather than a label [B]."""
        return self.conditioning in TEXT_CONDITIONINGS

    @property
    def out_channels(self) -> int:
        """C' = 2C with a learned variance (eps and the variance interpolation v), else C."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


def _paper_config(width: int, depth: int, heads: int, patch: int) -> DiTConfig:
    """The paper's ImageNet 256 models: on 32x32x4 latents, 1000 classes, learned variance."""
    return DiTConfig(32, patch, 4, width, depth, heads, num_classes=1000, learn_sigma=True)


_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_CONFIGS = {
    f"DiT-{size}/{patch}": _paper_config(*_SIZES[size], patch)
    for size in ("S", "B", "L", "XL")
    for patch in (2, 4, 8)
}
DIT_CONFIGS.update({
    # 1.9 M parameters, 65 MMACs per image: a batch-128 training step costs ~0.7 CPU-core seconds
    "dit-mnist-cpu": DiTConfig(28, 4, 1, 128, 6, 4, num_classes=10, learn_sigma=False),
    # the main job's DiT: 4x7x7 latents of the shipped autoencoder, patch 1 (49 tokens), width 96, depth 4
    "dit-mnist-latent": DiTConfig(7, 1, 4, 96, 4, 3, num_classes=10, learn_sigma=False),
    "dit-mnist-gpu": DiTConfig(28, 2, 1, 384, 12, 6, num_classes=10, learn_sigma=False),
    "dit-cifar10-gpu": DiTConfig(32, 2, 3, 384, 12, 6, num_classes=10, learn_sigma=False),
})


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer-norm affine: x [B, L, D] * (1 + scale [B, D]) + shift [B, D]."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])  # one fused op


class AdaLNBlock(nn.Module):
    """DiT block with adaptive layer norm; `zero=True` adds the gates alpha (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, zero: bool, backend: str):
        super().__init__()
        self.zero = zero
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # regresses (beta1, gamma1, [alpha1,] beta2, gamma2, [alpha2]) from c
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (6 if zero else 4) * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens x [B, L, D] and condition c [B, D] -> [B, L, D]."""
        if self.zero:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
            # x + alpha * f(adaLN(x)), as one fused multiply-add
            x = torch.addcmul(x, gate1[:, None], self.attn(modulate(self.norm1(x), shift1, scale1)))
            return torch.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm2(x), shift2, scale2)))
        shift1, scale1, shift2, scale2 = self.modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + self.mlp(modulate(self.norm2(x), shift2, scale2))


class CrossAttentionBlock(nn.Module):
    """DiT block that attends to the condition tokens [t_emb; y_emb] after self-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=backend)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Tokens x [B, L, D] and condition tokens context [B, Lc, D] -> [B, L, D]."""
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """(adaptive) LN, then a Linear from D to `P*P*C'` numbers per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaptive: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if adaptive else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, L, D] (and c [B, D] when adaptive) -> `[B, L, P*P*C']`."""
        x = self.norm(x)
        if self.modulation is not None:
            shift, scale = self.modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """Diffusion Transformer: (x_t [B, C, H, W], t [B], y [B]) -> [B, C', H, W].

    Time convention: `t` is whatever the caller's process uses, as a float [B] (or a scalar
    shared by the batch): DDPM steps 0..T-1, or 1000 t for a continuous t in [0, 1].
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        D, grid = c.hidden_size, c.input_size // c.patch_size
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, D, kind="linear")
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, grid, grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(D, c.frequency_size)
        self.y_embedder = (
            LabelEmbedder(c.num_classes, D, c.class_dropout_prob) if c.num_classes > 0 else None
        )
        self.text_encoder = self.pooled_embedder = None
        if c.reads_text:  # the caption's encoder, and (MMDiT) the pooled text's share of the condition
            self.text_encoder = TextEncoder(c.text_vocab, c.text_length, D, c.text_depth, c.num_heads,
                                            c.mlp_ratio, c.attention_backend)
            if c.conditioning == "mmdit":
                self.pooled_embedder = Mlp(D, D)
        self.blocks = nn.ModuleList(self._make_block() for _ in range(c.depth))
        adaptive = c.conditioning in ("adaln-zero", "adaln", *TEXT_CONDITIONINGS)
        self.final_layer = FinalLayer(D, c.patch_size, c.out_channels, adaptive)
        self._init_weights()
        self.dt_embedder = None
        if c.second_time:  # built after the others are initialised, so that they start as without it
            self.dt_embedder = TimestepEmbedder(D, c.frequency_size)
            nn.init.zeros_(self.dt_embedder.mlp[2].weight)  # Δ_emb = 0: the one-time model at init
            nn.init.zeros_(self.dt_embedder.mlp[2].bias)

    def _make_block(self) -> nn.Module:
        c = self.config
        args = (c.hidden_size, c.num_heads, c.mlp_ratio)
        if c.conditioning in ("adaln-zero", "adaln"):
            return AdaLNBlock(*args, zero=c.conditioning == "adaln-zero", backend=c.attention_backend)
        if c.conditioning == "cross-attention":
            return CrossAttentionBlock(*args, backend=c.attention_backend)
        if c.conditioning == "text-cross-attention":
            return TextCrossAttentionBlock(*args, backend=c.attention_backend)
        if c.conditioning == "mmdit":
            return MMDiTBlock(*args, backend=c.attention_backend)
        return Block(*args, backend=c.attention_backend)  # in-context: a plain ViT block

    def _init_weights(self):
        # 1. Xavier-uniform Linears with zero biases, the usual ViT initialisation
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # 2. the embedder MLPs and the label table get N(0, 0.02^2) instead
        for m in [*self.t_embedder.mlp, *([self.y_embedder.table] if self.y_embedder else [])]:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        # 3. adaptive norms start as plain LN (gamma = beta = 0) and, for adaLN-Zero, the gates
        #    alpha = 0 make each block the identity; the output layer starts at zero
        for m in self.modules():
            if isinstance(m, (TextCrossAttentionBlock, MMDiTBlock)):
                m.zero_init()
            if isinstance(m, (AdaLNBlock, FinalLayer)) and m.modulation is not None:
                nn.init.zeros_(m.modulation[-1].weight)
                nn.init.zeros_(m.modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _check_inputs(self, x, t, y, force_drop_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raise ValueError on a bad input (`minidit.embeddings.check_conditioned_inputs`); return t
        as a float [B] (with `second_time` and pairs, [B, 2]) and y [B]."""
        c = self.config
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 2:  # (t, r) pairs: the first time is checked like any t, the pair is kept
            if not c.second_time:
                raise ValueError(f"time pairs (t, r) {list(t.shape)} need a DiT with second_time=True")
            if x.ndim == 4 and tuple(t.shape) != (x.shape[0], 2):
                raise ValueError(f"time pairs (t, r) must have shape [{x.shape[0]}, 2], got {list(t.shape)}")
            _, y = self._check_inputs(x, t[:, 0], y, force_drop_ids)
            return t.float(), y
        if c.reads_text:  # y: token ids [B, L]; None: the null caption
            t, _ = check_conditioned_inputs(x, t, None, None, in_channels=c.in_channels, input_size=c.input_size,
                                            num_classes=0, name="DiT")
            y = torch.full((x.shape[0], c.text_length), NULL, dtype=torch.long, device=x.device) if y is None else y
            self.text_encoder.check_ids(y)
            if force_drop_ids is not None and force_drop_ids.shape != (x.shape[0],):
                raise ValueError(f"force_drop_ids must have shape [{x.shape[0]}], got {list(force_drop_ids.shape)}")
            return t, y
        return check_conditioned_inputs(x, t, y, force_drop_ids, in_channels=c.in_channels,
                                        input_size=c.input_size, num_classes=c.num_classes, name="DiT")

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """t_emb(t) [B, D]; with `second_time`, t_emb(t) + Δ_emb(t − r) for pairs (t, r) [B, 2]
        (a single time t [B] is the pair (t, t))."""
        if self.dt_embedder is None:
            return self.t_embedder(t)
        t, r = (t[:, 0], t[:, 1]) if t.ndim == 2 else (t, t)
        return self.t_embedder(t) + self.dt_embedder(t - r)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict eps (and the variance channels) for noisy inputs.

        Args:
            x: noisy inputs x_t [B, C, H, W].
            t: timesteps [B] (or a scalar), any float scale; with `second_time`, also pairs
                (t, r) [B, 2] (a single time means r = t).
            y: labels [B] in [0, num_classes), or the null label num_classes for an
                unconditional prediction (what classifier-free guidance asks for); None
                means the null label for every sample (and is required when num_classes=0).
            force_drop_ids: bool [B]; where true, y is replaced by the null label.
                Random label dropout (probability class_dropout_prob) happens in train mode.

        Returns:
            [B, C', H, W] with C' = 2C when `learn_sigma` (eps first, then the variance).
        """
        t, y = self._check_inputs(x, t, y, force_drop_ids)
        return self._forward(x, t, y, force_drop_ids)

    def _forward(self, x, t, y, force_drop_ids) -> torch.Tensor:
        c = self.config
        h = self.patch_embed(x) + self.pos_embed  # [B, L, D]
        if c.reads_text:
            return self._forward_text(h, t, y, force_drop_ids)
        cond = [self.embed_time(t)]  # t_emb [B, D]
        if self.y_embedder is not None:
            cond.append(self.y_embedder(y, self.training, force_drop_ids))  # y_emb [B, D]
        if c.conditioning in ("adaln-zero", "adaln"):
            c_vec = sum(cond)  # c = t_emb + y_emb  [B, D]
            for block in self.blocks:
                h = block(h, c_vec)
            h = self.final_layer(h, c_vec)  # [B, L, P*P*C']
        elif c.conditioning == "cross-attention":
            context = torch.stack(cond, dim=1)  # [B, 1 or 2, D]
            for block in self.blocks:
                h = block(h, context)
            h = self.final_layer(h)
        else:  # in-context: the condition tokens ride along and are dropped at the end
            h = torch.cat([torch.stack(cond, dim=1), h], dim=1)  # [B, n + L, D]
            for block in self.blocks:
                h = block(h)
            h = self.final_layer(h[:, len(cond):])  # [B, L, P*P*C']
        return unpatchify(h, c.patch_size, c.input_size, c.input_size)  # [B, C', H, W]


    def _forward_text(self, h: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
                      force_drop_ids: torch.Tensor | None, return_weights: bool = False):
        """The text conditionings: patch tokens h [B, N, D], t [B], caption ids [B, L] -> [B, C', H, W]
        (and each block's attention weights, with `return_weights`: see `text_attention`)."""
        c = self.config
        if (self.training and c.class_dropout_prob > 0) or force_drop_ids is not None:  # caption dropout [CFG]
            ids = drop_labels(ids, c.class_dropout_prob, NULL, force=force_drop_ids)
        text, pooled, mask = self.text_encoder(ids)  # [B, L, D], [B, D], [B, L]
        s = self.embed_time(t)  # PixArt-α: the modulation sees t only
        if self.pooled_embedder is not None:  # SD3: t_emb + MLP(pooled text)
            s = s + self.pooled_embedder(pooled)
        maps = []
        for block in self.blocks:
            if c.conditioning == "mmdit":
                out = block(h, text, s, mask, return_weights=return_weights)
                h, text = out[:2]
            else:
                out = block(h, s, text, mask, return_weights=return_weights)
                h = out[0] if return_weights else out
            if return_weights:
                maps.append(out[-1])
        out = unpatchify(self.final_layer(h, s), c.patch_size, c.input_size, c.input_size)
        return (out, maps) if return_weights else out

    @torch.no_grad()
    def text_attention(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        """How much each image token attends to each word, per block: a list of depth tensors
        [B, H, N, L] (cross-attention weights; for MMDiT the image-query, text-key part of the joint
        attention, which need not sum to one over the words)."""
        c = self.config
        if not c.reads_text:
            raise ValueError(f"text_attention needs a text conditioning, not {c.conditioning!r}")
        t, ids = self._check_inputs(x, t, ids, None)
        h = self.patch_embed(x) + self.pos_embed
        _, maps = self._forward_text(h, t, ids, None, return_weights=True)
        L = c.text_length
        return [m[:, :, L:, :L] if c.conditioning == "mmdit" else m for m in maps]


def make_dit(name: str, **overrides) -> DiT:
    """Build a DiT from a preset in `DIT_CONFIGS`, with fields overridden by keyword
    (e.g. ``make_dit("DiT-S/2", conditioning="in-context")``)."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; valid names: {list(DIT_CONFIGS)}")
    return DiT(replace(DIT_CONFIGS[name], **overrides))
