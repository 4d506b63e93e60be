"""Steering a sampler: class labels, classifier-free guidance, label dropout and inpainting.

Classifier-free guidance trains one network both with labels and with a "null" label (the
label dropped at random, `drop_labels`), then extrapolates from the unconditional prediction
towards the conditional one:

    ε̃(x_t, y) = ε(x_t, ∅) + s · (ε(x_t, y) − ε(x_t, ∅))                  [CFG, Eq. 6]

s = 1 is the conditional model, s = 0 the unconditional one, s > 1 sharper samples. The
combination is linear, and so are the maps between ε, x0, v, the score and the velocity at a
fixed x_t, so the same formula serves a network that predicts any of them. `guided` binds
labels and a scale to a `Denoiser`; its network is then evaluated once per step on the
doubled batch [x, x] with labels [y, ∅].

Guidance helps only in the middle of the chain: at high noise it pulls every sample towards
the same few modes, at low noise it changes little [Interval]. With an
`interval` (σ_lo, σ_hi] the guided denoiser applies s only where the noise level
σ = sigma(t)/alpha(t) (EDM's σ, the same on every process) lies in it, and is the plain
conditional model (one call of batch B, half the cost) elsewhere.

Inpainting with a model trained without masks (the replacement trick, [SDE, App. I.2];
RePaint without resampling) is a sampler callback: after each step to level t it overwrites
the known pixels with a fresh forward sample of the known image at that level,

    x_t ← m ⊙ (alpha(t) x0_known + sigma(t) z) + (1 − m) ⊙ x_t,

and with the known image itself after the last step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from minidit.denoiser import Denoiser
from minidit.process import Process, noise_like


def cfg_predict(model: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor, scale: float,
                null_label: int) -> Tensor:
    """Classifier-free guided output of `model(x, t, y)`, from ONE call on the doubled batch [CFG, Eq. 6].

    Args:
        model: called as `model(x, t, y)` on [2B, ...].
        x: inputs [B, ...]; t: times [B] (passed through unchanged).
        y: class labels [B] (LongTensor).
        scale: guidance scale s (1 = conditional, 0 = unconditional).
        null_label: the label id that the model was trained to read as "no label".

    Returns:
        u + s·(c − u), shaped like the model's output for B inputs.
    """
    x_both = torch.cat([x, x], dim=0)  # [2B, ...]
    t_both = torch.cat([t, t], dim=0)  # [2B]
    y_both = torch.cat([y, torch.full_like(y, int(null_label))], dim=0)  # [2B]: labels, then null
    cond, uncond = model(x_both, t_both, y_both).chunk(2, dim=0)  # [B, ...] each
    return uncond + scale * (cond - uncond)


@dataclass(eq=False)
class Guided(Denoiser):
    """A denoiser bound to labels `y` [B] and classifier-free guidance scale `cfg_scale` (see the
    module docstring); `guided` builds one. `interval`: guide only where σ/α ∈ (lo, hi]."""

    y: Tensor | None = None
    cfg_scale: float = 1.0
    null_label: int | None = None
    interval: tuple[float, float] | None = None

    def guides_at(self, t: Tensor | float) -> Tensor:
        """Whether guidance applies at t: a bool tensor, 0-d for one time, [B] for one per sample."""
        if self.cfg_scale == 1.0:
            return torch.tensor(False)
        if self.interval is None:
            return torch.tensor(True)
        noise = self.process.sigma(t) / self.process.alpha(t)  # EDM's σ: the noise-to-signal ratio
        return (noise > self.interval[0]) & (noise <= self.interval[1])

    def network_output(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """The guided output at (x [B, ...], t): one call of batch B outside the interval, one call
        of batch 2B (labels y, then ∅) inside it. Labels come from the binding, not from `y`."""
        if y is not None:
            raise ValueError("a guided denoiser has its labels bound; call network_output(x, t)")
        labelled = super().network_output
        if self.y is None:  # an unconditional model
            return labelled(x, t)
        inside = self.guides_at(t)
        if inside.ndim == 0 and not bool(inside):  # one time, outside: the conditional model alone
            return labelled(x, t, self.y)
        t_both = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim else t  # [2B] or one time
        null = torch.full_like(self.y, int(self.null_label))
        cond, uncond = labelled(torch.cat([x, x]), t_both, torch.cat([self.y, null])).chunk(2)  # [B, ...] each
        out = uncond + self.cfg_scale * (cond - uncond)
        if inside.ndim:  # one time per sample: guide only where inside
            out = torch.where(inside.to(x.device).reshape(-1, *([1] * (x.ndim - 1))), out, cond)
        return out


def guided(den: Denoiser, y: Tensor | None, cfg_scale: float = 1.0, null_label: int | None = None,
           interval: tuple[float, float] | None = None) -> Guided:
    """`den` conditioned on labels y [B], guided with scale `cfg_scale` [CFG, Eq. 6].

    Args:
        den: a denoiser whose network takes labels, `network(x, τ, y)`.
        y: labels [B] or caption token ids [B, L] (checked once here), or None for an
            unconditional model.
        cfg_scale: s; 1 is the plain conditional model (one call of batch B per step).
        null_label: the "no label" id (for captions: the `<null>` token, `minidit.text.NULL`);
            needed when cfg_scale != 1.
        interval: (σ_lo, σ_hi): guide only where σ = sigma(t)/alpha(t) lies in (σ_lo, σ_hi]
            [Interval]; None guides at every step.

    Returns:
        A fresh denoiser (nfe = 0), evaluated as `den(x, t)` or `.network_output(x, t)`.
    """
    if y is None and cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} needs class labels y (and null_label)")
    if y is not None and (not isinstance(y, Tensor) or y.ndim not in (1, 2) or y.dtype.is_floating_point):
        raise ValueError(f"y must be an integer tensor of labels [B] or caption token ids [B, L], got "
                         f"{getattr(y, 'shape', y)!r}")
    if cfg_scale != 1.0 and null_label is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs null_label, the id of the 'no label' class")
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not 0 <= lo < hi:
            raise ValueError(f"the guidance interval (σ_lo, σ_hi] needs 0 <= σ_lo < σ_hi, got {interval}")
        interval = (lo, hi)
    fields = {f.name: getattr(den, f.name) for f in dataclasses.fields(Denoiser) if f.init}
    return Guided(**fields, y=y, cfg_scale=float(cfg_scale), null_label=null_label, interval=interval)


def drop_labels(y: Tensor, p: float, null_label: int, generator: torch.Generator | None = None,
                force: Tensor | None = None) -> Tensor:
    """Replace each label by `null_label` with probability p (or where `force` [B] is true): the
    label dropout that trains classifier-free guidance [CFG, Sec. 3.2]. y is [B] labels, or [B, L]
    token ids of captions, where a dropped caption becomes L null tokens (the null caption)."""
    if force is None:
        noise_device = generator.device if generator is not None else y.device
        force = torch.rand(y.shape[:1], generator=generator, device=noise_device).to(y.device) < p
    force = force.to(device=y.device, dtype=torch.bool).reshape(-1, *([1] * (y.ndim - 1)))  # [B, 1, ...]
    return torch.where(force, torch.full_like(y, null_label), y)


class Inpainting:
    """A sampler callback that keeps the known pixels of `x0_known` where `mask` is 1.

    Args:
        x0_known: the known image [B, ...] in data units.
        mask: 1 where a pixel is known, 0 where it is to be generated; broadcastable to x0_known.
        process: the process the sampler runs on.
        generator: for the fresh forward samples.
    """

    def __init__(self, x0_known: Tensor, mask: Tensor, process: Process,
                 generator: torch.Generator | None = None) -> None:
        try:
            torch.broadcast_shapes(mask.shape, x0_known.shape)
        except RuntimeError as err:
            raise ValueError(f"mask {tuple(mask.shape)} must broadcast to x0_known {tuple(x0_known.shape)}") from err
        self.x0_known, self.mask, self.process, self.generator = x0_known, mask, process, generator

    def __call__(self, info: dict) -> Tensor:
        """The state after step `info["i"]` with the known pixels replaced (see the module docstring)."""
        x = info["x"]
        if x.shape != self.x0_known.shape:
            raise ValueError(f"x0_known {tuple(self.x0_known.shape)} must match the sample shape {tuple(x.shape)}")
        known = self.x0_known.to(x)
        if not info["last"]:  # noise the known image to the level just reached
            known = self.process.perturb(known, info["t_next"], noise_like(x, self.generator))
        mask = self.mask.to(x)
        return mask * known + (1 - mask) * x
