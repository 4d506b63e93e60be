"""Drawing and scoring samples of a trained run: what `minidit sample` and `minidit eval` do,
as functions that notebooks and benchmarks reuse.

`sample_model` binds a sampler of the run's objective (`make_sampler` of
`minidit.run.objectives`: any sampler name, grid and guidance scale the objective allows),
draws n samples in batches from one seeded generator, and times them; `evaluate_model` scores
them with the MNIST classifier's Frechet distance beside its real-vs-real floor and the class
accuracy (`minidit.metrics`). NFE counts network calls per sample (a classifier-free-guided
pair is one batched call): DDIM and Euler N, Heun 2N (EDM 2N − 1), DPM-Solver++ N, DDPM T.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minidit import data
from minidit.autoencoder import evaluate_reconstructions
from minidit.captions import AttributeBins, caption_tokenizer, prompt_grid
from minidit.metrics import EVAL_DATASETS, evaluate_samples, reference_stats
from minidit.run.objectives import Sampler


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
        sampler: from an objective's `make_sampler`.
        labels: [n] int64 from `class_labels` (−1: unconditional).
        image_shape: (C, H, W).
        batch_size: samples per sampler call; seed: seeds the noise generator.

    Returns:
        {"images": float32 [n, C, H, W] on the CPU, clipped to [−1, 1], "labels": [n],
            "nfe": network calls per sample (mean over batches), "seconds": wall time}.

    Raises:
        ValueError: bad arguments, or the sampler produced NaN or inf (named by its step).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if labels.ndim not in (1, 2) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty [n] tensor (or [n, L] caption ids), got shape "
                         f"{tuple(labels.shape)}")
    generator = torch.Generator(sampler.device).manual_seed(seed)
    out, nfes = [], []
    begin = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(range(0, len(labels), batch_size), desc="sample", disable=not progress, leave=False):
            y = labels[start:start + batch_size]  # [b]
            unconditional = y.ndim == 1 and int(y[0]) < 0
            drawn = sampler((len(y), *image_shape), None if unconditional else y.to(sampler.device), generator)
            out.append(drawn.x.float().clamp(-1, 1).cpu())  # .cpu() waits for an accelerator
            nfes.append(drawn.nfe)
    return {"images": torch.cat(out), "labels": labels.clone(), "nfe": sum(nfes) / len(nfes),
            "seconds": time.perf_counter() - begin}


def sample_model(model: nn.Module, objective, config, n: int, *, sampler: str | None = None,
                 steps: int | None = None, cfg_scale: float | None = None, grid: str | None = None,
                 cfg_interval: tuple[float, float] | None | str = "default", labels: Sequence[int] | None = None,
                 prompts: Sequence[str] | None = None, seed: int = 0, batch_size: int = 250, progress: bool = False,
                 **options) -> dict:
    """n samples of a trained run: `draw` with the objective's `make_sampler` and `class_labels`.

    Args:
        model, objective, config: from `minidit.run.build.load_checkpoint` (config: a TrainConfig).
        n: number of samples; labels: the classes to cycle through (None: balanced).
        prompts: for a caption model (`config.captions`), the captions to cycle through (None:
            `minidit.captions.prompt_grid`, every class with every thickness and slant).
        sampler, steps, cfg_scale, grid, cfg_interval, options: see the objective's `make_sampler`.

    Returns:
        `draw`'s dict plus the resolved "sampler", "steps", "grid", "cfg_scale" and "cfg_interval".
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    extra = {} if grid is None else {"grid": grid}
    if cfg_interval != "default":  # a latent objective's prior takes no guidance options
        extra["cfg_interval"] = cfg_interval
    bound = objective.make_sampler(model, sampler, steps, cfg_scale, **extra, **options)
    channels, side, classes = data.dataset_shape(config.dataset)
    if getattr(config, "captions", False):
        if labels:
            raise ValueError("a caption model takes prompts, not labels")
        texts = [prompts[i % len(prompts)] for i in range(n)] if prompts else prompt_grid(n, dataset=config.dataset)[0]
        ys, _ = caption_tokenizer(config.dataset).encode(texts)  # [n, L]
    elif prompts:
        raise ValueError("prompts need a model trained on captions (captions=true)")
    else:
        ys = class_labels(n, classes if config.class_conditional else 0, labels)
    drawn = draw(bound, ys, (channels, side, side), batch_size=batch_size, seed=seed, progress=progress)
    return {**drawn, "sampler": bound.name, "steps": bound.steps, "grid": bound.grid, "cfg_scale": bound.cfg_scale,
            "cfg_interval": bound.cfg_interval}


