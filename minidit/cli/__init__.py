"""The ``minidit`` command line: ``minidit train / sample / eval / flops / exercises``.

Every expected failure is one line on stderr, ``minidit COMMAND: error: ...``, and an exit code:

    0    done
    1    the work failed: a file or dataset that cannot be read, written or downloaded, a
         checkpoint that does not load, a training run that diverged
    2    refused before any work: bad arguments or values, a device this machine lacks, a run
         folder that holds another run or that another process is writing
    3    an unexpected error (a bug): the traceback is printed, please report it
    130  interrupted by Ctrl-C (SIGINT); 143 terminated (SIGTERM): training saves a checkpoint first

Set MINIDIT_DEBUG=1 (or pass --debug) for the traceback of an expected failure too.

    minidit train --preset mnist-cpu [--out DIR] [--steps N | --minutes M] [key=value ...]
    minidit sample --ckpt runs/mnist-cpu/latest.pt --n 100 --out samples.png
    minidit eval --ckpt runs/mnist-cpu/latest.pt --n 1000 [--sampler NAME --steps K --cfg S]

Latent diffusion: `minidit train --preset mnist-ae-cpu` (the autoencoder; `eval` scores its
reconstructions), then `minidit train --preset mnist-latent-cpu`; sample and eval decode.
The command line only parses and reports: what each command does lives in `minidit.run`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import minidit
from minidit.cli.sample import add_eval_parser, add_sample_parser
from minidit.cli.tools import add_exercises_parser, add_flops_parser
from minidit.cli.train import add_train_parser, config_from_preset
from minidit.download import DatasetError
from minidit.run.checkpoint import CheckpointError
from minidit.run.guard import DivergenceError, Interrupted
from minidit.run.outputs import OutputError

__all__ = ["EXIT_CODES", "build_parser", "config_from_preset", "main"]

EXIT_CODES = "exit codes: 0 done, 1 the work failed (a file, dataset or checkpoint; a diverged run), 2 refused " \
             "before any work (bad arguments, device or run folder), 3 a bug (traceback printed), 130 Ctrl-C, " \
             "143 SIGTERM (training saves a checkpoint first); MINIDIT_DEBUG=1 or --debug prints tracebacks"
FAILED = (CheckpointError, OutputError, DatasetError, DivergenceError, OSError)  # exit 1


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="minidit", description="minidit: train, sample and evaluate small diffusion transformers.",
        epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"minidit {minidit.__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of every error")
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
    debug = args.debug or os.environ.get("MINIDIT_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except Interrupted as stop:  # training saved a checkpoint; say how to continue
        return _fail(args, f"{stop}; continue with: {_resume_command()}", stop.exit_code, debug)
    except KeyboardInterrupt:
        return _fail(args, "interrupted (Ctrl-C)", 130, debug)
    except (ValueError, TypeError) as err:  # refused: bad input, found before any long computation
        return _fail(args, str(err), 2, debug)
    except FAILED as err:
        return _fail(args, str(err), 1, debug)
    except Exception:  # noqa: BLE001  (a bug: show everything)
        traceback.print_exc()
        print(f"minidit {args.command}: an unexpected error (a bug); please report it with the traceback above",
              file=sys.stderr)
        return 3


def _fail(args, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip()) or "failed"
    print(f"minidit {args.command}: error: {one_line}", file=sys.stderr)
    return code


def _resume_command() -> str:
    """The command line that was run, with --resume (and without --restart)."""
    words = [w for w in sys.argv[1:] if w not in ("--resume", "--restart")]
    return " ".join(["minidit", *words, "--resume"])


if __name__ == "__main__":
    sys.exit(main())
