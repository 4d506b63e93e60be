"""The training engine: AdamW, warm-up + cosine learning rate, EMA, bf16, checkpoints, resume, DDP.

One optimiser step k on a global batch of `batch_size` examples, split over W processes and
A accumulation micro-steps of batch_size / (W·A) examples each (`train_step`):

    g    = (1 / (W·A)) Σ_ranks Σ_micro ∇ mean_b ℓ_b            (DDP averages over ranks)
    g    ← g · min(1, clip / ‖g‖)                               (gradient clipping)
    θ    ← AdamW(θ, g, lr_k)                                    [AdamW, Loshchilov, Hutter 2019]
    lr_k = lr · (k + 1) / warmup  while k < warmup, then  lr_min + (lr − lr_min)(1 + cos πp) / 2
           with p = (k − warmup) / (steps − warmup) when `cosine` (else lr)
    θ_ema ← d θ_ema + (1 − d) θ                                  (minidit.ema)

The per-example loss ℓ_b and its time t_b ∈ [0, 1] come from an objective
(`minidit.run.objectives`), the network from `minidit.run.build.make_model`. Launch with
`torchrun --nproc_per_node=N` for DistributedDataParallel (NCCL on GPU, gloo on CPU): each rank
reads its shard of every epoch, rank 0 logs and saves. A checkpoint holds every state needed
to continue bit-exactly; nothing in the loop waits for the device except at log time.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minidit import data, plotting
from minidit.device import get_device, seed_everything
from minidit.ema import EMA
from minidit.run import checkpoint as ckpt
from minidit.run.build import make_model, make_objective, training_data
from minidit.run.config import TrainConfig
from minidit.run.latent import with_autoencoder_facts


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


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


@dataclass
class Run:
    """Everything a training run holds between steps (one per process)."""

    config: TrainConfig
    model: nn.Module
    net: nn.Module  # the model as the step calls it: under DDP and/or torch.compile
    ema: EMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    objective: object
    batches: object  # iterator of (x0 [b, C, H, W], y [b]) micro-batches
    generator: torch.Generator  # t, noise and label dropout of the objective
    rank: int
    world: int
    step: int = 0
    elapsed: float = 0.0  # training seconds of earlier runs (resumes)
    lr: float = 0.0  # the learning rate of the last step


def train_step(run: Run, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step: A micro-batches, gradients all-reduced on the last one only.

    Returns:
        Every micro-batch's per-example loss [A·b] and time [A·b] (detached), and ‖g‖ before clipping.
    """
    config, A = run.config, run.config.grad_accum
    run.opt.zero_grad(set_to_none=True)
    losses, times = [], []
    for a in range(A):
        x0, y = next(run.batches)
        y = y if config.class_conditional else None
        with nullcontext() if run.world == 1 or a == A - 1 else run.net.no_sync():
            with autocast:
                loss_b, t = run.objective.loss(run.net, x0, y, run.generator)  # [b], [b]
            (loss_b.float().mean() / A).backward()
        losses.append(loss_b.detach().float())
        times.append(t.detach().float())
    grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip or math.inf)
    run.lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    run.ema.update(run.model)
    run.step += 1
    return torch.cat(losses), torch.cat(times), grad_norm


