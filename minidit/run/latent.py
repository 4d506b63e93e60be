"""Latent diffusion: any diffusion objective run on the latents of a frozen autoencoder [LDM].

With the encoder E, decoder D and scaling factor s of a trained `minidit.autoencoder`:

    z0 = s · z,  z ~ q(z | x0) = N(μ(x0), σ²(x0))          (or z = μ(x0))   [LDM, Sec. 3.1, 4.3.2]
    L_latent(θ) = L_inner(θ; z0)                            the inner objective, unchanged, on z0
    x = D(ẑ0 / s),  ẑ0 ~ p_θ                                sampling: draw latents, then decode

s = 1 / std(z) is measured on training data when the run starts, so that z0 has unit
variance like the pixels the inner objective was designed for. Everything a checkpoint
needs to find its autoencoder again lives in the objective's plain config: the file path,
a SHA-256 fingerprint of its (EMA) weights, the latent shape [c, h, w] and s. Loading a
latent model whose autoencoder is missing or has changed is a `CheckpointError` that
says how to get the right one back. `AutoencoderObjective` trains the autoencoder itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from minidit.autoencoder import AUTOENCODER_BUILDERS, Autoencoder, latent_scaling_factor, vae_loss
from minidit.data import dataset_shape
from minidit.run import weights
from minidit.run.checkpoint import CheckpointError, load_weights, read_checkpoint
from minidit.run.fewstep import FEWSTEP_OBJECTIVES
from minidit.run.objectives import DIFFUSION_OBJECTIVES, Drawn, Sampler, objective_from_config

INNER_OBJECTIVES = {**DIFFUSION_OBJECTIVES, **FEWSTEP_OBJECTIVES}  # what a latent objective may wrap

POSTERIORS = ("sample", "mean")
SCALING_IMAGES = 2048  # training images whose latents set s


@dataclass
class AutoencoderObjective:
    """Train an `Autoencoder`: per-example loss `minidit.autoencoder.vae_loss`, time 0.

    Its one sampler, "prior", decodes z ~ N(0, I); with a tiny β these are not good images:
    that is what the latent diffusion model is for. `null_label` is accepted and unused.
    """

    kind: ClassVar[str] = "autoencoder"
    beta: float = 1e-4
    null_label: int | None = None

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")

    def config(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def loss(self, model, x0, y, generator):
        loss = vae_loss(model, x0, self.beta, generator)
        return loss, torch.zeros_like(loss)  # [B], [B]

    def sampler_names(self) -> tuple[str, ...]:
        return ("prior",)

    def make_sampler(self, model: nn.Module, name: str | None = None, steps: int | None = None,
                     cfg_scale: float | None = None, **options) -> Sampler:
        if name not in (None, "prior") or steps is not None or cfg_scale not in (None, 1.0) or options:
            raise ValueError(f"an autoencoder checkpoint has one sampler, 'prior' (decode z ~ N(0, I)), "
                             f"with no steps or guidance; got sampler={name!r}, steps={steps!r}, "
                             f"cfg_scale={cfg_scale!r}. Use `minidit eval` for its reconstructions")
        device = next(model.parameters()).device
        return Sampler("prior", None, "none", 1.0, device,
                       lambda shape, y, generator: Drawn(self.sample(model, shape, y, generator), 0))

    def sample(self, model, shape, y=None, generator=None):
        device = next(model.parameters()).device
        z = torch.randn((shape[0], *model.latent_shape), generator=generator,
                        device=generator.device if generator is not None else device).to(device)
        return model.decode(z).clamp(-1, 1)


def fingerprint(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 of a state dict: every key, dtype, shape and the raw bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{value.dtype}|{list(value.shape)}|".encode())
        h.update(value.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _train_hint(preset: str | None) -> str:
    how = f"minidit train --preset {preset}" if preset else "minidit train with an autoencoder preset"
    return f"train it with: {how} (or point objective.autoencoder=PATH at its latest.pt)"


def _autoencoder_of(path: str, preset: str | None) -> tuple[Autoencoder, dict]:
    """An (untrained) autoencoder of the checkpoint's architecture, and its EMA weights.

    `path` is a checkpoint file, or "pretrained:NAME" for one that ships with minidit.
    """
    if path.startswith(weights.PREFIX):
        ema, shipped = weights.read(path[len(weights.PREFIX):])
        config = shipped.config
    else:
        if not Path(path).is_file():
            raise CheckpointError(f"this latent model needs the autoencoder checkpoint {path}, which does not "
                                  f"exist; {_train_hint(preset)}")
        state = read_checkpoint(path)
        config, ema = state["config"], state["ema"]["model"]
    if config.get("model") not in AUTOENCODER_BUILDERS:
        raise CheckpointError(f"{path} holds a {config.get('model')!r} model, not an autoencoder; {_train_hint(preset)}")
    channels, side, _ = dataset_shape(config["dataset"])
    model = AUTOENCODER_BUILDERS[config["model"]](channels, side, **config.get("model_overrides", {}))
    return model, ema


def load_autoencoder(path: str, expected: str | None = None, preset: str | None = None) -> tuple[Autoencoder, str]:
    """The EMA autoencoder of checkpoint `path` (or "pretrained:NAME"; eval mode, frozen, CPU)
    and its fingerprint.

    Raises:
        CheckpointError: the file is missing or unreadable, holds no autoencoder, or its
            fingerprint is not `expected`; the message says how to get the right one.
    """
    model, ema = _autoencoder_of(path, preset)
    load_weights(model, ema, path)
    found = fingerprint(model.state_dict())
    if expected is not None and found != expected:
        raise CheckpointError(f"the autoencoder at {path} is not the one this latent model was trained with "
                              f"(weights sha256 {found[:12]}..., expected {expected[:12]}...): restore that "
                              f"file, or retrain the latent model on this autoencoder")
    return model.eval().requires_grad_(False), found


def latent_input_shape(objective: dict) -> tuple[int, int, int]:
    """(c, h, w) that the network of a latent objective config sees: its `latent_shape`, else
    the shape of its autoencoder's latents (read from that checkpoint's config)."""
    if objective.get("latent_shape"):
        return tuple(objective["latent_shape"])
    model, _ = _autoencoder_of(objective.get("autoencoder", ""), objective.get("autoencoder_preset"))
    return model.latent_shape


@dataclass
class LatentObjective:
    """A diffusion objective (`inner`, a config of `minidit.run.objectives`) trained on latents.

    Args:
        autoencoder: path of the autoencoder's checkpoint (a `minidit train` run's latest.pt), or
            "pretrained:NAME" for one that ships with minidit (`minidit.run.weights`).
        inner: the diffusion objective's config, e.g. {"kind": "flow", ...}.
        autoencoder_preset: the preset that trains that autoencoder (named in error messages).
        latent_shape, fingerprint, scaling_factor: filled in by `with_autoencoder_facts` when a
            run starts; a config with a fingerprint loads (and checks) its autoencoder at once.
        posterior: encode to a draw from q(z | x) ("sample", as [LDM]) or its "mean".
        null_label: passed to the inner objective.
    """

    kind: ClassVar[str] = "latent"
    autoencoder: str = ""
    inner: dict = field(default_factory=lambda: {"kind": "flow"})
    autoencoder_preset: str | None = None
    latent_shape: list | None = None
    fingerprint: str | None = None
    scaling_factor: float | None = None
    posterior: str = "sample"
    null_label: int | None = None

    def __post_init__(self) -> None:
        if self.posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {self.posterior!r}")
        if not self.autoencoder:
            raise ValueError("a latent objective needs autoencoder=PATH of an autoencoder checkpoint")
        if self.inner.get("kind") in ("latent", "autoencoder"):
            raise ValueError(f"the inner objective must be a diffusion objective, got {self.inner.get('kind')!r}")
        unclipped = {"clip_x0": False} if self.inner.get("kind") == "ddpm" else {}  # latents have no [-1, 1]
        self.inner_objective = objective_from_config({"null_label": self.null_label, **unclipped, **self.inner},
                                                     INNER_OBJECTIVES)
        self._ae = None
        if self.fingerprint is not None:  # a trained model: its autoencoder must be there, unchanged
            self.load()

    # the sampling defaults of the inner objective
    sampler = property(lambda self: self.inner_objective.sampler)
    sample_steps = property(lambda self: self.inner_objective.sample_steps)
    cfg_scale = property(lambda self: self.inner_objective.cfg_scale)
    cfg_interval = property(lambda self: self.inner_objective.cfg_interval)

    def config(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def load(self) -> Autoencoder:
        """The frozen autoencoder (loaded once, checked against the fingerprint)."""
        if self._ae is None:
            self._ae, _ = load_autoencoder(self.autoencoder, self.fingerprint, self.autoencoder_preset)
        return self._ae

    def _ready(self, device: torch.device) -> Autoencoder:
        if self.scaling_factor is None:
            raise ValueError("the latent objective has no scaling_factor yet; the training engine fills it in "
                             "(minidit.run.latent.with_autoencoder_facts)")
        return self.load().to(device)

    @torch.no_grad()
    def encode(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images x0 [B, C, H, W] -> scaled latents z0 = s·z [B, c, h, w] (float32)."""
        posterior = self._ready(x0.device).encode(x0)
        z = posterior.sample(generator) if self.posterior == "sample" else posterior.mode()
        return z.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, z0: Tensor) -> Tensor:
        """Scaled latents z0 [B, c, h, w] -> images D(z0 / s) [B, C, H, W]."""
        return self._ready(z0.device).decode(z0.float() / self.scaling_factor)

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor | None, generator: torch.Generator | None):
        # 1. the frozen encoder: z0 = s · z [LDM, Sec. 4.3.2]; 2. the inner loss on z0, unchanged
        return self.inner_objective.loss(model, self.encode(x0, generator), y, generator)

    def sampler_names(self) -> tuple[str, ...]:
        return self.inner_objective.sampler_names()

    def make_sampler(self, model: nn.Module, name: str | None = None, steps: int | None = None,
                     cfg_scale: float | None = None, **options) -> Sampler:
        """The inner objective's sampler, on the latent shape, then decoded."""
        bound = self.inner_objective.make_sampler(model, name, steps, cfg_scale, **options)

        def run(shape, y, generator):
            drawn = bound((shape[0], *self.load().latent_shape), y, generator)  # latents [B, c, h, w]
            return Drawn(self.decode(drawn.x).clamp(-1, 1), drawn.nfe)  # images [B, C, H, W], in the data range

        return dataclasses.replace(bound, run=run)

    def sample(self, model, shape, y=None, generator=None):
        """Images [B, C, H, W] for an image `shape`: latents from the inner sampler, decoded."""
        return self.make_sampler(model)(shape, y, generator).x


