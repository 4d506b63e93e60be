"""Conditioning embedders of the Diffusion Transformer: the timestep t and the class label y.

The timestep goes through a fixed sinusoidal code (the Transformer's position code applied
to a real number) and a two-layer MLP [DiT, Sec. 3.2; DDPM, App. B]; with
omega_i = 10000^(-i/(F/2)), i = 0..F/2-1 and F the frequency width (256),

    freq(t) = [cos(t omega_0), ..., cos(t omega_{F/2-1}), sin(t omega_0), ..., sin(t omega_{F/2-1})]
    t_emb   = W_2 SiLU(W_1 freq(t) + b_1) + b_2                                  (D numbers)

Time convention: `t` is a float tensor [B] on any scale. DDPM passes the integer step
0..T-1; continuous-time objectives (t in [0, 1]) should pass 1000 t so that the code's
frequencies are used over the same range.

The label is a learned table of num_classes + 1 rows; the last row is the null label "no
class". Training replaces each label by the null label with probability p, so one network
learns both eps(x_t, y) and eps(x_t, null), as classifier-free guidance needs [CFG, Sec. 3.2].

References: [DiT] Peebles, Xie 2023; [DDPM] Ho et al. 2020; [CFG] Ho, Salimans 2022.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minidit.guidance import drop_labels


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """The sinusoidal code freq(t) above.

    Args:
        t: timesteps [B], any float scale (integers are converted).
        dim: code width F (even).
        max_period: the longest period; the shortest is 2 pi.

    Returns:
        [B, dim] float32 tensor: cosines in the first half, sines in the second.
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # [F/2]
    angles = t.float()[:, None] * omega[None, :]  # [B, F/2]
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # [B, F]


class TimestepEmbedder(nn.Module):
    """t [B] -> t_emb [B, D]: the sinusoidal code followed by Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_frequencies(t, self.frequency_size)  # [B, F]
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # [B, D]


class LabelEmbedder(nn.Module):
    """y [B] -> y_emb [B, D], with the null label `num_classes` and label dropout for CFG.

    Args:
        num_classes: number of real classes K; row K of the table is the null label.
        dim: embedding width D.
        dropout_prob: probability p of replacing a label by the null label in training.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, dim)  # the last row is the null label
        nn.init.normal_(self.table.weight, std=0.02)

    def drop(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null label: where `force_drop_ids` is true if given,
        else at random with probability p (`minidit.guidance.drop_labels`)."""
        return drop_labels(y, self.dropout_prob, self.num_classes, force=force_drop_ids)

    def forward(
        self, y: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Labels [B] (int64) -> embeddings [B, D]; dropout only when `train` (and p > 0)
        or when `force_drop_ids` is given."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            y = self.drop(y, force_drop_ids)
        return self.table(y)


def check_conditioned_inputs(x: torch.Tensor, t, y: torch.Tensor | None, force_drop_ids: torch.Tensor | None, *,
                             in_channels: int, input_size: int, num_classes: int,
                             name: str = "network") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the (x, t, y) of a class-conditional denoiser (the DiT, the U-Net) and return t as a
    float [B] and y [B] (None for the null label becomes the null label num_classes).

    Raises ValueError on: x not [B, in_channels, input_size, input_size]; t neither a scalar nor
    [B]; labels given to an unconditional network (num_classes = 0); y not an integer [B];
    force_drop_ids not [B]; a label outside [0, num_classes] (checked on the CPU only, where it
    costs nothing: on an accelerator it would make every step wait, so there the front doors,
    sampling and the data loader, check labels once).
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != (in_channels, input_size, input_size):
        raise ValueError(f"x must have shape [B, {in_channels}, {input_size}, {input_size}], got {list(x.shape)}")
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != B):
        raise ValueError(f"t must be a scalar or have shape [{B}], got {list(t.shape)}")
    if num_classes == 0:
        if y is not None or force_drop_ids is not None:
            raise ValueError(f"y (and force_drop_ids) given to an unconditional {name} (num_classes=0)")
        return t.float().expand(B), None
    if y is None:  # no label at all: the null label, an unconditional prediction
        y = torch.full((B,), num_classes, dtype=torch.long, device=x.device)
    if y.shape != (B,) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be an integer tensor of shape [{B}], got {y.dtype} {list(y.shape)}")
    if force_drop_ids is not None and force_drop_ids.shape != (B,):
        raise ValueError(f"force_drop_ids must have shape [{B}], got {list(force_drop_ids.shape)}")
    if B > 0 and y.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(y.min()) < 0 or int(y.max()) > num_classes:
            raise ValueError(f"labels y must lie in [0, {num_classes}) or be the null label {num_classes}, "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
    return t.float().expand(B), y
