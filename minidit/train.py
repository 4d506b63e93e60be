"""The training loop: AdamW, warm-up + cosine learning rate, EMA, bf16, checkpoints, resume, DDP.

One optimiser step k on a global batch of `batch_size` examples, split over W processes and
A accumulation micro-steps of batch_size / (W·A) examples each:

    g    = (1 / (W·A)) Σ_ranks Σ_micro ∇ mean_b ℓ_b            (DDP averages over ranks)
    g    ← g · min(1, clip / ‖g‖)                               (gradient clipping)
    θ    ← AdamW(θ, g, lr_k)                                    [AdamW, Loshchilov, Hutter 2019]
    lr_k = lr · (k + 1) / warmup  while k < warmup, then  lr_min + (lr − lr_min)(1 + cos πp) / 2
           with p = (k − warmup) / (steps − warmup) when `cosine` (else lr)
    θ_ema ← d θ_ema + (1 − d) θ                                  (minidit.ema)

The per-example loss ℓ_b and its time t_b ∈ [0, 1] come from an `Objective`
(minidit.objectives), the network from `make_model`. Launch with `torchrun --nproc_per_node=N`
for DistributedDataParallel (NCCL on GPU, gloo on CPU): each rank reads its shard of every
epoch, rank 0 logs and saves. A checkpoint holds every state needed to continue bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minidit import checkpoint as ckpt
from minidit import data, plotting
from minidit.autoencoder import AUTOENCODER_BUILDERS
from minidit.device import get_device, seed_everything
from minidit.ema import EMA
from minidit.latent import latent_input_shape, resolve_config
from minidit.objectives import Objective, objective_from_config
from minidit.toy_models import TinyMLP  # noqa: F401  (its old home; tests import it from here)

PRECISIONS = ("auto", "fp32", "bf16")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything a run needs; stored as plain data in every checkpoint.

    `batch_size` is the global batch of one optimiser step (all processes and accumulation
    micro-steps together). Intervals count optimiser steps; 0 turns sampling or saving off
    (a last checkpoint and sample grid are still written at the end).
    """

    model: str = "dit-mnist-cpu"  # a name of minidit.dit.DIT_CONFIGS, or one of MODEL_BUILDERS
    model_overrides: dict = field(default_factory=dict)  # e.g. {"depth": 4}
    objective: dict = field(default_factory=lambda: {"kind": "ddpm"})  # see objective_from_config
    dataset: str = "mnist"  # a name of minidit.data.DATASETS, or "synthetic" (tests)
    dataset_size: int | None = None  # use only the first N training examples
    data_root: str | None = None  # else $MINIDIT_DATA, else the cache folder
    class_conditional: bool = True
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
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # d = min(ema_decay, (1 + n) / (10 + n))
    precision: str = "auto"  # "auto": bf16 autocast on CUDA where supported, else fp32
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
                          "seed": 0}.items():
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an int >= {low}, got {getattr(self, name)!r}")
        for name in ("lr", "grad_clip", "minutes", "dataset_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive{'' if name == 'lr' else ' or None'}, "
                                 f"got {getattr(self, name)!r}")
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
            raise ValueError(f"unknown TrainConfig fields {unknown}; see minidit.train.TrainConfig")
        return cls(**{**values, "betas": tuple(values.get("betas", cls.betas))})


# Recipes. mnist-cpu: 10 min on a 2-core CPU, rectified flow, small batches, Euler x 10, CFG 1.5.
_FLOW = {"kind": "flow", "t_sampling": "logit_normal", "sampler": "euler", "sample_steps": 10, "cfg_scale": 1.5}
_CPU = dict(model="dit-mnist-cpu", dataset="mnist", batch_size=32, lr=2e-3, warmup_steps=100, cosine=True,
            steps=5000, minutes=10.0, ema_decay=0.998, log_every=50, sample_every=1000, checkpoint_every=500)
_GPU = dict(batch_size=256, lr=2e-4, warmup_steps=1000, cosine=True, ema_decay=0.9999,
            sample_every=5000, checkpoint_every=5000)
