"""``minidit sample`` and ``minidit eval``: draw from a checkpoint, and score the draws."""

from __future__ import annotations

import argparse
import dataclasses
import json

from minidit.device import get_device
from minidit.run.build import load_checkpoint
from minidit.run.generate import describe_sampling, evaluate_model, format_eval, sample_model
from minidit.run.objectives import GRID_KINDS
from minidit.run.outputs import OUTPUT_SUFFIXES, check_output, write_samples
from minidit.run.pretrained import load as load_pretrained
from minidit.run.pretrained import names as pretrained_names
from minidit.samplers import SAMPLERS


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by minidit train (latest.pt)")
    source.add_argument("--pretrained", metavar="NAME",
                        help="a model that ships with minidit (no training needed): " + (", ".join(pretrained_names()) or "none"))
    names = ", ".join([*SAMPLERS, "edm", "consistency", "meanflow"])
    parser.add_argument("--sampler", help=f"one of {names} (default: the checkpoint's); a name the "
                        "checkpoint's objective cannot drive lists those it can")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's; a few-step student, "
                        "e.g. --pretrained mnist-cd, draws with 1, 2 or 4)")
    parser.add_argument("--grid", choices=GRID_KINDS, help="time grid (default: the sampler's own)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the checkpoint's)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="guide only at noise levels sigma/alpha in (LO, HI] (default: the checkpoint's; "
                             "0 inf: every step)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=250, help="samples per sampler call")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the fastest available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``minidit sample``."""
    parser = subparsers.add_parser(
        "sample", help="draw samples from a checkpoint into a .png grid or an .npz",
        description="Draw N samples with the EMA weights of a checkpoint. OUT.png gets a grid; "
        "OUT.npz gets `images` (float32 [N, C, H, W] in [-1, 1]) and `labels` (int64 [N]; "
        "class i mod K unless --labels is given; -1 for an unconditional model). Prints NFE and seconds.")
    _add_sampling_arguments(parser)
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--labels", type=int, nargs="+", help="classes to cycle through (default: all)")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help='a caption model\'s prompt, e.g. "a thick seven" (repeat for several; default: '
                             "every digit with every thickness and slant)")
    parser.add_argument("--out", required=True, help="output file, .png or .npz (labels: a caption model's "
                        "token ids [N, L])")
    parser.set_defaults(func=run_sample)
    return parser


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``minidit eval``."""
    parser = subparsers.add_parser(
        "eval", help="score samples of an MNIST checkpoint: FD, its floor, accuracy",
        description="Draw N class-balanced samples and print the MNIST-classifier Frechet distance, "
        "the real-vs-real floor at the same N, the classifier accuracy, the sampler, NFE and "
        "sampling seconds (not the Inception FID of the literature; see minidit.metrics).")
    _add_sampling_arguments(parser)
    parser.add_argument("--n", type=int, default=1000, help="samples drawn and scored (default 1000)")
    parser.add_argument("--data-root", help="MNIST root (default: the checkpoint's, else $MINIDIT_DATA)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--held-out", action="store_true",
                        help="a caption model: prompt the combinations held out of training (minidit.captions.HELD_OUT)")
    parser.set_defaults(func=run_eval)
    return parser


def _load(args):
    """(model, EMA model, objective, config) of --ckpt, or of --pretrained (whose one network is its EMA)."""
    device = get_device(args.device)
    if args.pretrained is not None:
        model, objective, config = load_pretrained(args.pretrained, device)
        return model, model, objective, config
    return load_checkpoint(args.ckpt, device)


def _sampling(args) -> dict:
    interval = "default" if args.cfg_interval is None else tuple(args.cfg_interval)
    return {"sampler": args.sampler, "steps": args.steps, "grid": args.grid, "cfg_scale": args.cfg,
            "cfg_interval": interval, "seed": args.seed, "batch_size": args.batch_size,
            "progress": not args.no_progress}


def run_sample(args) -> int:
    check_output(args.out, OUTPUT_SUFFIXES)  # before the checkpoint loads and anything is drawn
    _, ema_model, objective, config = _load(args)
    drawn = sample_model(ema_model, objective, config, args.n, labels=args.labels, prompts=args.prompt,
                         **_sampling(args))
    classes = objective.null_label if config.class_conditional and not args.labels else None
    if config.captions:  # the default prompts cycle through the ten classes
        classes = None if args.prompt else 10
    path = write_samples(args.out, drawn["images"], drawn["labels"], nrow=classes)
    print(f"wrote {args.n} samples to {path}: {describe_sampling(drawn)}")
    return 0


def run_eval(args) -> int:
    _, ema_model, objective, config = _load(args)
    if args.data_root:
        config = dataclasses.replace(config, data_root=args.data_root)
    extra = {"held_out": True} if args.held_out else {}
    if args.held_out and not config.captions:
        raise ValueError("--held-out needs a model trained on captions (captions=true)")
    result = evaluate_model(ema_model, objective, config, args.n, **extra, **_sampling(args))
    print(json.dumps(result) if args.json else format_eval(result))
    return 0
