"""``minidit train``: a preset, changed by key=value overrides, trained and reported."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json

import torch

from minidit.dit import DIT_CONFIGS
from minidit.run.build import MODEL_BUILDERS, make_model, make_objective
from minidit.device import get_device
from minidit.run.budget import Budget
from minidit.run.config import PRESETS, TrainConfig
from minidit.run.generate import format_eval
from minidit.run.report import train_and_report


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``minidit train``."""
    keys = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    parser = subparsers.add_parser(
        "train", help="train a preset, then write a sample grid and quality figures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a named preset (minidit.run.config.PRESETS), changed by key=value overrides. "
        "At the end the EMA weights draw OUT/samples.png and are scored on --eval-n samples "
        "(MNIST-classifier FD beside its real-vs-real floor, and class accuracy) into OUT/eval.json.",
        epilog=f"presets: {', '.join(PRESETS)}\n\nconfig keys: {keys}\n\n"
        "values are converted to the key's type (none/null for optional ones); dict keys take\n"
        "dotted paths, e.g. objective.kind=flow objective.cfg_scale=2 model_overrides.depth=4\n\n"
        "--steps N alone trains N steps with no time limit; --minutes M alone keeps the preset's steps\n"
        "as a cap; both: whichever comes first. The learning rate and the EMA follow the budget.\n\n"
        "example: minidit train --preset mnist-cpu --out runs/first batch_size=64")
    parser.add_argument("--preset", default="mnist-cpu", help="the starting recipe (default mnist-cpu)")
    parser.add_argument("--out", help="output folder (default: the preset's out_dir)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the preset's, with its time limit)")
    parser.add_argument("--minutes", type=float, help="minutes of training (default: the preset's)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/latest.pt")
    parser.add_argument("--restart", action="store_true",
                        help="start over where OUT holds a run, keeping the old one as OUT.<date-time>")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the fastest available)")
    parser.add_argument("--eval-n", type=int, default=500, help="samples scored at the end (0: skip)")
    parser.add_argument("--grid-n", type=int, default=100, help="samples in OUT/samples.png")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and when it stops, and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig fields to change")
    parser.set_defaults(func=run_train)
    return parser


def config_from_preset(preset: str, overrides: list[str] = ()) -> TrainConfig:
    """The TrainConfig of `preset` with `key=value` overrides, validated.

    Raises:
        ValueError: an unknown preset, key, model or objective field, or a value of the wrong type.
    """
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


def _check_buildable(config: TrainConfig) -> None:
    """Build the model (on the meta device: no memory) and the objective, so a bad model name or
    override fails now, not after the dataset has loaded."""
    if config.model not in MODEL_BUILDERS and config.model not in DIT_CONFIGS:
        raise ValueError(f"unknown model {config.model!r}; valid models: "
                         f"{', '.join([*MODEL_BUILDERS, *DIT_CONFIGS])}")
    try:
        with torch.device("meta"):
            make_model(config)
    except TypeError as err:
        raise ValueError(f"model_overrides {config.model_overrides} do not fit {config.model!r}: {err}") from err
    make_objective(config)


def run_train(args) -> int:
    config = config_from_preset(args.preset, args.overrides)
    flags = {"out_dir": args.out, "steps": args.steps, "minutes": args.minutes, "device": args.device}
    given = {item.partition("=")[0] for item in args.overrides}
    twice = sorted(k for k, v in flags.items() if v is not None and k in given)
    if twice:
        raise ValueError(f"{', '.join(twice)} given both as a flag and as key=value; give each once")
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.steps is not None and args.minutes is None and "minutes" not in given:
        changes["minutes"] = None  # --steps alone: exactly that many steps, no time limit
    config = dataclasses.replace(config, **changes)
    get_device(config.device)  # an unknown or missing device is refused before any work
    config.validate()
    if args.eval_n < 0 or args.eval_n == 1 or args.grid_n < 1:
        raise ValueError(f"--eval-n must be 0 or >= 2 and --grid-n >= 1, got {args.eval_n}, {args.grid_n}")
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        print(f"# the run {Budget.of(config).describe()}")
        return 0
    report = train_and_report(config, args.resume, restart=args.restart, eval_n=args.eval_n, grid_n=args.grid_n,
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
