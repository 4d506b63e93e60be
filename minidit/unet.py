"""A small ADM-style U-Net: the convolutional backbone that the Diffusion Transformer replaced.

The U-Net of DDPM and ADM [DDPM, App. B; ADM, Sec. 3] reads x_t [C, H, W] at full resolution,
halves the resolution level by level on the way down and doubles it on the way up, where every
block also reads the feature map of the same resolution from the way down (the skip connections
of [U-Net]). The condition c = t_emb + y_emb comes from the DiT's own embedders and enters every
residual block through adaptive group normalisation, the U-Net's counterpart of adaLN:

    AdaGN(h, c) = GN(h) · (1 + y_s) + y_b,     (y_s, y_b) = W SiLU(c) + b          [ADM, Sec. 3]
    Res(h, c)   = skip(h) + conv(SiLU(AdaGN(conv(SiLU(GN(h))), c)))               (3 x 3 convs)
    Attn(h)     = h + MultiHead(GN(h)),  the H·W positions read as L tokens       (low resolutions)
    MACs(conv)  = H_out · W_out · C_in · C_out · k²                               (one image)

A 3 x 3 convolution mixes a pixel with its 8 neighbours only, with the same weights everywhere
(locality and translation equivariance): the receptive field grows by 2 pixels per conv at full
resolution, twice as fast after each halving, and attention at the lowest resolution lets every
position see every other. That inductive bias is what the DiT gives up [DiT, Sec. 1].

Every residual branch ends in a zero-initialised layer (the second conv of a residual block, the
output projection of attention), and so does the output conv: at initialisation every block is
the identity and the network outputs zeros, as adaLN-Zero makes the DiT [DiT, Sec. 3.2].

Sizes: the `len(channel_mult) − 1` downsamplings must halve H exactly each time, so `input_size`
must be divisible by `2^(len(channel_mult) − 1)`: 28 → 14 → 7 with three levels, 32 → 16 → 8 → 4
with four. Any other size is refused with a ValueError when the config is made; nothing is
padded or cropped, so the network sees the image as it is.

Time convention, as the DiT's: `t` is a float [B] on the caller's scale (DDPM steps 0..T−1, or
1000 t for a continuous t in [0, 1]). Label y = num_classes is the null label of classifier-free
guidance [CFG, Eq. 6], reached in training by label dropout.

References: [DDPM] Ho et al. 2020; [ADM] Dhariwal, Nichol 2021 (diffusion models beat GANs);
[U-Net] Ronneberger et al. 2015; [DiT] Peebles, Xie 2023; [CFG] Ho, Salimans 2022.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidit.attention import BACKENDS, Attention
from minidit.embeddings import LabelEmbedder, TimestepEmbedder, check_conditioned_inputs


@dataclass(frozen=True)
class UNetConfig:
    """A U-Net; level i has width model_channels · channel_mult[i] at side input_size / 2^i."""

    input_size: int
    in_channels: int
    model_channels: int = 32  # C_0, the width at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width of level i = C_0 · channel_mult[i]
    num_res_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (2,)  # levels with self-attention after each block (0: full size)
    num_heads: int = 4
    groups: int = 8  # GroupNorm groups
    num_classes: int = 10  # 0: an unconditional model
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    attention_backend: str = "sdpa"
    frequency_size: int = 256

    def __post_init__(self):
        downs = len(self.channel_mult) - 1
        if downs < 0 or min(self.channel_mult) < 1 or self.model_channels < 1 or self.num_res_blocks < 1:
            raise ValueError("need a non-empty channel_mult of positive ints, model_channels >= 1 and "
                             f"num_res_blocks >= 1, got {self.channel_mult}, {self.model_channels}, "
                             f"{self.num_res_blocks}")
        if self.input_size < 1 or self.input_size % 2**downs:
            raise ValueError(f"input_size={self.input_size} cannot be halved {downs} times (len(channel_mult) - 1 "
                             f"= {downs} downsamplings need a multiple of {2**downs}); shorten channel_mult "
                             "or pad the images")
        if bad := [i for i in self.attention_levels if not 0 <= i <= downs]:
            raise ValueError(f"attention_levels {bad} are not levels of channel_mult={self.channel_mult}")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"every width {self.widths} must be divisible by groups={self.groups}")
        attended = {self.widths[i] for i in (*self.attention_levels, downs)}  # the middle always attends
        if any(w % self.num_heads for w in attended):
            raise ValueError(f"the widths with attention {sorted(attended)} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError("num_classes must be >= 0 and class_dropout_prob in [0, 1)")

    @property
    def widths(self) -> tuple[int, ...]:
        """The width of each level, full resolution first."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def emb_dim(self) -> int:
        """E = 4 C_0, the width of the condition c (ADM's time-embedding width)."""
        return 4 * self.model_channels

    @property
    def out_channels(self) -> int:
        """C' = 2C with a learned variance (as the DiT's), else C."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


# Each is matched in forward GMACs per image to a DiT; at equal GMACs a U-Net holds ~4x fewer
# parameters, since its convolutions spend their MACs on many positions with few weights.
UNET_CONFIGS = {
    # 0.012 GMACs, 0.08 M parameters ~ a DiT of width 64, depth 4, patch 4: 0.011 GMACs, 0.33 M
    "unet-mnist-s": UNetConfig(28, 1, 8, (1, 2, 2), 1, (), num_heads=2, groups=4),  # attention: middle only
    # 0.059 GMACs, 0.49 M parameters ~ dit-mnist-cpu: 0.062 GMACs, 1.9 M
    "unet-mnist-cpu": UNetConfig(28, 1, 16, (1, 2, 3), 1, (2,), num_heads=4, groups=8),
    # 0.19 GMACs, 1.2 M parameters ~ a DiT of width 192, depth 8, patch 4: 0.18 GMACs, 5.4 M
    "unet-mnist-l": UNetConfig(28, 1, 32, (1, 2, 2), 1, (2,), num_heads=4, groups=8),
    # the main job's 4 x 7 x 7 latents, one level (7 is odd: no halving): 0.021 GMACs, 0.64 M parameters
    # ~ dit-mnist-latent: 0.024 GMACs, 0.72 M
    "unet-mnist-latent": UNetConfig(7, 4, 56, (1,), 1, (0,), num_heads=4, groups=8),
    # DDPM's CIFAR-10 U-Net shape (C_0 = 128, 2 blocks a level, attention at 16 x 16):
    # 6.2 GMACs, 38 M parameters ~ dit-cifar10-gpu: 6.05 GMACs, 32.5 M
    "unet-cifar10-gpu": UNetConfig(32, 3, 128, (1, 2, 2, 2), 2, (1,), num_heads=4, groups=32),
}


class ResBlock(nn.Module):
    """Res(h, c) above: h [B, C_in, H, W] and c [B, E] -> [B, C_out, H, W]; a 1 x 1 conv skip
    when the width changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, affine=False)  # AdaGN supplies the scale and shift
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out))  # c -> (y_s, y_b)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)  # zero at init: the block starts as skip(h)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # 1. GN, SiLU, 3 x 3 conv: the width becomes C_out
        r = self.conv1(F.silu(self.norm1(h)))  # [B, C_out, H, W]
        # 2. AdaGN: the condition scales and shifts every channel [ADM, Sec. 3]
        y_s, y_b = self.modulation(c)[:, :, None, None].chunk(2, dim=1)  # [B, 2 C_out] -> 2 x [B, C_out, 1, 1]
        r = self.norm2(r) * (1 + y_s) + y_b
        # 3. SiLU, 3 x 3 conv, and the residual sum
        return self.skip(h) + self.conv2(F.silu(r))


