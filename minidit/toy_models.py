"""A small MLP denoiser for low-dimensional (2-D) toy data, with a sinusoidal time embedding.

The timestep enters through the Transformer's sinusoidal features of t (`minidit.embeddings`) [Vaswani et al.
2017, Sec. 3.5], as in DDPM's U-Net [DDPM, App. B]:

    emb(t) = [cos(t·ω_0), ..., cos(t·ω_{F/2−1}), sin(t·ω_0), ..., sin(t·ω_{F/2−1})],
    ω_j = max_period^(−j/(F/2))

then an MLP maps emb(t) to the width D and adds it to every residual block:

    h ← h + W_2 · SiLU(W_1 · SiLU(h + e_t))

t may be an integer timestep (DDPM/DDIM) or a float (a fractional index, or continuous t
scaled by `t_scale`), so the same network serves discrete and continuous samplers.
Call it as `model(x, t)` or, when built with `num_classes`, `model(x, t, y)`; the label
`num_classes` is the null label used by classifier-free guidance. `TinyMLP`, an even
smaller denoiser of whole images, stands in for the DiT in tests of the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minidit.embeddings import timestep_frequencies


@dataclass
class ToyDenoiserConfig:
    """Width and depth of `ToyDenoiser`."""

    dim: int = 2  # data dimension
    width: int = 128  # hidden width D
    depth: int = 3  # residual blocks
    t_features: int = 64  # sinusoidal features F
    t_scale: float = 1.0  # multiply t by this before embedding (e.g. 1000 for t in [0, 1])
    num_classes: int | None = None  # labels 0..num_classes-1, plus the null label num_classes


TOY_CONFIGS = {
    "tiny": ToyDenoiserConfig(width=64, depth=2),
    "small": ToyDenoiserConfig(),
    "base": ToyDenoiserConfig(width=256, depth=4),
}


class ToyDenoiser(nn.Module):
    """Residual MLP predicting ε (or x0, v, a velocity ...) for x [B, dim] at time t [B]."""

    def __init__(self, config: ToyDenoiserConfig | None = None, **overrides):
        super().__init__()
        config = config or ToyDenoiserConfig()
        if overrides:
            config = ToyDenoiserConfig(**{**config.__dict__, **overrides})
        if config.t_features % 2:
            raise ValueError(f"t_features must be even, got {config.t_features}")
        self.config = config
        D = config.width
        self.embed_x = nn.Linear(config.dim, D)
        self.embed_t = nn.Sequential(nn.Linear(config.t_features, D), nn.SiLU(), nn.Linear(D, D))
        self.embed_y = nn.Embedding(config.num_classes + 1, D) if config.num_classes else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D)) for _ in range(config.depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(D, config.dim))
        nn.init.zeros_(self.out[1].weight)  # start as the zero prediction: the loss begins at E‖target‖²
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x [B, dim], t [B] -> prediction [B, dim]."""
        features = timestep_frequencies(t * self.config.t_scale, self.config.t_features)  # [B, F]
        e = self.embed_t(features.to(x.dtype))  # [B, D]
        if self.embed_y is not None:
            if y is None:  # no label given: the null label
                y = torch.full((x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device)
            e = e + self.embed_y(y)
        elif y is not None:
            raise ValueError("this ToyDenoiser has no classes (num_classes=None) but y was given")
        h = self.embed_x(x)  # [B, D]
        for block in self.blocks:
            h = h + block(h + e)
        return self.out(h)


class TinyMLP(nn.Module):
    """A small MLP denoiser for tests and toys: x [B, C, H, W], t [B], y [B] -> [B, C, H, W].

    t enters as t / 1000 (a step 0..T-1 or 1000·t); y = None reads as the null label.
    """

    def __init__(self, in_channels: int, input_size: int, num_classes: int = 0, hidden: int = 64):
        super().__init__()
        D = in_channels * input_size * input_size
        self.num_classes, self.x_in, self.t_in = num_classes, nn.Linear(D, hidden), nn.Linear(1, hidden)
        self.y_in = nn.Embedding(num_classes + 1, hidden)  # the last row is the null label
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, D))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        y = torch.full((B,), self.num_classes, device=x.device) if y is None else y
        h = self.x_in(x.reshape(B, C * H * W)) + self.t_in(t.float()[:, None] / 1000) + self.y_in(y)
        return self.out(h).reshape(B, C, H, W)  # [B, CHW] -> [B, C, H, W]
