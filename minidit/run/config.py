"""A training run as plain data: `TrainConfig`, stored in every checkpoint, and the named presets.

A config names what to build (model, objective, dataset), how to optimise (batch, learning
rate and its schedule, clipping, EMA, precision) and how long to run (steps and/or minutes),
and where to write. `PRESETS` are the recipes the README and the tutorials use; the command
line changes them with key=value overrides (`minidit.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from minidit import data

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything a run needs; stored as plain data in every checkpoint.

    `batch_size` is the global batch of one optimiser step (all processes and accumulation
    micro-steps together). Intervals count optimiser steps; 0 turns sampling or saving off
    (a last checkpoint and sample grid are still written at the end).
    """

    model: str = "dit-mnist-cpu"  # a name of minidit.dit.DIT_CONFIGS, or of minidit.run.build.MODEL_BUILDERS
    model_overrides: dict = field(default_factory=dict)  # e.g. {"depth": 4}
    objective: dict = field(default_factory=lambda: {"kind": "ddpm"})  # see minidit.run.objectives
    dataset: str = "mnist"  # a name of minidit.data.DATASETS, or "synthetic" (tests)
    dataset_size: int | None = None  # use only the first N training examples
    data_root: str | None = None  # else $MINIDIT_DATA, else the cache folder
    class_conditional: bool = True
    captions: bool = False  # read captions (minidit.captions: MNIST, Fashion-MNIST) instead of labels: a text conditioning
    hflip: bool = False  # random left-right flips (CIFAR-10)
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cosine: bool = False  # decay from lr to lr_min over the steps after the warm-up
    lr_min: float = 0.0
    grad_clip: float | None = 1.0  # None: no clipping (the norm is still logged)
    max_bad_steps: int = 5  # stop after this many bad steps in a row (minidit.run.guard)
    divergence_factor: float | None = 10.0  # a loss above this times its running mean is a bad step
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # d = min(ema_decay, (1 + n) / (10 + n))
    precision: str = "auto"  # "auto": bf16 on CUDA from Ampere (capability 8.0) on, fp16 + grad scaler before, else fp32
    compile: bool = False  # torch.compile the network
    device: str | None = None  # None: minidit.device.get_device()
    steps: int = 10_000
    minutes: float | None = None  # also stop after this much training time (all resumes)
    log_every: int = 100
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: bool = False  # also keep step_0001000.pt beside latest.pt
    n_samples: int = 64
    loss_bins: int = 10  # loss-by-timestep bins over t in [0, 1]
    seed: int = 0
    out_dir: str = "runs/minidit"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name, valid in {"dataset": [*data.DATASETS, "synthetic"], "precision": PRECISIONS}.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        for name, low in {"batch_size": 1, "grad_accum": 1, "steps": 1, "n_samples": 1, "loss_bins": 1,
                          "log_every": 1, "warmup_steps": 0, "sample_every": 0, "checkpoint_every": 0,
                          "seed": 0, "max_bad_steps": 1}.items():
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an int >= {low}, got {getattr(self, name)!r}")
        for name in ("lr", "grad_clip", "minutes", "dataset_size"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number{'' if name == 'lr' else ' or None'}, "
                                 f"got {value!r}")
        if self.divergence_factor is not None and not (1 < self.divergence_factor < math.inf):
            raise ValueError(f"divergence_factor must be a number > 1 or None, got {self.divergence_factor!r}")
        if not 0 <= self.lr_min <= self.lr or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"need 0 <= lr_min <= lr and two betas in [0, 1), got lr_min={self.lr_min}, "
                             f"lr={self.lr}, betas={self.betas}")

    def to_dict(self) -> dict:
        """Plain JSON-like data (tuples become lists), for checkpoints and config.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are a ValueError."""
        if unknown := sorted(set(values) - {f.name for f in dataclasses.fields(cls)}):
            raise ValueError(f"unknown TrainConfig fields {unknown}; see minidit.run.config.TrainConfig")
        return cls(**{**values, "betas": tuple(values.get("betas", cls.betas))})


