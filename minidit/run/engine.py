"""The training engine: AdamW, warm-up + cosine learning rate, EMA, bf16/fp16, checkpoints, resume, DDP.

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

Precision ("auto"): bf16 autocast where the GPU has bf16 in hardware (compute capability >= 8.0),
fp16 autocast with a gradient scaler S on older GPUs (the loss is scaled by S before backward,
the gradients unscaled before clipping; a step whose gradients overflow is skipped by the scaler,
which then halves S), float32 on the CPU and MPS (`minidit.device.autocast_dtype`).
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
from minidit.captions import caption_tokenizer, prompt_grid
from minidit.device import autocast_dtype, get_device, seed_everything
from minidit.ema import EMA
from minidit.run import checkpoint as ckpt
from minidit.run.budget import Budget
from minidit.run.build import make_model, make_objective, training_data
from minidit.run.config import TrainConfig
from minidit.run.guard import Guard
from minidit.run.latent import with_autoencoder_facts
from minidit.run.runfolder import RunFolder


def precision_for(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, or None for float32; whether a gradient scaler is needed) of `config.precision`
    on `device`: "fp32" and "bf16" as named, "auto" by the hardware (`minidit.device.autocast_dtype`)."""
    if config.precision == "fp32":
        return None, False
    if config.precision == "bf16":
        return torch.bfloat16, False
    return autocast_dtype(device)


def autocast_for(config: TrainConfig, device: torch.device):
    """The autocast context of `config.precision` on `device` (a no-op context for fp32)."""
    dtype, _ = precision_for(config, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler_for(config: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler where `config.precision` on `device` means fp16, else None."""
    return torch.amp.GradScaler(device.type) if precision_for(config, device)[1] else None


@dataclass
class Run:
    """Everything a training run holds between steps (one per process)."""

    config: TrainConfig
    model: nn.Module
    net: nn.Module  # the model as the step calls it: under DDP and/or torch.compile
    ema: EMA
    opt: torch.optim.Optimizer
    budget: Budget
    objective: object
    batches: object  # iterator of (x0 [b, C, H, W], y [b]) micro-batches
    generator: torch.Generator  # t, noise and label dropout of the objective
    rank: int
    world: int
    step: int = 0
    elapsed: float = 0.0  # training seconds so far (earlier runs included)
    lr: float = 0.0  # the learning rate of the last step
    scaler: torch.amp.GradScaler | None = None  # fp16 only: the loss scale S


def train_step(run: Run, autocast, guard: Guard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step: A micro-batches, gradients all-reduced on the last one only, the
    update applied unless the guard finds it non-finite.

    Returns:
        Every micro-batch's per-example loss [A·b] and time [A·b] (detached), and ‖g‖ before clipping.
    """
    config, A, scaler = run.config, run.config.grad_accum, run.scaler
    scale = (lambda loss: loss) if scaler is None else scaler.scale  # fp16: S * loss
    trains = getattr(run.objective, "inner_objective", run.objective)  # a latent objective's inner one
    if hasattr(trains, "set_progress"):  # a curriculum over the run (iCT's discretisation)
        trains.set_progress(run.budget.fraction(run.step, run.elapsed))
    run.opt.zero_grad(set_to_none=True)
    losses, times = [], []
    for a in range(A):
        x0, y = next(run.batches)
        y = y if config.class_conditional else None
        with nullcontext() if run.world == 1 or a == A - 1 else run.net.no_sync():
            with autocast:
                loss_b, t = run.objective.loss(run.net, x0, y, run.generator)  # [b], [b]
            scale(loss_b.float().mean() / A).backward()
        losses.append(loss_b.detach().float())
        times.append(t.detach().float())
    if scaler is not None:
        scaler.unscale_(run.opt)  # g / S: clipping and the logged norm see the true gradient
    loss_b, grad_norm = torch.cat(losses), nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip or math.inf)
    run.lr = config.lr * run.budget.lr_factor(run.step, run.elapsed)
    # an fp16 overflow (a non-finite norm) is the scaler's to skip, not a bad step for the guard
    checked = grad_norm if scaler is None else torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0)
    if guard.keep(run, checked, loss_b.mean()):  # the one read of the device per step
        for group in run.opt.param_groups:
            group["lr"] = run.lr
        if scaler is None:
            run.opt.step()
        else:
            scaler.step(run.opt)  # skipped when the gradients overflowed
        run.ema.decay = run.budget.ema(run.step, run.elapsed)
        run.ema.update(run.model)
    if scaler is not None:
        scaler.update()  # S halves after an overflow, doubles after a run of good steps
    run.step += 1
    return loss_b, torch.cat(times), grad_norm


