"""A small sweep of the main job's recipe: which variant is best in 10 minutes on a slow machine?

Each point is the `mnist-flow-cpu` preset (the tutorials' pixel recipe, and the main job `mnist-cpu`
before this sweep) with a few `key=value` changes (model size, batch, learning rate, time-step
sampling, EMA, pixels against latents), trained for `--minutes` (or its step budget, whichever ends first;
the learning rate and EMA follow that budget) with `--threads` torch threads in its own process, then scored: 1,000 class-balanced samples with the point's sampler, the MNIST-classifier
FD beside its real-vs-real floor at the same n, the accuracy of the classifier on the conditioned
labels, and the sampling time. With `--parallel 2` two points train at once, one core each: the
"one core, the other busy" machine of issue 14.

Results accumulate in RESULTS/mnist_recipe.{json,md}, one row per (point, threads, minutes); a
row already there is not run again, so a killed sweep resumes where it stopped.

    python benchmarks/mnist_recipe.py --threads 1 --parallel 2            # every point, 1 thread each
    python benchmarks/mnist_recipe.py --threads 2 --points base wide-lr    # some points, 2 threads
    python benchmarks/mnist_recipe.py --list                              # the points
    python benchmarks/mnist_recipe.py --tune-sampling small-lr5e-3-10k --threads 2
    python benchmarks/mnist_recipe.py --tune-sampling latent-small-10k --sampling-set latent --threads 2
                            # one trained point's checkpoint under each SAMPLINGS setting

The sampling settings are compared on the same checkpoint with the same noise (seed), so their
differences are the sampler's, not the run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> (what it changes, overrides of the mnist-flow-cpu preset)
POINTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the preset as it is", []),
    "lr3e-3": ("learning rate 3e-3", ["lr=3e-3"]),
    "batch64": ("batch 64, learning rate 3e-3", ["batch_size=64", "lr=3e-3"]),
    "narrow": ("width 96 (3 heads): ~0.6x the FLOPs per image", ['model_overrides={"hidden_size": 96, "num_heads": 3}']),
    "shallow": ("depth 4: 2/3 of the FLOPs per image", ['model_overrides={"depth": 4}']),
    "patch7": ("patch 7 (16 tokens), width 192", ['model_overrides={"patch_size": 7, "hidden_size": 192, "num_heads": 6}']),
    "uniform-t": ("t ~ U[0, 1] instead of logit-normal", ['objective={"kind": "flow", "t_sampling": "uniform", '
                                                          '"sampler": "euler", "sample_steps": 10, "cfg_scale": 1.5}']),
    "ema0.995": ("EMA decay 0.995 (a shorter average)", ["ema_decay=0.995"]),
    "ema0.999": ("EMA decay 0.999 (a longer average)", ["ema_decay=0.999"]),
    "small": ("width 96 (3 heads), depth 4: ~0.4x the FLOPs per image",
              ['model_overrides={"hidden_size": 96, "num_heads": 3, "depth": 4}']),
    "shallow-lr3e-3": ("depth 4, learning rate 3e-3", ['model_overrides={"depth": 4}', "lr=3e-3"]),
    "shallow-b64": ("depth 4, batch 64, learning rate 3e-3", ['model_overrides={"depth": 4}', "batch_size=64", "lr=3e-3"]),
    "shallow-lr5e-3": ("depth 4, learning rate 5e-3", ['model_overrides={"depth": 4}', "lr=5e-3"]),
    "small-lr3e-3": ("width 96 (3 heads), depth 4, learning rate 3e-3",
                     ['model_overrides={"hidden_size": 96, "num_heads": 3, "depth": 4}', "lr=3e-3"]),
    "small-lr5e-3": ("width 96 (3 heads), depth 4, learning rate 5e-3",
                     ['model_overrides={"hidden_size": 96, "num_heads": 3, "depth": 4}', "lr=5e-3"]),
    "small-b64-lr5e-3": ("width 96 (3 heads), depth 4, batch 64, learning rate 5e-3",
                         ['model_overrides={"hidden_size": 96, "num_heads": 3, "depth": 4}', "batch_size=64", "lr=5e-3"]),
    "small-lr5e-3-10k": ("width 96 (3 heads), depth 4, learning rate 5e-3, 10,000 steps, EMA 0.999",
                         ['model_overrides={"hidden_size": 96, "num_heads": 3, "depth": 4}', "lr=5e-3",
                          "steps=10000", "ema_decay=0.999"]),
    "shallow-lr5e-3-8k": ("depth 4, learning rate 5e-3, 8,000 steps, EMA 0.99875",
                          ['model_overrides={"depth": 4}', "lr=5e-3", "steps=8000", "ema_decay=0.99875"]),
    "latent-small-10k": ("latents of the shipped autoencoder (4x7x7, patch 1), width 96, depth 4, lr 5e-3, "
                         "10,000 steps, EMA 0.999",
                         ['objective={"kind": "latent", "autoencoder": "pretrained:mnist-ae", "autoencoder_preset": '
                          '"mnist-ae-cpu", "latent_shape": [4, 7, 7], "inner": {"kind": "flow", "t_sampling": '
                          '"logit_normal", "sampler": "euler", "sample_steps": 10, "cfg_scale": 1.5}}',
                          'model_overrides={"patch_size": 1, "hidden_size": 96, "num_heads": 3, "depth": 4}',
                          "lr=5e-3", "steps=10000", "ema_decay=0.999"]),
    "steps8000": ("a step budget of 8,000 (time ends it first on a slow machine)", ["steps=8000"]),
}

# (sampler, steps, cfg scale, guidance interval in sigma/alpha or None) tried by --tune-sampling, by --sampling-set
SAMPLINGS = {"pixel": [("euler", 10, 1.5, None), ("euler", 10, 1.0, None), ("euler", 10, 2.0, None), ("euler", 10, 3.0, None),
             ("euler", 10, 2.0, (0.0, 3.0)), ("euler", 10, 3.0, (0.0, 3.0)), ("euler", 10, 3.0, (0.3, 3.0)),
             ("euler", 10, 4.0, (0.3, 3.0)), ("euler", 16, 2.0, None), ("heun", 8, 2.0, None),
             ("dpm_solver++", 10, 2.0, None), ("dpm_solver++3m", 10, 2.0, None)],
             "latent": [("euler", 10, 1.5, None), ("euler", 10, 1.0, None), ("euler", 10, 1.15, None),
                        ("euler", 10, 1.25, None), ("euler", 10, 1.5, (0.0, 3.0)), ("euler", 10, 1.25, (0.0, 3.0)),
                        ("euler", 10, 1.5, (0.0, 2.0)), ("euler", 10, 1.75, (0.0, 1.5)), ("euler", 10, 1.5, (0.0, 1.0)),
                        ("euler", 10, 2.0, (0.0, 3.0)), ("dpm_solver++3m", 10, 1.5, (0.0, 2.0)),
                        ("heun", 5, 1.5, (0.0, 2.0))]}

WORKER = r'''
import json, sys, torch
from minidit.cli import config_from_preset
from minidit.run.build import load_checkpoint
from minidit.run.engine import train
from minidit.run.generate import evaluate_model
out_dir, minutes, n, seed, result, *overrides = sys.argv[1:]
config = config_from_preset("mnist-flow-cpu", [*overrides, f"out_dir={out_dir}", f"minutes={minutes}", f"seed={seed}", "sample_every=0", "device=cpu"])
summary = train(config, restart=True, progress=False)
_, ema, objective, config = load_checkpoint(summary["checkpoint"], "cpu")
scores = evaluate_model(ema, objective, config, int(n), seed=int(seed))
row = {"step": summary["step"], "train_minutes": summary["elapsed_s"] / 60, "images_per_s": summary["images_per_s"],
       "threads": torch.get_num_threads(), **scores}
open(result, "w").write(json.dumps(row))
'''


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--points", nargs="+", choices=list(POINTS), help="default: all")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--minutes", type=float, default=10.0, help="training time of each run")
    p.add_argument("--n", type=int, default=1000, help="samples scored per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/mnist-recipe"),
                   help="where each run's folder stays (its checkpoint, for other samplers later)")
    p.add_argument("--list", action="store_true", help="print the points and stop")
    p.add_argument("--sampling-set", choices=list(SAMPLINGS), default="pixel", help="the settings --tune-sampling tries")
    p.add_argument("--tune-sampling", metavar="POINT", help="score POINT's checkpoint (trained with --threads and "
                   "--minutes) under each of SAMPLINGS")
    return p.parse_args(argv)


def _key(name: str, threads: int, minutes: float) -> str:
    return f"{name}|{threads}t|{minutes:g}min"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.list:
        for name, (what, overrides) in POINTS.items():
            print(f"{name:10s} {what}: {' '.join(overrides) or '-'}")
        return
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.tune_sampling:
        return tune_sampling(args)
    store = args.results_dir / "mnist_recipe.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    todo = [p for p in (args.points or list(POINTS)) if _key(p, args.threads, args.minutes) not in done]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        running: list[tuple[str, subprocess.Popen, Path, float, Path]] = []
        while todo or running:
            while todo and len(running) < args.parallel:
                name = todo.pop(0)
                result = Path(tmp) / f"{name}.json"
                run_dir = args.runs_dir / _key(name, args.threads, args.minutes).replace("|", "-")
                cmd = [sys.executable, "-c", WORKER, str(run_dir), str(args.minutes), str(args.n),
                       str(args.seed), str(result), *POINTS[name][1]]
                log = open(Path(tmp) / f"{name}.log", "w")
                running.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT),
                                result, time.time(), run_dir))
                print(f"started {name}", flush=True)
            time.sleep(5)
            for entry in list(running):
                name, proc, result, begin, run_dir = entry
                if proc.poll() is None:
                    continue
                running.remove(entry)
                if proc.returncode != 0:
                    print(f"{name} failed (exit {proc.returncode}):\n" + (Path(tmp) / f"{name}.log").read_text()[-2000:])
                    continue
                row = {"point": name, "what": POINTS[name][0], "overrides": POINTS[name][1], "minutes": args.minutes,
                       "parallel": args.parallel, "wall_minutes": (time.time() - begin) / 60, "run_dir": str(run_dir),
                       **json.loads(result.read_text())}
                done[_key(name, args.threads, args.minutes)] = row
                store.write_text(json.dumps(done, indent=2) + "\n")  # after every run: nothing lost when killed
                print(f"{name}: step {row['step']}, FD {row['fd']:.2f} (floor {row['fd_floor']:.2f}, "
                      f"{row['fd'] / row['fd_floor']:.2f}x), accuracy {row['accuracy']:.3f}, "
                      f"{row['n']} samples in {row['seconds']:.1f} s", flush=True)
    write_table(done, args.results_dir)


def tune_sampling(args) -> None:
    """Score one point's checkpoint under every SAMPLINGS setting (same seed), appending to
    RESULTS/mnist_recipe_sampling.{json,md} after each."""
    import torch

    from minidit.run.build import load_checkpoint
    from minidit.run.generate import evaluate_model

    torch.set_num_threads(args.threads)
    key = _key(args.tune_sampling, args.threads, args.minutes)
    run_dir = args.runs_dir / key.replace("|", "-")
    _, ema, objective, config = load_checkpoint(run_dir / "latest.pt")
    store = args.results_dir / "mnist_recipe_sampling.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    for sampler, steps, cfg, interval in SAMPLINGS[args.sampling_set]:
        row_key = f"{key}|{sampler}|{steps}|{cfg}|{interval}"
        if row_key in done:
            continue
        scores = evaluate_model(ema, objective, config, args.n, sampler=sampler, steps=steps, cfg_scale=cfg,
                                cfg_interval=interval, seed=args.seed)
        done[row_key] = {"point": args.tune_sampling, "threads": args.threads, **scores}
        store.write_text(json.dumps(done, indent=2) + "\n")
        print(f"{sampler} {steps} cfg {cfg} interval {interval}: NFE {scores['nfe']:g}, {scores['seconds']:.1f} s, "
              f"FD {scores['fd']:.2f} (floor {scores['fd_floor']:.2f}), accuracy {scores['accuracy']:.3f}", flush=True)
    lines = ["# Sampling settings on trained variants of the main job's recipe", "",
             "Written by `python benchmarks/mnist_recipe.py --tune-sampling POINT`: the EMA weights of one sweep "
             "point, n class-balanced samples from the same seed under each setting. Interval: guidance only where "
             "sigma/alpha lies in (lo, hi] (`minidit.guidance`); NFE counts a guided pair once; seconds on the CPU "
             "with the threads shown.", "",
             "| point | threads | sampler | steps | cfg | interval | NFE | seconds | FD | floor | FD / floor | accuracy |",
             "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in done.values():
        interval = "all" if r["cfg_interval"] is None else f"({r['cfg_interval'][0]:g}, {r['cfg_interval'][1]:g}]"
        lines.append(f"| {r['point']} | {r['threads']} | {r['sampler']} | {r['steps']} | {r['cfg_scale']:g} | "
                     f"{interval} | {r['nfe']:g} | {r['seconds']:.1f} | {r['fd']:.2f} | {r['fd_floor']:.2f} | "
                     f"{r['fd'] / r['fd_floor']:.2f} | {r['accuracy']:.3f} |")
    (args.results_dir / "mnist_recipe_sampling.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results_dir / 'mnist_recipe_sampling.md'}")


def write_table(done: dict, folder: Path) -> None:
    machine = f"{platform.machine()} {platform.processor()}".strip() + f", {os.cpu_count()} CPUs"
    lines = ["# The main job's recipe: a sweep of `mnist-flow-cpu` variants", "",
             f"Written by `python benchmarks/mnist_recipe.py` on the CPU ({machine}). Each run trains for the "
             "minutes shown or its step budget, whichever ends first (the learning rate and EMA follow that "
             "budget), then draws n class-balanced samples with the point's sampler (Euler, 10 steps, "
             "guidance 1.5 at every step). FD: MNIST-classifier Frechet distance (not Inception FID) beside the real-vs-real "
             "floor at the same n. `parallel 2`: two runs at once, one core each.", "",
             "| point | change | threads | parallel | minutes | steps | images/s | FD | floor | FD / floor | accuracy "
             "| sampling s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in sorted(done.values(), key=lambda r: (r["threads"], r["minutes"], r["fd"] / r["fd_floor"])):
        lines.append(f"| {row['point']} | {row['what']} | {row['threads']} | {row['parallel']} | {row['minutes']:g} | "
                     f"{row['step']} | {row['images_per_s']:.0f} | {row['fd']:.2f} | {row['fd_floor']:.2f} | "
                     f"{row['fd'] / row['fd_floor']:.2f} | {row['accuracy']:.3f} | {row['seconds']:.1f} |")
    (folder / "mnist_recipe.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'mnist_recipe.md'}")


if __name__ == "__main__":
    main()
