"""Make the weights that ship with minidit: train each preset, score it, store its EMA weights.

For each name: `minidit train --preset PRESET` into runs/pretrained/NAME (or `--from-run` an
existing run of that preset), score the EMA weights (n samples: FD beside its floor and
accuracy; the autoencoder: its reconstructions), and write minidit/weights/NAME.safetensors
with its manifest entry (`minidit.run.weights`): the config, the SHA-256 and the record of the
run (command, device, threads, minutes, steps, scores). The main job's DiT is trained on the
shipped autoencoder's latents ("pretrained:mnist-ae"), so the autoencoder comes first.

    python benchmarks/pretrained.py                         # all, in order
    python benchmarks/pretrained.py --names mnist-dit --from-run mnist-dit=runs/mnist-cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from minidit.cli import config_from_preset
from minidit.device import cpu_name
from minidit.run import weights
from minidit.run.build import load_checkpoint, make_objective
from minidit.run.engine import train
from minidit.run.generate import evaluate_model

# name -> (preset, overrides, storage dtype); the autoencoder stays float32 so that the latent
# model's fingerprint of it holds bit for bit
MODELS = {
    "mnist-ae": ("mnist-ae-cpu", [], "float32"),
    "mnist-dit": ("mnist-cpu", [], "float16"),  # the main job: a DiT on the shipped autoencoder's latents
    # DDPM-style (ε, linear table) on the same latents, for a fixed 8,000 steps (the preset's 10-minute
    # budget reaches fewer on one thread; the record states the steps and minutes)
    "mnist-ddpm": ("mnist-ddpm-latent-cpu", ["steps=8000", "minutes=null"], "float16"),
    # text to image (minidit.captions): the preset reads captions by cross-attention, the second run by
    # MMDiT's joint attention, both for its 20 minutes
    "mnist-text": ("mnist-text-cpu", [], "float16"),
    "mnist-mmdit": ("mnist-text-cpu", ['model_overrides={"conditioning": "mmdit"}'], "float16"),
    # few-step students of mnist-dit (minidit.run.fewstep), 15 minutes each: consistency distillation and
    # MeanFlow, which draw in one step (benchmarks/few_step.py measures them at 1, 2 and 4)
    "mnist-cd": ("mnist-cd-cpu", [], "float16"),
    "mnist-meanflow": ("mnist-meanflow-cpu", [], "float16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--from-run", nargs="+", default=[], metavar="NAME=DIR",
                   help="use this finished run of the name's preset instead of training")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/pretrained"))
    p.add_argument("--n", type=int, default=1000, help="samples scored")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--train-threads", type=int, help="with --from-run: the threads that run trained with")
    p.add_argument("--made-by", help="with --from-run: the command that made that run")
    p.add_argument("--folder", type=Path, default=weights.FOLDER, help="where the weights go")
    return p.parse_args(argv)


def make(name: str, run_dir: Path | None, args) -> weights.Entry:
    preset, overrides, dtype = MODELS[name]
    command = f"minidit train --preset {preset}" + "".join(f" {shlex.quote(o)}" for o in overrides)
    if run_dir is None:
        run_dir = args.runs_dir / name
        config = config_from_preset(preset, [*overrides, f"out_dir={run_dir}", "device=cpu"])
        begin = time.perf_counter()
        train(config, restart=True, progress=False)
        print(f"{name}: trained in {(time.perf_counter() - begin) / 60:.1f} min")
    _, ema, objective, config = load_checkpoint(run_dir / "latest.pt")
    config = with_preset_sampling(config, config_from_preset(preset, overrides))
    objective = make_objective(config)
    log = [r for r in _read_log(run_dir / "log.jsonl") if "elapsed_s" in r]
    scores = evaluate_model(ema, objective, config, args.n)
    sampling = {("sample_steps" if k == "steps" else k): v for k, v in scores.items()
                if isinstance(v, (int, float, str, type(None)))}  # the sampler's steps are not the run's
    record = {**sampling, "preset": preset, "command": command, "made_by": args.made_by or command,
              "device": f"{platform.machine()} {_cpu()}", "train_threads": args.train_threads or torch.get_num_threads(),
              "eval_threads": torch.get_num_threads(), "torch": torch.__version__,
              "steps": log[-1]["step"] if log else None,
              "train_minutes": round(log[-1]["elapsed_s"] / 60, 2) if log else None}
    stored = dataclasses.replace(config, out_dir=f"runs/{preset}", data_root=None).to_dict()
    entry = weights.write(name, ema.state_dict(), stored, record, dtype, folder=args.folder)
    print(f"{name}: {entry.file} ({(args.folder / entry.file).stat().st_size / 2**20:.2f} MiB), record {record}")
    return entry


SAMPLING_KEYS = ("sampler", "sample_steps", "cfg_scale", "cfg_interval", "eta")


def with_preset_sampling(config, preset):
    """`config` with the sampling defaults (sampler, steps, guidance) of the preset as it is now.

    They only say how to draw from the trained network, never how it trains, so a run keeps its
    weights when a better sampler is chosen for it later (the record scores the one stored)."""
    def sampling(objective: dict, reference: dict) -> dict:
        if objective.get("kind") == "latent":
            return {**objective, "inner": sampling(objective["inner"], reference["inner"])}
        kept = {k: v for k, v in objective.items() if k not in SAMPLING_KEYS}
        return {**kept, **{k: v for k, v in reference.items() if k in SAMPLING_KEYS}}

    return dataclasses.replace(config, objective=sampling(config.objective, preset.objective))


def _read_log(path: Path) -> list[dict]:
    from minidit.plotting import read_log
    return read_log(path) if path.is_file() else []


def _cpu() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = dict(item.split("=", 1) for item in args.from_run)
    for name in args.names:
        make(name, Path(runs[name]) if name in runs else None, args)
    total = sum((args.folder / e.file).stat().st_size for e in weights.entries(args.folder).values())
    print(f"shipped weights: {total / 2**20:.2f} MiB in all")
    if total > 20 * 2**20:
        sys.exit("the shipped weights exceed 20 MiB")


if __name__ == "__main__":
    main()