def train(config: TrainConfig, resume: bool = False, *, restart: bool = False, progress: bool = True,
          objective=None, sample_fn=None) -> dict:
    """Train `config.model` on `config.dataset`; rank 0 writes into `config.out_dir`:
    `config.json`, `log.jsonl`, `latest.pt`, `samples/step_*.png`, `loss.png`, `loss_by_t.png`.

    Args:
        config: the run (validated first).
        resume: continue from `out_dir/latest.pt` exactly where it stopped (the config may
            differ only in `checkpoint.RESUMABLE_CHANGES`); with no checkpoint there, start afresh.
        restart: start over where a run exists, keeping the old one under a dated name
            (`minidit.run.runfolder`); without resume or restart such a folder is refused.
        progress: show a progress bar over the budget, with the loss and images/s (rank 0).
        objective: use this objective instead of `make_objective(config)`.
        sample_fn: ``f(model, shape, y, generator) -> images [B, C, H, W]`` for the sample
            grids; default the objective's `sample`.

    Returns:
        A summary: the final "step", the last logged "loss" and "images_per_s", "elapsed_s",
        the "checkpoint" path, the "skipped" updates, and the "model" and "ema_model".

    Raises:
        RunFolderError: the folder holds another run, or another process writes it.
        DivergenceError: the run diverged; the last good checkpoint stays.
        Interrupted: SIGINT or SIGTERM arrived; a checkpoint of the last good step was saved.
    """
    config.validate()
    rank, world, device, owns_group = _init_distributed(config)
    try:
        with RunFolder(config.out_dir, resume, restart, lock=rank == 0), Guard(config) as guard:
            run = _start(config, resume, objective, rank, world, device)
            return _loop(run, device, sample_fn or run.objective.sample, progress, guard)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _start(config: TrainConfig, resume: bool, objective, rank: int, world: int, device: torch.device) -> Run:
    """Data, model, EMA and optimiser (the same on every rank), restored when resuming."""
    micro, rest = divmod(config.batch_size, world * config.grad_accum)
    if rest:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by processes x grad_accum "
                         f"= {world} x {config.grad_accum}")
    images, labels = training_data(config)
    config = with_autoencoder_facts(config, images, resume)  # latent runs: fingerprint, shape, scale
    # 1. model, EMA, optimiser: the same initialisation on every rank
    seed_everything(config.seed)
    model = make_model(config).to(device)
    objective = objective if objective is not None else make_objective(config)
    latest = Path(config.out_dir) / "latest.pt"
    trains = getattr(objective, "inner_objective", objective)  # a latent objective's inner one
    if hasattr(trains, "init_model") and not (resume and latest.is_file()):
        trains.init_model(model)  # a few-step student starts from its teacher's weights
    ema = EMA(model, config.ema_decay, config.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    # 2. data: rank r reads every W-th example of each epoch's permutation
    if device.type != "cpu":
        images, labels = images.to(device), labels.to(device)  # batches are gathered on the device
    loader = data.TensorLoader(images, labels, micro, seed=config.seed, rank=rank, world_size=world,
                               augment=data.random_hflip if config.hflip else None)
    # 3. per-rank randomness (t, noise, label dropout); the objective draws from `generator`
    seed_everything(config.seed + 10_007 * rank)
    generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
    step, micro_step, elapsed = 0, 0, 0.0
    scaler = grad_scaler_for(config, device)
    if resume and latest.is_file():
        state = ckpt.read_checkpoint(latest)
        step, micro_step, elapsed = ckpt.restore_run(state, config.to_dict(), rank, world, model, ema, opt, generator)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    elif resume and rank == 0:
        print(f"minidit.train: no checkpoint at {latest}; starting a new run")
    net = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(config, model, torch.compile(net) if config.compile else net, ema, opt, Budget.of(config), objective,
               loader.stream(micro_step), generator, rank, world, step, elapsed, scaler=scaler)


def _loop(run: Run, device: torch.device, sample_fn, progress: bool, guard: Guard) -> dict:
    """Steps until the budget ends; logs, sample grids and checkpoints on their intervals."""
    config, out = run.config, Path(run.config.out_dir)
    log_path, latest = out / "log.jsonl", out / "latest.pt"
    if run.rank == 0:
        _prepare_folder(out, config, log_path, run.step)
    autocast = autocast_for(config, device)
    meter = _Meter(config.loss_bins, device, run.step)
    bar = _Bar(run, progress)
    summary = {"step": run.step, "loss": None, "images_per_s": None, "checkpoint": None}
    clock, before = time.perf_counter(), run.elapsed
    while not run.budget.done(run.step, run.elapsed):
        loss_b, t, grad_norm = train_step(run, autocast, guard)
        run.elapsed = before + time.perf_counter() - clock - meter.paused_total
        meter.add(loss_b, t)
        final = run.budget.done(run.step, run.elapsed) or guard.interrupted
        due = {k: every > 0 and run.step % every == 0 for k, every in
               (("log", config.log_every), ("sample", config.sample_every), ("save", config.checkpoint_every))}
        if final or due["log"]:
            record = meter.read(run, grad_norm, guard)
            summary.update(step=run.step, loss=record["loss"], images_per_s=record["images_per_s"])
            if run.rank == 0:
                plotting.append_log(log_path, record)
        bar.show(run, summary["loss"])
        if run.rank == 0 and config.sample_every and (final or due["sample"]) and not guard.interrupted:
            with meter.paused():
                _sample_grid(run, sample_fn, device, out, log_path)
        if (final or due["save"]) and guard.healthy:  # never a checkpoint of a step the guard doubts
            with meter.paused():
                summary["checkpoint"] = _save(run, latest, log_path)
        if final:
            break
    bar.close()
    if run.rank == 0:
        plotting.plot_run(out)
    guard.raise_if_interrupted(run, latest)
    return {**summary, "elapsed_s": run.elapsed, "skipped": guard.skipped, "model": run.model, "ema_model": run.ema.model}


# ----------------------------------------------------------------------------- helpers


class _Meter:
    """Loss per t bin and count per t bin, summed on the device and read at log time, and the
    images/s clock (time spent sampling and saving does not count)."""

    def __init__(self, bins: int, device: torch.device, step: int):
        self.bins = bins
        self.stats = torch.zeros(2 * bins, device=device)  # [sums, counts]; float32: MPS has no float64
        self.tick, self.tick_step, self.pause, self.paused_total = time.perf_counter(), step, 0.0, 0.0

    def add(self, loss_b: torch.Tensor, t: torch.Tensor) -> None:
        bin_of_t = (t.clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)  # [b]
        self.stats.index_add_(0, torch.cat([bin_of_t, bin_of_t + self.bins]),  # loss sums, then counts
                              torch.cat([loss_b, torch.ones_like(loss_b)]))

    def read(self, run: Run, grad_norm: torch.Tensor, guard: Guard) -> dict:
        """The log record since the last read (all ranks' losses)."""
        if run.world > 1:
            dist.all_reduce(self.stats)
        sums, counts = self.stats[:self.bins].tolist(), self.stats[self.bins:].tolist()
        now = time.perf_counter()
        seconds = max(now - self.tick - self.pause, 1e-9)
        record = {"event": "train", "step": run.step, "loss": sum(sums) / max(sum(counts), 1), "lr": run.lr,
                  "grad_norm": grad_norm.item(), "skipped": guard.skipped, "elapsed_s": round(run.elapsed, 3),
                  "images_per_s": (run.step - self.tick_step) * run.config.batch_size / seconds,
                  "loss_by_t": [s / c if c else None for s, c in zip(sums, counts)]}
        self.stats.zero_()
        self.tick, self.tick_step, self.pause = now, run.step, 0.0
        return record

    @contextmanager
    def paused(self):
        """Time spent inside counts neither towards images/s nor towards the time budget."""
        begin = time.perf_counter()
        yield
        self.pause += time.perf_counter() - begin
        self.paused_total += time.perf_counter() - begin


class _Bar:
    """A progress bar over the budget (steps, or minutes when time will end the run first)."""

    def __init__(self, run: Run, progress: bool):
        self.bar = tqdm(total=1000, disable=not progress or run.rank != 0, desc="train",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def show(self, run: Run, loss: float | None) -> None:
        self.bar.n = int(1000 * run.budget.fraction(run.step, run.elapsed))
        self.bar.set_postfix_str(f"step {run.step}" + ("" if loss is None else f", loss {loss:.4f}"), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


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
    if config.captions:  # prompts that cycle through the digits, then thickness and slant
        y = caption_tokenizer(config.dataset).encode(prompt_grid(config.n_samples, dataset=config.dataset)[0])[0].to(device)
    path = plotting.save_samples(sample_fn, run.ema.model, (config.n_samples, channels, side, side), y,
                                 out / "samples" / f"step_{run.step:07d}.png", config.seed)
    plotting.append_log(log_path, {"event": "sample", "step": run.step, "path": str(path)})
    plotting.plot_run(out)  # loss.png and loss_by_t.png, so far


def _save(run: Run, latest: Path, log_path: Path) -> str:
    state = ckpt.run_state(run.step, run.config.to_dict(), run.model, run.ema, run.opt, run.generator,
                           run.step * run.config.grad_accum, run.elapsed, run.world)
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()  # the loss scale, for an exact resume
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