# Recipes. mnist-flow-cpu: the tutorials' and studies' recipe on pixels (rectified flow, small batches,
# Euler x 10, CFG 1.5). mnist-cpu, the main job: tuned for 10 minutes on a slow machine
# (benchmarks/mnist_recipe.py): a small DiT on the latents of the shipped autoencoder, a high learning rate
# whose cosine follows the time budget, Heun x 5 and guidance only at low noise.
_FLOW = {"kind": "flow", "t_sampling": "logit_normal", "sampler": "euler", "sample_steps": 10, "cfg_scale": 1.5}
_CPU = dict(model="dit-mnist-cpu", dataset="mnist", batch_size=32, lr=2e-3, warmup_steps=100, cosine=True,
            steps=5000, minutes=10.0, ema_decay=0.998, log_every=50, sample_every=1000, checkpoint_every=500)
_GPU = dict(batch_size=256, lr=2e-4, warmup_steps=1000, cosine=True, ema_decay=0.9999,
            sample_every=5000, checkpoint_every=5000)
# Latent diffusion [LDM]: an autoencoder (labels unused), then a DiT on its latents (patch 1: 49 / 64 tokens)
_AE = dict(objective={"kind": "autoencoder", "beta": 1e-3}, class_conditional=False, n_samples=16)
_MNIST_Z = {"kind": "latent", "autoencoder": "runs/mnist-ae-cpu/latest.pt", "autoencoder_preset": "mnist-ae-cpu",
            "latent_shape": [4, 7, 7], "inner": _FLOW}
# Heun x 5 (10 network calls), guidance 1.5 only where sigma/alpha <= 2 [Interval]: the best of the settings
# tried by benchmarks/mnist_recipe.py --tune-sampling latent-small-10k --sampling-set latent
_MAIN_Z = {**_MNIST_Z, "autoencoder": "pretrained:mnist-ae",
           "inner": {**_FLOW, "sampler": "heun", "sample_steps": 5, "cfg_interval": [0.0, 2.0]}}
# sampled as DDPM does, stochastically: DDIM with η = 1 (DDPM's ancestral step on a respaced grid [DDIM, Eq. 16])
# on 100 steps, guided at every step with scale 1.5. Of the settings tried on the shipped 8,000-step model
# (n 300, floor 14.1): this one scored FD 17.5, accuracy 98.3%; deterministic DDIM x 20 at 1.5 about the same
# (17.1, 97.7%); guidance 2.5 drew every digit right but at FD 42-50 (too little variety); 1.0, FD 22.5, 88.7%
_DDPM_Z = {"kind": "ddpm", "schedule": "linear", "prediction": "eps", "sampler": "ddim", "eta": 1.0,
           "sample_steps": 100, "cfg_scale": 1.5}
# the text models: the main job's sampler with guidance 2.5 on the same interval, of the scales
# benchmarks/text_to_image.py swept the one whose FD sits at its floor while the prompts' digits and
# attributes are followed more often than at 1.5
_TEXT_Z = {**_MAIN_Z, "inner": {**_MAIN_Z["inner"], "cfg_scale": 2.5}}
_CIFAR_Z = {"kind": "latent", "autoencoder": "runs/cifar10-ae-gpu/latest.pt", "autoencoder_preset": "cifar10-ae-gpu",
            "latent_shape": [4, 8, 8], "inner": {**_FLOW, "sample_steps": 50, "cfg_scale": 2.0}}
