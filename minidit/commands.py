"""What `minidit sample / eval / train` do, as functions that notebooks and benchmarks reuse.

One trained network drives many samplers. Which ones depends on what the objective taught it:

    ddpm   ancestral "ddpm" (all T steps) and "ddim" on its own discrete steps, and every sampler
           of `minidit.samplers.SAMPLERS` through the continuous view of its table ᾱ_i
           (`minidit.model_fn.ddpm_denoiser` on the VP SDE, matched in log-SNR)
    sde    every sampler of `minidit.samplers.SAMPLERS` on the SDE it was trained with
    flow   "euler", "heun", "rk45" on dx/dt = v_θ(x, t) from t = 1 to 0 (`minidit.flow`), and
           the deterministic samplers (PF-ODE, EDM, DPM-Solver++) on `FlowProcess`; the
           stochastic ones are left out, since the flow's SDE is singular at t = 1
    latent those of its inner objective, on latents that are then decoded (`minidit.latent`)

`make_sampler` holds that mapping, in this one place. NFE counts network calls per sample
(a classifier-free-guided pair is one batched call): DDIM and Euler N, Heun 2N, EDM 2N − 1,
DPM-Solver++ N, DDPM T. Files are written to a temporary name and renamed, so a failed
write never destroys what a previous run left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minidit import flow, plotting, samplers
from minidit.checkpoint import file_mode
from minidit.ddim import ddim_sample
from minidit.denoisers import Denoiser, SampleResult
from minidit.model_fn import ddpm_network_fn, network_denoiser, network_fn
from minidit.objectives import Objective
from minidit.sde import VPSDE

DISCRETE = ("ddpm", "ddim")  # DDPM's own samplers, on its integer steps
FLOW_SOLVERS = ("euler", "heun", "rk45")  # minidit.flow.flow_sample, t from 1 to exactly 0
STOCHASTIC = ("euler_maruyama", "reverse_diffusion", "langevin", "pc")  # need a finite g(1)
OWN_STEPS = ("ddpm", "rk45", "ode_rk45")  # these choose their number of steps themselves
OUTPUT_SUFFIXES = (".png", ".npz")


class OutputError(RuntimeError):
    """An output file or folder cannot be written."""


# ----------------------------------------------------------------------------- samplers


def sampler_names(objective: Objective) -> tuple[str, ...]:
    """The samplers that `objective`'s network can drive (see the module docstring)."""
    if objective.kind in ("latent", "autoencoder"):  # a latent model samples as its inner objective
        return sampler_names(objective.inner_objective) if objective.kind == "latent" else ("prior",)
    continuous = tuple(samplers.SAMPLERS)
    if objective.kind == "ddpm":
        return DISCRETE + continuous
    if objective.kind == "flow":
        return FLOW_SOLVERS + tuple(n for n in continuous if n not in STOCHASTIC)
    return continuous


def default_sampling(objective: Objective) -> dict:
    """The sampler, steps and guidance scale stored in the objective (so in the preset)."""
    steps = None if objective.sampler in OWN_STEPS else objective.sample_steps
    return {"sampler": objective.sampler, "steps": steps, "cfg_scale": objective.cfg_scale}


@dataclass
class Sampler:
    """A sampler bound to one network: `sampler(shape, y, generator) -> SampleResult`.

    Attributes:
        name, steps, cfg_scale: the resolved choice (steps None: the sampler picks them).
        device: the network's device, where noise is drawn.
        run: the function that draws; `nfe` of its result counts network calls per sample.
    """

    name: str
    steps: int | None
    cfg_scale: float
    device: torch.device
    run: Callable[..., SampleResult] = field(repr=False)

    def __call__(self, shape: tuple[int, ...], y: Tensor | None = None,
                 generator: torch.Generator | None = None) -> SampleResult:
        return self.run(tuple(shape), y, generator)


def _canonical(name: str) -> str:
    """Accept "euler-maruyama" for "euler_maruyama" and "dpm-solver++" for "dpm_solver++"."""
    return name.replace("-", "_")


