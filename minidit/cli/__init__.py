"""The ``minidit`` command line: ``minidit train / sample / eval / flops / exercises``.

Exit codes: 0 done, 2 bad usage (unknown preset, key, sampler, value), 1 a file that cannot
be read or written, or a training run that failed.

    minidit train --preset mnist-cpu [--out DIR] [--steps N | --minutes M] [key=value ...]
    minidit sample --ckpt runs/mnist-cpu/latest.pt --n 100 --out samples.png
    minidit eval --ckpt runs/mnist-cpu/latest.pt --n 1000 [--sampler NAME --steps K --cfg S]

Latent diffusion: `minidit train --preset mnist-ae-cpu` (the autoencoder; `eval` scores its
reconstructions), then `minidit train --preset mnist-latent-cpu`; sample and eval decode.
The command line only parses and reports: what each command does lives in `minidit.run`.
"""

from __future__ import annotations

import argparse
import sys

import minidit
from minidit.cli.sample import add_eval_parser, add_sample_parser
from minidit.cli.tools import add_exercises_parser, add_flops_parser
from minidit.cli.train import add_train_parser, config_from_preset
from minidit.run.checkpoint import CheckpointError
from minidit.run.engine import NonFiniteLossError
from minidit.run.outputs import OutputError

__all__ = ["build_parser", "config_from_preset", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="minidit", description="minidit: train, sample and evaluate small diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"minidit {minidit.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (add_train_parser, add_sample_parser, add_eval_parser, add_flops_parser, add_exercises_parser):
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
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


if __name__ == "__main__":
    sys.exit(main())