def train(config: TrainConfig, resume: bool = False, *, progress: bool = True, objective=None,
          sample_fn=None) -> dict:
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
    rank, world, device, owns_group = _init_distributed(config)
    try:
        run = _start(config, resume, objective, rank, world, device)
        return _loop(run, device, sample_fn or run.objective.sample, progress)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _start(config: TrainConfig, resume: bool, objective, rank: int, world: int, device: torch.device) -> Run:
    """Data, model, EMA, optimiser and schedule (the same on every rank), restored when resuming."""
    micro, rest = divmod(config.batch_size, world * config.grad_accum)
    if rest:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by processes x grad_accum "
                         f"= {world} x {config.grad_accum}")
    images, labels = training_data(config)
    config = with_autoencoder_facts(config, images, resume)  # latent runs: fingerprint, shape, scale
    # 1. model, EMA, optimiser, schedule: the same initialisation on every rank
    seed_everything(config.seed)
    model = make_model(config).to(device)
    ema = EMA(model, config.ema_decay, config.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, config))
    objective = objective if objective is not None else make_objective(config)
    # 2. data: rank r reads every W-th example of each epoch's permutation
    if device.type != "cpu":
        images, labels = images.to(device), labels.to(device)  # batches are gathered on the device
    loader = data.TensorLoader(images, labels, micro, seed=config.seed, rank=rank, world_size=world,
                               augment=data.random_hflip if config.hflip else None)
    # 3. per-rank randomness (t, noise, label dropout); the objective draws from `generator`
    seed_everything(config.seed + 10_007 * rank)
    generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
    step, micro_step, elapsed = 0, 0, 0.0
    latest = Path(config.out_dir) / "latest.pt"
    if resume and latest.is_file():
        step, micro_step, elapsed = ckpt.restore_run(ckpt.read_checkpoint(latest), config.to_dict(),
                                                     rank, world, model, ema, opt, sched, generator)
    elif resume and rank == 0:
        print(f"minidit.train: no checkpoint at {latest}; starting a new run")
    net = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(config, model, torch.compile(net) if config.compile else net, ema, opt, sched, objective,
               loader.stream(micro_step), generator, rank, world, step, elapsed)


def _loop(run: Run, device: torch.device, sample_fn, progress: bool) -> dict:
    """Steps until the step or time budget ends; logs, sample grids and checkpoints on their intervals."""
    config, out = run.config, Path(run.config.out_dir)
    log_path, latest = out / "log.jsonl", out / "latest.pt"
    if run.rank == 0:
        _prepare_folder(out, config, log_path, run.step)
    autocast = autocast_for(config, device)
    meter = _Meter(config.loss_bins, device, run.step)
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress or run.rank != 0, desc="train")
    summary = {"step": run.step, "loss": None, "images_per_s": None, "checkpoint": None}
    run_start = time.perf_counter()
    while run.step < config.steps:
        loss_b, t, grad_norm = train_step(run, autocast)
        meter.add(loss_b, t, run.step)
        bar.update(1)
        # log, sample, save; the loss is checked first, so a bad state is never saved
        final = run.step == config.steps
        due = {k: every > 0 and run.step % every == 0 for k, every in
               (("log", config.log_every), ("sample", config.sample_every), ("save", config.checkpoint_every))}
        if final or any(due.values()):
            meter.check_finite(run.world, latest)
        if final or due["log"]:
            out_of_time = config.minutes is not None and run.elapsed + time.perf_counter() - run_start > 60 * config.minutes
            record, stop = meter.read(run, grad_norm, out_of_time, run_start)
            final = final or stop
            summary.update(step=run.step, loss=record["loss"], images_per_s=record["images_per_s"])
            if run.rank == 0:
                plotting.append_log(log_path, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if run.rank == 0 and config.sample_every and (final or due["sample"]):
            with meter.paused():
                _sample_grid(run, sample_fn, device, out, log_path)
        if final or due["save"]:
            with meter.paused():
                summary["checkpoint"] = _save(run, latest, log_path, run.elapsed + time.perf_counter() - run_start)
        if final:
            break
    bar.close()
    run.elapsed += time.perf_counter() - run_start
    if run.rank == 0:
        plotting.plot_run(out)
    return {**summary, "elapsed_s": run.elapsed, "model": run.model, "ema_model": run.ema.model}


# ----------------------------------------------------------------------------- helpers


class _Meter:
    """Running sums on the device, read at log time: loss per t bin and count per t bin, the
    stop vote, the first step with a NaN or infinite loss, and the images/s clock."""

    def __init__(self, bins: int, device: torch.device, step: int):
        self.bins = bins
        self.stats = torch.zeros(1 + 2 * bins, device=device)  # [stop vote, sums, counts]; float32: MPS
        self.first_bad = torch.tensor(-1, device=device)
        self.tick, self.tick_step, self.pause = time.perf_counter(), step, 0.0

    def add(self, loss_b: torch.Tensor, t: torch.Tensor, step: int) -> None:
        bin_of_t = (t.clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)  # [b]
        self.stats[1:].index_add_(0, torch.cat([bin_of_t, bin_of_t + self.bins]),  # loss sums, then counts
                                  torch.cat([loss_b, torch.ones_like(loss_b)]))
        bad = ~torch.isfinite(loss_b).all()
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)

    def check_finite(self, world: int, latest: Path) -> None:
        """Raise NonFiniteLossError if any rank saw a NaN or infinite loss (all ranks agree)."""
        never = torch.iinfo(torch.int64).max
        step = torch.where(self.first_bad < 0, never, self.first_bad)
        if world > 1:
            dist.all_reduce(step, op=dist.ReduceOp.MIN)
        if step.item() != never:
            kept = f"the last good checkpoint is {latest}" if latest.is_file() else "no checkpoint was written"
            raise NonFiniteLossError(f"the training loss became NaN or infinite at step {step.item()}; "
                                     f"stopped ({kept}). Lower the learning rate or clip the gradients.")

    def read(self, run: Run, grad_norm: torch.Tensor, out_of_time: bool, run_start: float) -> tuple[dict, bool]:
        """The log record since the last read, and whether any rank voted to stop (time is up)."""
        if out_of_time:
            self.stats[0] = 1.0  # this rank votes to stop; one vote stops every rank
        if run.world > 1:
            dist.all_reduce(self.stats)
        sums, counts = self.stats[1:1 + self.bins].tolist(), self.stats[1 + self.bins:].tolist()
        now = time.perf_counter()
        seconds = max(now - self.tick - self.pause, 1e-9)
        record = {"event": "train", "step": run.step, "loss": sum(sums) / sum(counts), "lr": run.lr,
                  "grad_norm": grad_norm.item(), "elapsed_s": round(run.elapsed + now - run_start, 3),
                  "images_per_s": (run.step - self.tick_step) * run.config.batch_size / seconds,
                  "loss_by_t": [s / c if c else None for s, c in zip(sums, counts)]}
        stop = self.stats[0].item() > 0
        self.stats.zero_()
        self.tick, self.tick_step, self.pause = now, run.step, 0.0
        return record, stop

    @contextmanager
    def paused(self):
        """Time spent inside does not count towards images/s (sampling, saving)."""
        begin = time.perf_counter()
        yield
        self.pause += time.perf_counter() - begin