def make_sampler(objective: Objective, model: nn.Module, name: str | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, *, progress: bool = False, **options) -> Sampler:
    """Bind the sampler `name` to `model`, trained with `objective`.

    Args:
        objective: the objective of the checkpoint (from `checkpoint.load_checkpoint`).
        model: the network (the EMA one, for samples worth looking at), in eval mode.
        name: one of `sampler_names(objective)` ("-" may stand for "_"); None: the objective's.
        steps: number of steps; None: the objective's `sample_steps`. Must stay None for the
            samplers that choose their own ("ddpm": all T; "rk45"/"ode_rk45": adaptive).
        cfg_scale: classifier-free guidance scale; None: the objective's.
        progress: a tqdm bar per batch.
        options: passed to the sampler function (e.g. eta for DDIM, snr for PC, rtol for RK45).

    Raises:
        ValueError: the objective cannot drive `name`, or steps / cfg_scale are invalid.
    """
    if objective.kind in ("latent", "autoencoder"):  # sample latents with the inner objective, then decode
        from minidit.latent import decoding_sampler
        return decoding_sampler(objective, model, name, steps, cfg_scale, progress=progress, **options)
    default = default_sampling(objective)
    name = default["sampler"] if name is None else _canonical(name)
    valid = sampler_names(objective)
    if name not in valid:
        raise ValueError(f"a {objective.kind!r} checkpoint cannot drive sampler {name!r}; "
                         f"valid samplers: {', '.join(valid)}")
    if name in OWN_STEPS and steps is not None:
        raise ValueError(f"sampler {name!r} chooses its own number of steps "
                         f"({'all T' if name == 'ddpm' else 'adaptive; set rtol/atol'}); drop steps")
    if name not in OWN_STEPS:
        steps = objective.sample_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
    null_label = objective.null_label
    if cfg_scale is None:  # the objective's default; an unconditional model has nothing to guide
        cfg_scale = objective.cfg_scale if null_label is not None else 1.0
    cfg_scale = float(cfg_scale)
    if cfg_scale != 1.0 and null_label is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional checkpoint; use cfg_scale=1")
    device = next(model.parameters()).device
    guidance = {"cfg_scale": cfg_scale, "null_label": null_label}
    step_arg = {} if steps is None else {"steps": steps}

    if name in DISCRETE:  # 1. DDPM's own samplers call the model on integer steps
        diffusion = objective.diffusion

        def run(shape, y, generator):
            calls = [0]
            hook = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            try:
                if name == "ddpm":
                    x = diffusion.sample(model, shape, y, clip_x0=True, progress=progress,
                                         generator=generator, **guidance, **options)
                else:
                    x = ddim_sample(diffusion, model, shape, steps=steps, y=y, clip_x0=True,
                                    generator=generator, progress=progress,
                                    **{"eta": objective.eta, **guidance, **options})
            finally:
                hook.remove()
            return SampleResult(x, calls[0])

        return Sampler(name, steps, cfg_scale, device, run)

    # 2. every other sampler sees the network as a Denoiser on a continuous process
    if objective.kind == "ddpm":
        process = VPSDE()  # its log-SNR is matched to the discrete table, step by step
        den = Denoiser(ddpm_network_fn(model, objective.diffusion.schedule, process),
                       objective.prediction, process, name=type(model).__name__)
    elif objective.kind == "sde":
        process = objective.process
        den = network_denoiser(model, process, kind=objective.prediction)
    else:
        process = flow.FlowProcess()
        den = Denoiser(network_fn(model), "velocity", process, name=type(model).__name__)
    common = {"device": device, "progress": progress, **guidance, **step_arg, **options}

    def run(shape, y, generator):
        if name in FLOW_SOLVERS:
            return flow.flow_sample(den, shape, method=name, y=y, generator=generator, **common)
        return samplers.sample(name, den, process, shape, y=y, generator=generator, **common)

    return Sampler(name, steps, cfg_scale, device, run)