def evaluate_model(model: nn.Module, objective, config, n: int = 1000, *, progress: bool = False,
                   **sampling) -> dict:
    """Sample n images and score them (`minidit.metrics.evaluate_samples`, MNIST only).

    Args:
        model, objective, config: from `minidit.run.build.load_checkpoint`.
        n: samples drawn and scored (the real-vs-real floor uses the same n).
        sampling: the keyword arguments of `sample_model` (sampler, steps, cfg_scale, seed, ...).

    Returns:
        {"fd", "fd_floor", "accuracy", "n", "sampler", "steps", "grid", "cfg_scale", "cfg_interval", "nfe",
        "seconds"};
        for an autoencoder, its reconstructions' {"psnr", "mse", "fd", "fd_floor", "accuracy", "n"}.
    """
    if objective.kind == "autoencoder":  # an autoencoder is scored on its round trip x -> D(E(x))
        scores = evaluate_reconstructions(model, config.dataset, n, root=config.data_root, progress=progress)
        return {k: v for k, v in scores.items() if k not in ("images", "reconstructions")}
    if config.dataset not in EVAL_DATASETS:
        raise ValueError(f"evaluation needs a checkpoint trained on one of {list(EVAL_DATASETS)} "
                         f"(the datasets with a feature network), not {config.dataset!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 10_000:
        raise ValueError(f"n must be an int in [2, 10000], got {n!r}")
    device = next(model.parameters()).device
    reference_stats(config.dataset, n, config.data_root, device)  # the real data first: fail before sampling
    if getattr(config, "captions", False):
        return _evaluate_captions(model, objective, config, n, progress=progress, **sampling)
    drawn = sample_model(model, objective, config, n, progress=progress, **sampling)
    labels = drawn["labels"] if config.class_conditional else None
    scores = evaluate_samples(drawn["images"], labels, dataset=config.dataset, n=n, root=config.data_root,
                              device=device, progress=progress)
    keys = ("sampler", "steps", "grid", "cfg_scale", "cfg_interval", "nfe", "seconds")
    return {**scores, **{k: drawn[k] for k in keys}}


@functools.lru_cache(maxsize=4)
def training_bins(dataset: str, root: str | None = None, size: int | None = None) -> AttributeBins:
    """The attribute bins (`minidit.captions.AttributeBins`) of the first `size` training images of
    `dataset`: what a caption model's words meant when it trained. Cached, since fitting reads the
    whole split."""
    train, _ = data.load_dataset(dataset, "train", root=root)
    return AttributeBins.fit(train[:size])


def _evaluate_captions(model, objective, config, n: int, *, held_out: bool = False, progress: bool = False,
                       **sampling) -> dict:
    """`evaluate_model` of a caption model: full prompts (`prompt_grid`, or the held-out combinations);
    the digit accuracy is the classifier's, the thickness and slant accuracies are the attributes
    measured on the samples (`minidit.captions`, bins of the training images) against the prompt's
    (chance 1/3 each)."""
    texts, wanted = prompt_grid(n, held_out, config.dataset)  # [n, 3]: digit, thickness class, slant class
    drawn = sample_model(model, objective, config, n, prompts=texts, progress=progress, **sampling)
    device = next(model.parameters()).device
    scores = evaluate_samples(drawn["images"], wanted[:, 0], dataset=config.dataset, n=n, root=config.data_root,
                              device=device, progress=progress)
    bins = training_bins(config.dataset, config.data_root, config.dataset_size)
    thick, slant = bins.classes(drawn["images"])
    keys = ("sampler", "steps", "grid", "cfg_scale", "cfg_interval", "nfe", "seconds")
    return {**scores, "thickness_accuracy": float((thick == wanted[:, 1]).float().mean()),
            "slant_accuracy": float((slant == wanted[:, 2]).float().mean()), "held_out": held_out,
            **{k: drawn[k] for k in keys}}


def describe_sampling(result: dict) -> str:
    """"sampler S, N steps (grid G), cfg C, NFE K, T s" of a `sample_model` or `evaluate_model` result."""
    steps = "adaptive steps" if result["steps"] is None else f"{result['steps']} steps"
    interval = result.get("cfg_interval")
    cfg = f"cfg {result['cfg_scale']:g}" + ("" if interval is None else f" on σ in ({interval[0]:g}, {interval[1]:g}]")
    return (f"sampler {result['sampler']}, {steps} ({result['grid']} grid), {cfg}, "
            f"NFE {result['nfe']:g}, {result['seconds']:.1f} s")


def format_eval(result: dict) -> str:
    """One line of `evaluate_model`'s scores (an autoencoder's: its reconstructions')."""
    accuracy = "n/a" if result["accuracy"] is None else f"{100 * result['accuracy']:.1f}%"
    if "psnr" in result:
        fd = "n/a" if result["fd"] is None else f"{result['fd']:.3f} (floor {result['fd_floor']:.3f})"
        return f"reconstructions: PSNR {result['psnr']:.2f} dB, FD {fd}, accuracy {accuracy}, n {result['n']}"
    text = ""
    if "thickness_accuracy" in result:  # a caption model: the attributes too (chance 1/3 each)
        which = "held-out prompts, " if result.get("held_out") else ""
        text = (f" ({which}digit), thickness {100 * result['thickness_accuracy']:.1f}%, slant "
                f"{100 * result['slant_accuracy']:.1f}% (chance 33.3%)")
    return (f"FD {result['fd']:.3f} (real-vs-real floor {result['fd_floor']:.3f}), accuracy {accuracy}{text}, "
            f"n {result['n']} | {describe_sampling(result)}")