class AttentionBlock(nn.Module):
    """Attn(h) above: multi-head self-attention (`minidit.attention.Attention`) over the H·W
    positions of h [B, C, H, W], each a token of width C."""

    def __init__(self, channels: int, num_heads: int, groups: int, backend: str = "sdpa"):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, num_heads, backend=backend)  # proj zero at init: the identity

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, C, H, W = h.shape
        tokens = self.norm(h).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, L, C], L = H·W
        out = self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)  # [B, L, C] -> [B, C, H, W]
        return h + out


class UNetBlock(nn.Module):
    """One step of a level: a residual block, then self-attention where the level asks for it."""

    def __init__(self, c_in: int, c_out: int, config: UNetConfig, attention: bool):
        super().__init__()
        self.res = ResBlock(c_in, c_out, config.emb_dim, config.groups)
        self.attn = (AttentionBlock(c_out, config.num_heads, config.groups, config.attention_backend)
                     if attention else None)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.res(h, c)
        return h if self.attn is None else self.attn(h)


class UNet(nn.Module):
    """ADM-style U-Net with the DiT's signature: (x_t [B, C, H, W], t [B], y [B]) -> [B, C', H, W]."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        widths, levels = cfg.widths, len(cfg.widths)
        # the condition c = t_emb + y_emb [B, E], with the DiT's embedders
        self.t_embedder = TimestepEmbedder(cfg.emb_dim, cfg.frequency_size)
        self.y_embedder = (LabelEmbedder(cfg.num_classes, cfg.emb_dim, cfg.class_dropout_prob)
                           if cfg.num_classes > 0 else None)
        # the way down; `skips` lists the width of every feature map kept for the way up
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch, skips = widths[0], [widths[0]]
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList())
            for _ in range(cfg.num_res_blocks):
                self.down[i].append(UNetBlock(ch, w, cfg, i in cfg.attention_levels))
                ch = w
                skips.append(ch)
            if i < levels - 1:  # a stride-2 conv halves H and W
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        # the middle, at the lowest resolution: residual block, attention, residual block
        self.middle = UNetBlock(ch, ch, cfg, attention=True)
        self.middle_res = ResBlock(ch, ch, cfg.emb_dim, cfg.groups)
        # the way up, lowest level first: one block more per level, each reading one skip
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for k, i in enumerate(reversed(range(levels))):
            self.up.append(nn.ModuleList())
            for _ in range(cfg.num_res_blocks + 1):
                self.up[k].append(UNetBlock(ch + skips.pop(), widths[i], cfg, i in cfg.attention_levels))
                ch = widths[i]
            if i > 0:  # nearest-neighbour doubling, then a 3 x 3 conv
                self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                                   nn.Conv2d(ch, ch, 3, padding=1)))
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self):
        # convs and Linears keep PyTorch's defaults (as ADM), the embedders their N(0, 0.02^2);
        # every residual branch and the output start at zero [ADM; DiT, Sec. 3.2]
        zero = [self.conv_out]
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero.append(m.conv2)
            elif isinstance(m, AttentionBlock):
                zero.append(m.attn.proj)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check_inputs(self, x, t, y, force_drop_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raise ValueError on a bad input (`minidit.embeddings.check_conditioned_inputs`); return t
        as a float [B] and y [B]."""
        c = self.config
        return check_conditioned_inputs(x, t, y, force_drop_ids, in_channels=c.in_channels,
                                        input_size=c.input_size, num_classes=c.num_classes, name="U-Net")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network output (eps, v, velocity, ... as the objective trains it).

        Args:
            x: noisy inputs x_t [B, C, H, W], H = W = input_size.
            t: network times [B] (or a scalar), any float scale.
            y: labels [B] in [0, num_classes), or the null label num_classes; None means the
                null label for every sample (and is required when num_classes=0).
            force_drop_ids: bool [B]; where true, y is replaced by the null label. Random label
                dropout (probability class_dropout_prob) happens in train mode.

        Returns:
            [B, C', H, W] with C' = 2C when `learn_sigma`.
        """
        t, y = self._check_inputs(x, t, y, force_drop_ids)
        # 1. the condition c = t_emb + y_emb  [B, E]
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)
        # 2. down: keep every feature map for the skip connections
        h = self.conv_in(x)  # [B, C_0, H, W]
        hs = [h]
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, c)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # [B, w, H / 2^i, W / 2^i] -> [B, w, H / 2^(i+1), W / 2^(i+1)]
                hs.append(h)
        # 3. the middle, at the lowest resolution
        h = self.middle_res(self.middle(h, c), c)
        # 4. up: each block reads the last kept map of its resolution, stacked on the channels
        for k, level in enumerate(self.up):
            for block in level:
                h = block(torch.cat([h, hs.pop()], dim=1), c)  # [B, w + w_skip, h, w] -> [B, w', h, w]
            if k < len(self.upsample):
                h = self.upsample[k](h)  # [B, w', h, w] -> [B, w', 2h, 2w]
        # 5. GN, SiLU, and the zero-initialised output conv
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, C', H, W]


def make_unet(name: str, **overrides) -> UNet:
    """Build a U-Net from a preset in `UNET_CONFIGS`, fields overridden by keyword (lists become
    tuples, as JSON `model_overrides` give them); `minidit.run.build.make_model` passes
    in_channels, input_size and num_classes this way."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown U-Net config {name!r}; valid names: {list(UNET_CONFIGS)}")
    for key in ("channel_mult", "attention_levels"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return UNet(replace(UNET_CONFIGS[name], **overrides))


# the builders of `minidit.run.build.MODEL_BUILDERS`: name -> f(in_channels=, input_size=, num_classes=, ...)
UNET_BUILDERS = {name: functools.partial(make_unet, name) for name in UNET_CONFIGS}