def class_labels(n: int, num_classes: int, labels: Sequence[int] | None = None) -> Tensor:
    """Labels [n] (int64): `labels` repeated to length n, else balanced, label i = i % num_classes.

    With num_classes = 0 (an unconditional model) every label is −1 and `labels` must be None.
    """
    if num_classes == 0:
        if labels:
            raise ValueError("labels were given but the checkpoint is unconditional")
        return torch.full((n,), -1, dtype=torch.int64)
    if labels:
        bad = [c for c in labels if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {bad}")
        base = torch.tensor([int(c) for c in labels], dtype=torch.int64)
    else:
        base = torch.arange(num_classes, dtype=torch.int64)
    return base.repeat(math.ceil(n / len(base)))[:n]  # [n]


def draw(sampler: Sampler, labels: Tensor, image_shape: tuple[int, int, int], *, batch_size: int = 250,
         seed: int = 0, progress: bool = False) -> dict:
    """Draw one sample per label in batches, from one seeded generator, timed.

    Args:
        sampler: from `make_sampler`.
        labels: [n] int64 from `class_labels` (−1: unconditional).
        image_shape: (C, H, W).
        batch_size: samples per sampler call; seed: seeds the noise generator.

    Returns:
        {"images": float32 [n, C, H, W] on the CPU, clipped to [−1, 1], "labels": [n],
            "nfe": network calls per sample (mean over batches), "seconds": wall time}.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    generator = torch.Generator(sampler.device).manual_seed(seed)
    out, nfes = [], []
    begin = time.perf_counter()
    for start in tqdm(range(0, len(labels), batch_size), desc="sample", disable=not progress, leave=False):
        y = labels[start:start + batch_size]  # [b]
        result = sampler((len(y), *image_shape), None if int(y[0]) < 0 else y.to(sampler.device), generator)
        out.append(result.x.float().clamp(-1, 1).cpu())  # .cpu() waits for an accelerator
        nfes.append(result.nfe)
    return {"images": torch.cat(out), "labels": labels.clone(), "nfe": sum(nfes) / len(nfes),
            "seconds": time.perf_counter() - begin}


def sample_model(model: nn.Module, objective: Objective, config, n: int, *, sampler: str | None = None,
                 steps: int | None = None, cfg_scale: float | None = None,
                 labels: Sequence[int] | None = None, seed: int = 0, batch_size: int = 250,
                 progress: bool = False, **options) -> dict:
    """n samples of a trained run: `draw` with `make_sampler` and `class_labels`.

    Args:
        model, objective, config: from `checkpoint.load_checkpoint` (config: a TrainConfig).
        n: number of samples; labels: the classes to cycle through (None: balanced).
        sampler, steps, cfg_scale, options: see `make_sampler`.

    Returns:
        `draw`'s dict plus the resolved "sampler", "steps" and "cfg_scale".
    """
    from minidit.train import dataset_shape

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    bound = make_sampler(objective, model, sampler, steps, cfg_scale, **options)
    channels, side, classes = dataset_shape(config.dataset)
    ys = class_labels(n, classes if config.class_conditional else 0, labels)
    drawn = draw(bound, ys, (channels, side, side), batch_size=batch_size, seed=seed, progress=progress)
    return {**drawn, "sampler": bound.name, "steps": bound.steps, "cfg_scale": bound.cfg_scale}


def evaluate_model(model: nn.Module, objective: Objective, config, n: int = 1000, *,
                   progress: bool = False, **sampling) -> dict:
    """Sample n images and score them (`minidit.metrics.evaluate_samples`, MNIST only).

    Args:
        model, objective, config: from `checkpoint.load_checkpoint`.
        n: samples drawn and scored (the real-vs-real floor uses the same n).
        sampling: the keyword arguments of `sample_model` (sampler, steps, cfg_scale, seed, ...).

    Returns:
        {"fd", "fd_floor", "accuracy", "n", "sampler", "steps", "cfg_scale", "nfe", "seconds"}; for
        an autoencoder, its reconstructions' {"psnr", "mse", "fd", "fd_floor", "accuracy", "n"}.
    """
    from minidit.metrics import EVAL_DATASETS, evaluate_samples

    if objective.kind == "autoencoder":  # an autoencoder is scored on its round trip x -> D(E(x))
        from minidit.autoencoder import evaluate_reconstructions
        scores = evaluate_reconstructions(model, config.dataset, n, root=config.data_root, progress=progress)
        return {k: v for k, v in scores.items() if k not in ("images", "reconstructions")}
    if config.dataset not in EVAL_DATASETS:
        raise ValueError(f"evaluation needs a checkpoint trained on one of {list(EVAL_DATASETS)} "
                         f"(the datasets with a feature network), not {config.dataset!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 10_000:
        raise ValueError(f"n must be an int in [2, 10000], got {n!r}")
    drawn = sample_model(model, objective, config, n, progress=progress, **sampling)
    labels = drawn["labels"] if config.class_conditional else None
    device = next(model.parameters()).device
    scores = evaluate_samples(drawn["images"], labels, dataset=config.dataset, n=n, root=config.data_root,
                              device=device, progress=progress)
    return {**scores, **{k: drawn[k] for k in ("sampler", "steps", "cfg_scale", "nfe", "seconds")}}


# ----------------------------------------------------------------------------- outputs


def check_output(path: str | os.PathLike, suffixes: Sequence[str] | None = None) -> Path:
    """Check before any work that `path` can be written: its suffix, and a writable folder.

    Raises:
        ValueError: the suffix is not one of `suffixes`.
        OutputError: the folder cannot be made or written (the message names it).
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"output {path} must end with one of {list(suffixes)}")
    check_folder(path.parent)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    return path


