"""Steering a sampler: classifier-free guidance and inpainting.

Classifier-free guidance trains one network both with labels and with a "null" label
(the label dropped at random), then extrapolates from the unconditional prediction
towards the conditional one:

    ε̃(x_t, y) = ε(x_t, ∅) + s · (ε(x_t, y) − ε(x_t, ∅))                  [CFG, Eq. 6]

s = 1 is the conditional model, s = 0 the unconditional one, s > 1 sharper samples.
The combination is linear, and so are the maps between ε, x0, v and the score at a
fixed x_t, so the same formula serves a network that predicts any of them; and it
serves discrete (integer t) and continuous (float t) models alike.

Inpainting with a model trained without masks (the replacement trick, [SDE, App. I.2];
RePaint without resampling): after each reverse step to level t, the known pixels
are overwritten with a fresh forward sample of the known image at that level,

    x_t ← m ⊙ q_sample(x0_known, t) + (1 − m) ⊙ x_t,

and with the known image itself after the last step.

Model convention: `model(x, t)` when there are no labels, `model(x, t, y)` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def model_output(model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
    """Call `model(x, t)` or `model(x, t, y)` and check the output has x's shape."""
    out = model(x, t) if y is None else model(x, t, y)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model output must have the input's shape {tuple(x.shape)}, got {shape}")
    return out


def cfg_predict(
    model: nn.Module, x: Tensor, t: Tensor, y: Tensor, scale: float, null_label: int
) -> Tensor:
    """Classifier-free guided prediction with ONE batched model call  [CFG, Eq. 6].

    Args:
        model: called as `model(x, t, y)`, returning a tensor shaped like `x`.
        x: noisy inputs [B, ...].
        t: timesteps [B] (integer or float, passed through unchanged).
        y: class labels [B] (LongTensor).
        scale: guidance scale s (1 = conditional, 0 = unconditional).
        null_label: the label id that the model was trained to read as "no label".

    Returns:
        [B, ...] the guided prediction u + s·(c − u), in the model's output type.
    """
    if y is None:
        raise ValueError("cfg_predict needs class labels y; got y=None")
    if null_label is None:
        raise ValueError("cfg_predict needs null_label (the id of the 'no label' class)")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape [B]={x.shape[0]}, got {tuple(y.shape)}")
    y_null = torch.full_like(y, int(null_label))
    x_both = torch.cat([x, x], dim=0)  # [2B, ...]
    t_both = torch.cat([t, t], dim=0)  # [2B]
    y_both = torch.cat([y, y_null], dim=0)  # [2B]: conditional half, then null half
    out = model_output(model, x_both, t_both, y_both)  # [2B, ...]
    cond, uncond = out.chunk(2, dim=0)  # [B, ...] each
    return uncond + scale * (cond - uncond)


def guided_output(
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    y: Tensor | None = None,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
) -> Tensor:
    """What every sampler calls: the plain model when cfg_scale == 1, else `cfg_predict`."""
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape [B]={x.shape[0]}, got {tuple(y.shape)}")
    if cfg_scale == 1.0:
        return model_output(model, x, t, y)
    if y is None or null_label is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs both class labels y and null_label")
    return cfg_predict(model, x, t, y, cfg_scale, null_label)


@dataclass
class Inpainting:
    """Keep the known pixels of `x0_known` where `mask` is 1 while sampling.

    Pass it as `inpainting=` to `GaussianDiffusion.sample` or `ddim_sample`.

    Attributes:
        x0_known: the known image [B, ...] in data units.
        mask: 1 where a pixel is known, 0 where it is to be generated; broadcastable
            to `x0_known` (e.g. [B, 1, H, W]).
    """

    x0_known: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        try:
            torch.broadcast_shapes(self.mask.shape, self.x0_known.shape)
        except RuntimeError as err:
            raise ValueError(
                f"mask {tuple(self.mask.shape)} must broadcast to x0_known {tuple(self.x0_known.shape)}"
            ) from err

    def __call__(
        self, diffusion: Any, x: Tensor, t_prev: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Overwrite the known pixels of x (now at level `t_prev`; −1 means data)."""
        if x.shape != self.x0_known.shape:
            raise ValueError(
                f"x0_known {tuple(self.x0_known.shape)} must match the sample shape {tuple(x.shape)}"
            )
        known = self.x0_known.to(device=x.device, dtype=x.dtype)
        if t_prev >= 0:  # noise the known image to the current level [DDPM, Eq. 4]
            t = torch.full((x.shape[0],), t_prev, dtype=torch.long, device=x.device)
            known = diffusion.q_sample(known, t, generator=generator)
        mask = self.mask.to(device=x.device, dtype=x.dtype)
        return mask * known + (1 - mask) * x