def _prepare_folder(out: Path, config: TrainConfig, log_path: Path, step: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # temporary files of a save that was killed
        stale.unlink()
    plotting.truncate_log(log_path, step)  # drop what a stopped run logged after its checkpoint
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def _sample_grid(run: Run, sample_fn, device: torch.device, out: Path, log_path: Path) -> None:
    """The EMA model's samples at this step, from a fixed seed (the same noise at every step)."""
    config = run.config
    channels, side, classes = data.dataset_shape(config.dataset)
    y = torch.arange(config.n_samples, device=device) % classes if config.class_conditional else None
    path = plotting.save_samples(sample_fn, run.ema.model, (config.n_samples, channels, side, side), y,
                                 out / "samples" / f"step_{run.step:07d}.png", config.seed)
    plotting.append_log(log_path, {"event": "sample", "step": run.step, "path": str(path)})
    plotting.plot_run(out)  # loss.png and loss_by_t.png, so far


def _save(run: Run, latest: Path, log_path: Path, elapsed: float) -> str:
    state = ckpt.run_state(run.step, run.config.to_dict(), run.model, run.ema, run.opt, run.sched, run.generator,
                           run.step * run.config.grad_accum, elapsed, run.world)
    path = str(ckpt.save_run(state, latest, run.rank, run.world, run.config.keep_checkpoints))
    if run.rank == 0:
        plotting.append_log(log_path, {"event": "checkpoint", "step": run.step, "path": str(latest)})
    return path


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