def check_folder(folder: str | os.PathLike) -> Path:
    """Make `folder` if needed and prove it writable by writing (and removing) a probe file."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to the output folder {folder}: {err.strerror or err}") from err
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The temporary name keeps the suffix (writers pick the format from it); on any failure
    it is removed and whatever `path` held before is left as it was.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def save_samples(path: str | os.PathLike, images: Tensor, labels: Tensor, nrow: int | None = None) -> Path:
    """Write samples as a PNG grid (`nrow` per row, default √n) or an .npz of
    `images` float32 [N, C, H, W] in [−1, 1] and `labels` int64 [N] (−1: unconditional)."""
    path = check_output(path, OUTPUT_SUFFIXES)
    if path.suffix.lower() == ".png":
        nrow = nrow or math.ceil(math.sqrt(len(images)))
        return atomic_write(path, lambda tmp: plotting.save_image_grid(images, tmp, nrow=nrow))
    arrays = {"images": images.detach().cpu().float().numpy(), "labels": labels.cpu().long().numpy()}
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


# ----------------------------------------------------------------------------- a whole run


def train_and_report(config, resume: bool = False, *, eval_n: int = 500, grid_n: int = 100,
                     progress: bool = True) -> dict:
    """Train (`minidit.train.train`), then, from the saved checkpoint's EMA weights, write a
    sample grid `out_dir/samples.png` and score `eval_n` samples into `out_dir/eval.json`.

    Args:
        config: a TrainConfig; its out_dir is checked writable before training starts.
        resume: continue from out_dir/latest.pt.
        eval_n: samples to score (0: skip; skipped too for datasets without a feature network).
        grid_n: samples in the grid (class i % K in column i % K).

    Returns:
        {"train": train's summary without the networks, "grid": path, "eval": scores or None}.
    """
    from minidit.checkpoint import load_checkpoint
    from minidit.device import get_device
    from minidit.metrics import EVAL_DATASETS
    from minidit.train import train

    config.validate()
    out = check_folder(config.out_dir)
    summary = train(config, resume=resume, progress=progress)
    report = {"train": {k: v for k, v in summary.items() if k not in ("model", "ema_model")},
              "grid": None, "eval": None}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return report
    _, ema_model, objective, config = load_checkpoint(out / "latest.pt", get_device(config.device))
    grid = sample_model(ema_model, objective, config, grid_n, seed=config.seed, progress=progress)
    nrow = min(grid_n, objective.null_label or math.ceil(math.sqrt(grid_n)))
    report["grid"] = str(save_samples(out / "samples.png", grid["images"], grid["labels"], nrow))
    if eval_n and config.dataset in EVAL_DATASETS:
        report["eval"] = evaluate_model(ema_model, objective, config, eval_n, seed=config.seed,
                                        progress=progress)
        text = json.dumps({"step": summary["step"], **report["eval"]}, indent=2)
        atomic_write(out / "eval.json", lambda tmp: tmp.write_text(text))
    return report