PRESETS: dict[str, TrainConfig] = {
    "mnist-cpu": TrainConfig(objective=_MAIN_Z, **{**_CPU, "model": "dit-mnist-latent", "lr": 5e-3, "steps": 10_000,
                                                  "ema_decay": 0.999}, out_dir="runs/mnist-cpu"),
    "mnist-flow-cpu": TrainConfig(objective=_FLOW, **_CPU, out_dir="runs/mnist-flow-cpu"),
    "mnist-ddpm-cpu": TrainConfig(objective={"kind": "ddpm", "schedule": "cosine", "prediction": "v",
                                             "sampler": "ddim", "sample_steps": 20, "cfg_scale": 1.5},
                                  **_CPU, out_dir="runs/mnist-ddpm-cpu"),
    # the shipped DDPM-style model (pretrained:mnist-ddpm): the main job's recipe with DDPM's own objective,
    # ε-prediction on the linear table, T = 1000, sampled stochastically (DDIM, η = 1). (Not the cosine table: its last ᾱ is ~0,
    # where x̂0 = (x − sqrt(1 − ᾱ) ε̂)/sqrt(ᾱ) amplifies ε̂'s error without bound, and latents cannot be clipped.)
    "mnist-ddpm-latent-cpu": TrainConfig(objective={**_MAIN_Z, "inner": _DDPM_Z},
                                         **{**_CPU, "model": "dit-mnist-latent", "lr": 5e-3, "steps": 10_000,
                                            "ema_decay": 0.999}, out_dir="runs/mnist-ddpm-latent-cpu"),
    # text to image (minidit.captions): the main job's latent recipe reading captions instead of labels,
    # by cross-attention [PixArt-α]; the same with "conditioning": "mmdit" reads them by joint attention [SD3]
    "mnist-text-cpu": TrainConfig(objective=_TEXT_Z, captions=True,
                                  model_overrides={"conditioning": "text-cross-attention"},
                                  **{**_CPU, "model": "dit-mnist-latent", "lr": 5e-3, "steps": 10_000,
                                     "minutes": 20.0, "ema_decay": 0.999}, out_dir="runs/mnist-text-cpu"),
    # text to image for one GPU: Fashion-MNIST's garments captioned the same way ("a thick coat, slanted
    # left"), read by cross-attention by the DiT-B-wide pixel model of mnist-gpu (no flips: a mirror leans the other way)
    "fashion-text-gpu": TrainConfig(model="dit-mnist-gpu", dataset="fashion-mnist", captions=True,
                                    model_overrides={"conditioning": "text-cross-attention"},
                                    objective={**_FLOW, "sample_steps": 20, "cfg_scale": 2.0}, steps=30_000, **_GPU,
                                    out_dir="runs/fashion-text-gpu"),
    "mnist-gpu": TrainConfig(model="dit-mnist-gpu", objective=_FLOW, dataset="mnist", steps=30_000, **_GPU,
                             out_dir="runs/mnist-gpu"),
    "cifar10-gpu": TrainConfig(model="dit-cifar10-gpu", objective={**_FLOW, "sample_steps": 50, "cfg_scale": 2.0},
                               dataset="cifar10", hflip=True, steps=100_000, **_GPU, out_dir="runs/cifar10-gpu"),
    "mnist-ae-cpu": TrainConfig(**_AE, **{**_CPU, "model": "ae-mnist", "steps": 2500, "minutes": 4.0, "lr": 1e-3},
                                out_dir="runs/mnist-ae-cpu"),
    "mnist-latent-cpu": TrainConfig(**_CPU, model_overrides={"patch_size": 1}, objective=_MNIST_Z,
                                    out_dir="runs/mnist-latent-cpu"),
    "cifar10-ae-gpu": TrainConfig(model="ae-cifar10", **_AE, dataset="cifar10", hflip=True, steps=20_000,
                                  **{**_GPU, "batch_size": 128}, out_dir="runs/cifar10-ae-gpu"),
    "cifar10-latent-gpu": TrainConfig(model="dit-cifar10-gpu", model_overrides={"patch_size": 1}, objective=_CIFAR_Z,
                                      dataset="cifar10", hflip=True, steps=100_000, **_GPU,
                                      out_dir="runs/cifar10-latent-gpu"),
}