def with_autoencoder_facts(config, images: Tensor | None = None, resume: bool = False):
    """Fill in the autoencoder facts of a latent TrainConfig: fingerprint, latent shape and the
    scaling factor s = 1 / std(z) measured on `SCALING_IMAGES` of the training `images`.

    Other configs come back unchanged. When resuming, the values stored in `out_dir/latest.pt`
    are kept (and the autoencoder checked against them), so the run continues exactly.
    """
    objective = dict(config.objective)
    if objective.get("kind") != "latent":
        return config
    LatentObjective(**{k: v for k, v in objective.items() if k not in ("kind", "fingerprint")})  # validate
    latest = Path(config.out_dir) / "latest.pt"
    if resume and latest.is_file():
        previous = read_checkpoint(latest)["config"]["objective"]
        if previous.get("autoencoder") == objective.get("autoencoder"):
            for key in ("fingerprint", "latent_shape", "scaling_factor"):
                objective[key] = objective.get(key) or previous.get(key)
    ae, objective["fingerprint"] = load_autoencoder(objective["autoencoder"], objective.get("fingerprint"),
                                                    objective.get("autoencoder_preset"))
    channels, side, _ = dataset_shape(config.dataset)
    if (ae.config.in_channels, ae.config.image_size) != (channels, side):
        raise ValueError(f"the autoencoder {objective['autoencoder']} reads {ae.config.in_channels}x"
                         f"{ae.config.image_size}x{ae.config.image_size} images, but {config.dataset!r} has "
                         f"{channels}x{side}x{side}")
    objective["latent_shape"] = list(ae.latent_shape)
    if objective.get("scaling_factor") is None:
        if images is None:
            raise ValueError("measuring the latent scaling factor needs the training images")
        g = torch.Generator().manual_seed(config.seed)
        subset = images[torch.randperm(len(images), generator=g)[:SCALING_IMAGES]]  # [n, C, H, W]
        sample = objective.get("posterior", "sample") == "sample"
        objective["scaling_factor"] = latent_scaling_factor(ae, subset, sample=sample, generator=g)
    return dataclasses.replace(config, objective=objective)
