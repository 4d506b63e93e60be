"""The ``minidit`` command line: ``minidit train / sample / eval / flops``.

Each subcommand lives beside the module that implements it and registers itself
here with ``add_parser(subparsers)``; this file only assembles them.
"""

from __future__ import annotations

import argparse
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
    registers = []
    return registers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