# Few-step students (minidit.run.fewstep) of a trained teacher. On MNIST the teacher is the shipped main
# job (pretrained:mnist-dit, a flow on the shipped autoencoder's latents) and each student trains on the
# same latents for 15 CPU-minutes (progressive distillation: three 5-minute rounds, 8 -> 4 -> 2 -> 1 steps);
# on CIFAR-10 they follow cifar10-gpu on pixels. Students start from their teacher's weights (CT: from
# scratch) at a lower learning rate; the teacher's guidance is distilled (MeanFlow: trained) in, so
# students sample at scale 1. A consistency loss swings with the noise level of its pairs: a spike
# counts as divergence only far above the usual.
_CPU_STUDENT = {**_CPU, "model": "dit-mnist-latent", "steps": 20_000, "minutes": 15.0, "lr": 5e-4, "ema_decay": 0.999}
_GPU_STUDENT = {**_GPU, "model": "dit-cifar10-gpu", "dataset": "cifar10", "hflip": True, "steps": 50_000, "lr": 1e-4,
                "minutes": None}
_CM = {"kind": "consistency", "sampler": "consistency", "sample_steps": 1}
_MF = {"kind": "meanflow", "sampler": "meanflow", "sample_steps": 1, "init_from_teacher": True}
_TWO_TIMES = {"second_time": True}  # MeanFlow's DiT reads (t, r)


def _students(data: str, teacher: str, base: dict, ct: dict, pd_rounds: tuple[int, ...],
              latent: dict | None = None) -> dict[str, TrainConfig]:
    """The few-step presets of one dataset: CD, CT from scratch (`ct`: its changes to `base` and to the
    objective), MeanFlow (trained and distilled) and the rounds of progressive distillation, each
    round's teacher the round before it. With `latent` (a latent objective's fields), every student
    is that objective around its own (the teacher's latents)."""
    suffix = "cpu" if data == "mnist" else "gpu"
    wrap = (lambda inner: {**latent, "inner": inner}) if latent else (lambda inner: inner)
    presets = {
        f"{data}-cd-{suffix}": TrainConfig(**base, divergence_factor=100.0, objective=wrap({
            **_CM, "mode": "cd", "teacher": teacher, "init_from_teacher": True, "N": 18, "solver": "heun"})),
        f"{data}-ct-{suffix}": TrainConfig(**{**base, **ct["run"]}, divergence_factor=100.0,
                                           objective=wrap({**_CM, "mode": "ct", **ct["objective"]})),
        f"{data}-meanflow-{suffix}": TrainConfig(**base, model_overrides=_TWO_TIMES, objective=wrap({
            **_MF, "teacher": teacher, "omega": 1.5 if data == "mnist" else 2.0})),
        f"{data}-meanflow-distill-{suffix}": TrainConfig(**base, model_overrides=_TWO_TIMES, objective=wrap({
            **_MF, "mode": "distill", "teacher": teacher})),
    }
    for steps in pd_rounds:
        name = f"{data}-pd{steps}-{suffix}"
        presets[name] = TrainConfig(**{**base, "minutes": base["minutes"] and base["minutes"] / len(pd_rounds)},
                                    objective=wrap({"kind": "progressive", "teacher": teacher,
                                                    "teacher_steps": 2 * steps, "sampler": "euler",
                                                    "sample_steps": steps}))
        teacher = f"runs/{name}/latest.pt"
    return {name: dataclasses.replace(config, out_dir=f"runs/{name}") for name, config in presets.items()}


# CT starts from scratch at the main job's learning rate; on the CPU its curriculum doubles N from 11 to 161
PRESETS.update(_students("mnist", "pretrained:mnist-dit", _CPU_STUDENT,
                         {"run": {"lr": 5e-3}, "objective": {"s1": 160}}, (4, 2, 1),
                         latent={k: v for k, v in _MAIN_Z.items() if k != "inner"}))
PRESETS.update(_students("cifar10", "runs/cifar10-gpu/latest.pt", _GPU_STUDENT,
                         {"run": {"lr": 2e-4, "steps": 100_000}, "objective": {}}, (8, 4, 2, 1)))
