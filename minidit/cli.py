"""The ``minidit`` command line: ``minidit train / sample / eval / flops``.

Each subcommand registers itself here with ``add_parser(subparsers)``; train, sample and
eval are defined below and call `minidit.commands`, the others live beside their module.
Exit codes: 0 done, 2 bad usage (unknown preset, key, sampler, value), 1 a file that cannot
be read or written, or a training run that failed.

    minidit train --preset mnist-cpu [--out DIR] [--steps N | --minutes M] [key=value ...]
    minidit sample --ckpt runs/mnist-cpu/latest.pt --n 100 --out samples.png
    minidit eval --ckpt runs/mnist-cpu/latest.pt --n 1000 [--sampler NAME --steps K --cfg S]

Latent diffusion: `minidit train --preset mnist-ae-cpu` (the autoencoder; `eval` scores its
reconstructions), then `minidit train --preset mnist-latent-cpu`; sample and eval decode.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys

import minidit


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="minidit",
        description="minidit: train, sample and evaluate small diffusion transformers.",
    )
    parser.add_argument("--version", action="version", version=f"minidit {minidit.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _subcommands():
        register(subparsers)
    return parser


def _subcommands():
    """The `add_parser` functions of the modules that provide subcommands."""
    registers = [add_train_parser, add_sample_parser, add_eval_parser]
    from minidit import flops; registers.append(flops.add_parser)  # noqa: E702
    from minidit import notebooks; registers.append(notebooks.add_parser)  # noqa: E702
    return registers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    from minidit.checkpoint import CheckpointError
    from minidit.commands import OutputError
    from minidit.train import NonFiniteLossError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own errors (code 2) and --help (code 0)
        return int(exit_.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as err:  # bad input, found before any long computation
        print(f"minidit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, OutputError, NonFiniteLossError, OSError) as err:
        print(f"minidit {args.command}: error: {err}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``minidit train``."""
    from minidit.train import PRESETS, TrainConfig

    keys = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    parser = subparsers.add_parser(
        "train", help="train a preset, then write a sample grid and quality figures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a named preset (minidit.train.PRESETS), changed by key=value overrides. "
        "At the end the EMA weights draw OUT/samples.png and are scored on --eval-n samples "
        "(MNIST-classifier FD beside its real-vs-real floor, and class accuracy) into OUT/eval.json.",
        epilog=f"presets: {', '.join(PRESETS)}\n\nconfig keys: {keys}\n\n"
        "values are converted to the key's type (none/null for optional ones); dict keys take\n"
        "dotted paths, e.g. objective.kind=flow objective.cfg_scale=2 model_overrides.depth=4\n\n"
        "example: minidit train --preset mnist-cpu --out runs/first batch_size=64")
    parser.add_argument("--preset", default="mnist-cpu", help="the starting recipe (default mnist-cpu)")
    parser.add_argument("--out", help="output folder (default: the preset's out_dir)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    length.add_argument("--minutes", type=float, help="also stop after this much training time")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the fastest available)")
    parser.add_argument("--eval-n", type=int, default=500, help="samples scored at the end (0: skip)")
    parser.add_argument("--grid-n", type=int, default=100, help="samples in OUT/samples.png")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig fields to change")
    parser.set_defaults(func=_run_train)
    return parser


def resolve_config(preset: str, overrides: list[str] = ()):
    """The TrainConfig of `preset` with `key=value` overrides, validated.

    Raises:
        ValueError: an unknown preset, key, model or objective field, or a value of the wrong type.
    """
    from minidit.train import PRESETS, TrainConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    values = PRESETS[preset].to_dict()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        key, eq, raw = item.partition("=")
        name, _, path = key.partition(".")
        if not eq or not name:
            raise ValueError(f"override {item!r} must look like key=value, e.g. batch_size=64")
        if name not in fields:
            raise ValueError(f"unknown config key {name!r}; valid keys: {', '.join(fields)}")
        annotation = fields[name].type if isinstance(fields[name].type, str) else str(fields[name].type)
        if not path:
            values[name] = _convert(raw, annotation, name)
            continue
        if not annotation.startswith("dict"):
            raise ValueError(f"{name} is not a dict, so {key!r} means nothing; write {name}=VALUE")
        node = values[name] = dict(values[name] or {})
        *parents, leaf = path.split(".")
        for part in parents:  # model_overrides.a.b=1 makes the nested dicts on the way
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[leaf] = _literal(raw)
    config = TrainConfig.from_dict(values)
    config.validate()
    _check_buildable(config)
    return config