# Latent diffusion [LDM]: an autoencoder (labels unused), then a DiT on its latents (patch 1: 49 / 64 tokens)
_AE = dict(objective={"kind": "autoencoder", "beta": 1e-3}, class_conditional=False, n_samples=16)
_MNIST_Z = {"kind": "latent", "autoencoder": "runs/mnist-ae-cpu/latest.pt", "autoencoder_preset": "mnist-ae-cpu",
            "latent_shape": [4, 7, 7], "inner": _FLOW}
_CIFAR_Z = {"kind": "latent", "autoencoder": "runs/cifar10-ae-gpu/latest.pt", "autoencoder_preset": "cifar10-ae-gpu",
            "latent_shape": [4, 8, 8], "inner": {**_FLOW, "sample_steps": 50, "cfg_scale": 2.0}}
PRESETS: dict[str, TrainConfig] = {
    "mnist-cpu": TrainConfig(objective=_FLOW, **_CPU, out_dir="runs/mnist-cpu"),
    "mnist-ddpm-cpu": TrainConfig(objective={"kind": "ddpm", "schedule": "cosine", "prediction": "v",
                                             "sampler": "ddim", "sample_steps": 20, "cfg_scale": 1.5},
                                  **_CPU, out_dir="runs/mnist-ddpm-cpu"),
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


# ----------------------------------------------------------------------------- what to train


MODEL_BUILDERS = {"mlp": TinyMLP, **AUTOENCODER_BUILDERS}  # other names go to minidit.dit.make_dit


def dataset_shape(name: str) -> tuple[int, int, int]:
    """(channels, side, classes) of a dataset; "synthetic" is random 8x8 images (tests)."""
    if name == "synthetic":
        return 1, 8, 10
    info = data.DATASETS[name]
    return info.channels, info.image_size, info.num_classes


def make_model(config: TrainConfig) -> nn.Module:
    """The network of `config`, sized for its dataset (or its latents), with fresh weights."""
    channels, side, classes = dataset_shape(config.dataset)
    if config.objective.get("kind") == "latent":
        channels, side, _ = latent_input_shape(config.objective)  # the DiT sees c x h x w latents
    kwargs = {"in_channels": channels, "input_size": side,
              "num_classes": classes if config.class_conditional else 0, **config.model_overrides}
    if config.model in MODEL_BUILDERS:
        return MODEL_BUILDERS[config.model](**kwargs)
    from minidit.dit import make_dit  # the variance is never learned by minidit's objectives

    return make_dit(config.model, **{"learn_sigma": False, **kwargs})


def make_objective(config: TrainConfig) -> Objective:
    """The objective of `config`; its null label defaults to the number of classes."""
    null_label = dataset_shape(config.dataset)[2] if config.class_conditional else None
    return objective_from_config({"null_label": null_label, **config.objective})


def load_dataset(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images [N, C, H, W] in [-1, 1] and labels [N] of `config.dataset`."""
    if config.dataset == "synthetic":
        n = config.dataset_size or 512
        images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1234)) * 2 - 1
        return images, torch.arange(n) % 10
    images, labels = data.load_dataset(config.dataset, "train", root=config.data_root)
    return images[: config.dataset_size], labels[: config.dataset_size]


def lr_factor(step: int, config: TrainConfig) -> float:
    """lr_k / lr at 0-based step k: linear warm-up, then constant or cosine down to lr_min."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if not config.cosine:
        return 1.0
    p = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.lr_min / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def autocast_for(config: TrainConfig, device: torch.device):
    """The autocast context of `config.precision` on `device` (a no-op context for fp32)."""
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: bool = False, *, progress: bool = True,
          objective: Objective | None = None, sample_fn=None) -> dict:
    """Train `config.model` on `config.dataset`; rank 0 writes into `config.out_dir`:
    `config.json`, `log.jsonl`, `latest.pt`, `samples/step_*.png`, `loss.png`, `loss_by_t.png`.

    Args:
        config: the run (validated first).
        resume: continue from `out_dir/latest.pt` exactly where it stopped (the config may
            differ only in `checkpoint.RESUMABLE_CHANGES`); with no checkpoint there, start afresh.
        progress: show a tqdm bar with the loss and images/s (rank 0).
        objective: use this objective instead of `make_objective(config)`.
        sample_fn: ``f(model, shape, y, generator) -> images [B, C, H, W]`` for the sample
            grids; default the objective's `sample`.

    Returns:
        A summary: the final "step", the last logged "loss" and "images_per_s", "elapsed_s",
        the "checkpoint" path, and the trained "model" and "ema_model" (nn.Modules).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint stays.
    """
    config.validate()
    config = resolve_config(config, resume)  # latent runs: the autoencoder's fingerprint, shape, scale
    rank, world, device, owns_group = _init_distributed(config)
    try:
        return _train(config, resume, progress, objective, sample_fn, rank, world, device)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(config, resume, progress, objective, sample_fn, rank, world, device) -> dict:
    micro, rest = divmod(config.batch_size, world * config.grad_accum)
    if rest:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by processes x grad_accum "
                         f"= {world} x {config.grad_accum}")
    out = Path(config.out_dir)
    log_path, latest = out / "log.jsonl", out / "latest.pt"
    # 1. model, EMA, optimiser, schedule: the same initialisation on every rank
    seed_everything(config.seed)
    model = make_model(config).to(device)
    ema = EMA(model, config.ema_decay, config.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                            weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, config))
    objective = objective if objective is not None else make_objective(config)
    sample_fn = sample_fn or objective.sample
    # 2. data: rank r reads every W-th example of each epoch's permutation
    images, labels = load_dataset(config)
    if device.type != "cpu":
        images, labels = images.to(device), labels.to(device)  # batches are gathered on the device
    loader = data.TensorLoader(images, labels, micro, seed=config.seed, rank=rank, world_size=world,
                               augment=data.random_hflip if config.hflip else None)
    # 3. per-rank randomness (t, noise, label dropout); the objective draws from `generator`
    seed_everything(config.seed + 10_007 * rank)
    generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
    start, micro_step, elapsed = 0, 0, 0.0
    if resume and latest.is_file():
        start, micro_step, elapsed = ckpt.restore_run(ckpt.read_checkpoint(latest), config.to_dict(),
                                                      rank, world, model, ema, opt, sched, generator)
    elif resume and rank == 0:
        print(f"minidit.train: no checkpoint at {latest}; starting a new run")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # temporary files of a save that was killed
            stale.unlink()
        plotting.truncate_log(log_path, start)  # drop what a stopped run logged after its checkpoint
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    batches = loader.stream(micro_step)
    net = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    step_net = torch.compile(net) if config.compile else net
    autocast = autocast_for(config, device)
    channels, side, classes = dataset_shape(config.dataset)
    y_grid = torch.arange(config.n_samples, device=device) % classes if config.class_conditional else None
    # 4. running sums on the device, read at log time: [stop votes, loss per t bin, count per t bin];
    #    `first_bad` is the first step with a NaN or infinite loss
    bins = config.loss_bins
    stats = torch.zeros(1 + 2 * bins, device=device)  # float32: MPS has no float64
    first_bad = torch.tensor(-1, device=device)
    bar = tqdm(total=config.steps, initial=start, disable=not progress or rank != 0, desc="train")
    run_start = tick = time.perf_counter()
    tick_step, paused, step = start, 0.0, start
    summary = {"step": start, "loss": None, "images_per_s": None, "checkpoint": None}
    while step < config.steps:
        # 5. one optimiser step: A micro-batches, gradients all-reduced on the last one only
        opt.zero_grad(set_to_none=True)
        for a in range(config.grad_accum):
            x0, y = next(batches)
            y = y if config.class_conditional else None
            with nullcontext() if world == 1 or a == config.grad_accum - 1 else net.no_sync():
                with autocast:
                    loss_b, t = objective.loss(step_net, x0, y, generator)  # [B], [B]
                loss = loss_b.float().mean()
                (loss / config.grad_accum).backward()
            bin_of_t = (t.detach().float().clamp(0, 1) * bins).long().clamp(max=bins - 1)  # [B]
            stats[1:].index_add_(0, torch.cat([bin_of_t, bin_of_t + bins]),  # loss sums, then counts
                                 torch.cat([loss_b.detach().float(), torch.ones_like(bin_of_t).float()]))
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        ema.update(model)
        step += 1
        bar.update(1)
        # 6. log, sample, save; the loss is checked first, so a bad state is never saved
        now, final = time.perf_counter(), step == config.steps
        due = {k: every > 0 and step % every == 0 for k, every in
               (("log", config.log_every), ("sample", config.sample_every), ("save", config.checkpoint_every))}
        if final or any(due.values()):
            _check_finite(first_bad, world, latest)
        if final or due["log"]:
            if config.minutes is not None and elapsed + now - run_start > 60 * config.minutes:
                stats[0] = 1.0  # this rank votes to stop; one vote stops every rank
            if world > 1:
                dist.all_reduce(stats)
            sums, counts = stats[1:1 + bins].tolist(), stats[1 + bins:].tolist()
            record = {"event": "train", "step": step, "loss": sum(sums) / sum(counts), "lr": lr,
                      "grad_norm": grad_norm.item(), "elapsed_s": round(elapsed + now - run_start, 3),
                      "images_per_s": (step - tick_step) * config.batch_size / max(now - tick - paused, 1e-9),
                      "loss_by_t": [s / c if c else None for s, c in zip(sums, counts)]}
            final = final or stats[0].item() > 0
            stats.zero_()
            tick, tick_step, paused = now, step, 0.0
            summary.update(step=step, loss=record["loss"], images_per_s=record["images_per_s"])
            if rank == 0:
                plotting.append_log(log_path, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if rank == 0 and config.sample_every and (final or due["sample"]):
            begin = time.perf_counter()  # a fixed seed: the same noise at every step
            path = plotting.save_samples(sample_fn, ema.model, (config.n_samples, channels, side, side),
                                         y_grid, out / "samples" / f"step_{step:07d}.png", config.seed)
            plotting.append_log(log_path, {"event": "sample", "step": step, "path": str(path)})
            plotting.plot_run(out)  # loss.png and loss_by_t.png, so far
            paused += time.perf_counter() - begin
        if final or due["save"]:
            begin = time.perf_counter()
            state = ckpt.run_state(step, config.to_dict(), model, ema, opt, sched, generator,
                                   step * config.grad_accum, elapsed + begin - run_start, world)
            summary["checkpoint"] = str(ckpt.save_run(state, latest, rank, world, config.keep_checkpoints))
            if rank == 0:
                plotting.append_log(log_path, {"event": "checkpoint", "step": step, "path": str(latest)})
            paused += time.perf_counter() - begin
        if final:
            break
    bar.close()
    elapsed += time.perf_counter() - run_start
    if rank == 0:
        plotting.plot_run(out)
    return {**summary, "elapsed_s": elapsed, "model": model, "ema_model": ema.model}


# ----------------------------------------------------------------------------- helpers


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we made the process group: NCCL on CUDA, else gloo)."""
    device = get_device(config.device)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device, owns_group


def _check_finite(first_bad: torch.Tensor, world: int, latest: Path) -> None:
    """Raise NonFiniteLossError if any rank saw a NaN or infinite loss (all ranks agree)."""
    never = torch.iinfo(torch.int64).max
    step = torch.where(first_bad < 0, never, first_bad)
    if world > 1:
        dist.all_reduce(step, op=dist.ReduceOp.MIN)
    if step.item() != never:
        kept = f"the last good checkpoint is {latest}" if latest.is_file() else "no checkpoint was written"
        raise NonFiniteLossError(f"the training loss became NaN or infinite at step {step.item()}; "
                                 f"stopped ({kept}). Lower the learning rate or clip the gradients.")
