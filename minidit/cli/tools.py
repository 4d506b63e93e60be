"""``minidit flops`` (parameters and GMACs of a config) and ``minidit exercises`` (student notebooks)."""

from __future__ import annotations

import argparse

from minidit.dit import DIT_CONFIGS
from minidit.exercises.notebooks import clean, generate
from minidit.flops import paper_table, profile_named
from minidit.unet import UNET_CONFIGS
from minidit.vit import VIT_CONFIGS


def add_flops_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``minidit flops NAME [--batch-size N] [--conditioning C] | --all``."""
    parser = subparsers.add_parser(
        "flops", help="parameter and GMAC counts of a DiT, U-Net or ViT config",
        description="Parameters and GMACs (the DiT paper's 'Gflops') of a named config, "
        "counted by torch's FlopCounterMode on the meta device.")
    parser.add_argument("name", nargs="?", help="a config name, e.g. DiT-XL/2, unet-mnist-cpu or vit-mnist")
    parser.add_argument("--all", action="store_true", help="the 12 DiT configs vs the paper's Table 4")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--conditioning", default=None,
                        help="override a DiT's conditioning: adaln-zero, adaln, cross-attention, in-context, or a text "
                        "variant reading the MNIST captions: text-cross-attention, mmdit")
    parser.set_defaults(func=run_flops)
    return parser


def run_flops(args: argparse.Namespace) -> int:
    if args.all:
        print(paper_table())
        return 0
    if args.name is None:
        names = [*DIT_CONFIGS, *UNET_CONFIGS, *VIT_CONFIGS]
        raise ValueError("give a config name, or --all; valid names: " + ", ".join(names))
    overrides = {"conditioning": args.conditioning} if args.conditioning else {}
    params, macs = profile_named(args.name, args.batch_size, **overrides)
    print(f"{args.name}: {params / 1e6:.2f} M parameters, {macs / 1e9:.2f} GMACs "
          f"(forward pass, batch {args.batch_size})")
    return 0


def add_exercises_parser(subparsers) -> None:
    """Register `minidit exercises generate|clean`."""
    parser = subparsers.add_parser("exercises", help="student notebooks and notebook hygiene")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = actions.add_parser("generate", help="write student notebooks with the solutions stubbed out")
    gen.add_argument("src", help="folder of tutorial notebooks (e.g. tutorials/)")
    gen.add_argument("--out", required=True, help="folder of the student notebooks (e.g. tutorials/student/)")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 if any is out of date")
    cln = actions.add_parser("clean", help="drop execution counts and run metadata, keep outputs")
    cln.add_argument("paths", nargs="+", help="notebooks or folders of notebooks")
    cln.add_argument("--check", action="store_true", help="write nothing; exit 1 if any is not clean")
    for action in (gen, cln):
        action.set_defaults(func=run_exercises)


def run_exercises(args: argparse.Namespace) -> int:
    """`generate` or `clean`; prints each file written, or with --check each stale one (then exits 1)."""
    bad = generate(args.src, args.out, args.check) if args.action == "generate" else clean(args.paths, args.check)
    for path in bad:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return int(bool(args.check and bad))