def _literal(raw: str):
    """A value of a dict override: JSON or a Python literal (1, 2.5, true, None, [1, 2]), else the text."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError):
            pass
    return raw


def _convert(raw: str, annotation: str, name: str):
    """`raw` as the TrainConfig field type `annotation` ("int", "float | None", "tuple[float, float]", ...)."""
    base = annotation.replace("| None", "").replace("Optional", "").strip(" []")
    if "None" in annotation and raw.strip().lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            flags = {"true": True, "1": True, "yes": True, "on": True,
                     "false": False, "0": False, "no": False, "off": False}
            return flags[raw.strip().lower()]
        if base == "int":
            number = float(raw)  # accepts 1e4 and 10_000
            if not number.is_integer():
                raise ValueError
            return int(number)
        if base == "float":
            return float(raw)
        if base.startswith("tuple"):
            return [float(part) for part in raw.strip("()[] ").split(",")]
        if base.startswith("dict"):
            value = _literal(raw)
            if not isinstance(value, dict):
                raise ValueError
            return value
        return raw
    except (ValueError, KeyError):
        raise ValueError(f"{name} expects {annotation}, got {raw!r}") from None


def _check_buildable(config) -> None:
    """Build the model (on the meta device: no memory) and the objective, so a bad model name or
    override fails now, not after the dataset has loaded."""
    import torch

    from minidit.dit import DIT_CONFIGS
    from minidit.train import MODEL_BUILDERS, make_model, make_objective

    if config.model not in MODEL_BUILDERS and config.model not in DIT_CONFIGS:
        raise ValueError(f"unknown model {config.model!r}; valid models: "
                         f"{', '.join([*MODEL_BUILDERS, *DIT_CONFIGS])}")
    try:
        with torch.device("meta"):
            make_model(config)
    except TypeError as err:
        raise ValueError(f"model_overrides {config.model_overrides} do not fit {config.model!r}: {err}") from err
    make_objective(config)


def _run_train(args) -> int:
    from minidit.commands import train_and_report

    config = resolve_config(args.preset, args.overrides)
    changes = {"out_dir": args.out, "steps": args.steps, "minutes": args.minutes, "device": args.device}
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    config.validate()
    if args.eval_n < 0 or args.eval_n == 1 or args.grid_n < 1:
        raise ValueError(f"--eval-n must be 0 or >= 2 and --grid-n >= 1, got {args.eval_n}, {args.grid_n}")
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    report = train_and_report(config, args.resume, eval_n=args.eval_n, grid_n=args.grid_n,
                              progress=not args.no_progress)
    run = report["train"]
    loss = "n/a" if run["loss"] is None else f"{run['loss']:.4f}"
    print(f"trained to step {run['step']} in {run['elapsed_s']:.0f} s (loss {loss}); "
          f"checkpoint {config.out_dir}/latest.pt")
    if report["grid"]:
        print(f"samples: {report['grid']}")
    if report["eval"]:
        print(format_eval(report["eval"]))
    return 0


# ----------------------------------------------------------------------------- sample and eval


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by minidit train (latest.pt)")
    from minidit.commands import DISCRETE, FLOW_SOLVERS
    from minidit.samplers import SAMPLERS

    names = ", ".join(dict.fromkeys([*DISCRETE, *FLOW_SOLVERS, *SAMPLERS]))
    parser.add_argument("--sampler", help=f"one of {names} (default: the checkpoint's); a name the "
                        "checkpoint's objective cannot drive lists those it can")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the checkpoint's)")
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
        "class i %% K unless --labels is given; -1 for an unconditional model). Prints NFE and seconds.")
    _add_sampling_arguments(parser)
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--labels", type=int, nargs="+", help="classes to cycle through (default: all)")
    parser.add_argument("--out", required=True, help="output file, .png or .npz")
    parser.set_defaults(func=_run_sample)
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
    parser.set_defaults(func=_run_eval)
    return parser


def _load(args):
    from minidit.checkpoint import load_checkpoint
    from minidit.device import get_device

    return load_checkpoint(args.ckpt, get_device(args.device))


def _sampling(args) -> dict:
    return {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg, "seed": args.seed,
            "batch_size": args.batch_size, "progress": not args.no_progress}


def _run_sample(args) -> int:
    from minidit.commands import OUTPUT_SUFFIXES, check_output, sample_model, save_samples

    check_output(args.out, OUTPUT_SUFFIXES)  # before the checkpoint loads and anything is drawn
    _, ema_model, objective, config = _load(args)
    drawn = sample_model(ema_model, objective, config, args.n, labels=args.labels, **_sampling(args))
    classes = objective.null_label if config.class_conditional and not args.labels else None
    path = save_samples(args.out, drawn["images"], drawn["labels"], nrow=classes)
    print(f"wrote {args.n} samples to {path}: {_describe(drawn)}")
    return 0


def _run_eval(args) -> int:
    from minidit.commands import evaluate_model

    _, ema_model, objective, config = _load(args)
    if args.data_root:
        config = dataclasses.replace(config, data_root=args.data_root)
    result = evaluate_model(ema_model, objective, config, args.n, **_sampling(args))
    print(json.dumps(result) if args.json else format_eval(result))
    return 0


def _describe(result: dict) -> str:
    steps = "its own steps" if result["steps"] is None else f"{result['steps']} steps"
    return (f"sampler {result['sampler']}, {steps}, cfg {result['cfg_scale']:g}, "
            f"NFE {result['nfe']:g}, {result['seconds']:.1f} s")


def format_eval(result: dict) -> str:
    """One line of `commands.evaluate_model`'s scores (an autoencoder's: its reconstructions')."""
    accuracy = "n/a" if result["accuracy"] is None else f"{100 * result['accuracy']:.1f}%"
    if "psnr" in result:
        fd = "n/a" if result["fd"] is None else f"{result['fd']:.3f} (floor {result['fd_floor']:.3f})"
        return f"reconstructions: PSNR {result['psnr']:.2f} dB, FD {fd}, accuracy {accuracy}, n {result['n']}"
    return (f"FD {result['fd']:.3f} (real-vs-real floor {result['fd_floor']:.3f}), accuracy {accuracy}, "
            f"n {result['n']} | {_describe(result)}")


if __name__ == "__main__":
    sys.exit(main())
