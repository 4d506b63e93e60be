"""Seconds to sample 1,000 MNIST digits with the main job's default sampler, this minidit beside another.

A checkpoint of the `mnist-cpu` preset (its network after one training step: the speed of
sampling does not depend on the weights) is written by each version, then timed in a fresh
process with `sample_model` for n digits with the preset's own sampler (batches of 250), after a
warm-up draw:

    before   the older minidit on its own mnist-cpu checkpoint (what a user got)
    engine   this minidit on the older checkpoint (the same network and sampler: the code's speed)
    after    this minidit on its own mnist-cpu checkpoint (the main job as it is now)

The three alternate for --repeats rounds, so all see the same machine state.

    python benchmarks/sampling_speed.py --old-ref 1400e39 [--repeats 3] [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = "import sys; from minidit.cli import main; sys.exit(main(sys.argv[1:]))"
# the old package has minidit.checkpoint and minidit.commands; this one minidit.run.*
TIME = r'''
import json, sys, time, torch
try:
    from minidit.run.build import load_checkpoint
    from minidit.run.generate import sample_model
except ImportError:
    from minidit.checkpoint import load_checkpoint
    from minidit.commands import sample_model
_, ema, objective, config = load_checkpoint(sys.argv[1], "cpu")
sample_model(ema, objective, config, 50, seed=1)  # warm-up: allocations, lazy inits
begin = time.perf_counter()
out = sample_model(ema, objective, config, int(sys.argv[2]), seed=0)
print(json.dumps({"seconds": time.perf_counter() - begin, "nfe": out["nfe"], "sampler": out["sampler"],
                  "steps": out["steps"], "cfg_scale": out["cfg_scale"], "cfg_interval": out.get("cfg_interval"),
                  "threads": torch.get_num_threads()}))
'''


def _sampler(r: dict) -> str:
    interval = r.get("cfg_interval")
    where = "" if interval is None else f" on σ in ({interval[0]:g}, {interval[1]:g}]"
    return f"{r['sampler']} x {r['steps']}, cfg {r['cfg_scale']:g}{where}, NFE {r['nfe']:g}"


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True,
                   capture_output=True)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-ref", required=True, help="the git ref to compare against")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sampling_speed.md"))
    args = parser.parse_args()
    times = {"old": [], "engine": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = worktree(args.old_ref, Path(tmp) / "old")
        try:
            env_old = {**os.environ, "PYTHONPATH": str(old)}
            ckpt = Path(tmp) / "run" / "latest.pt"
            subprocess.run([sys.executable, "-c", TRAIN, "train", "--preset", "mnist-cpu", "--out", str(ckpt.parent),
                            "--steps", "1", "--eval-n", "0", "--grid-n", "10", "--device", "cpu", "--no-progress",
                            "dataset_size=256", "sample_every=0"], check=True, env=env_old, capture_output=True,
                           cwd=tmp)  # not this checkout's folder: python -c puts the cwd first on sys.path
            env_new = {**os.environ, "PYTHONPATH": str(ROOT)}
            new_ckpt = Path(tmp) / "new-run" / "latest.pt"
            subprocess.run([sys.executable, "-c", TRAIN, "train", "--preset", "mnist-cpu", "--out",
                            str(new_ckpt.parent), "--steps", "1", "--eval-n", "0", "--grid-n", "10", "--device", "cpu",
                            "--no-progress", "dataset_size=256", "sample_every=0"], check=True, env=env_new,
                           capture_output=True, cwd=tmp)
            envs = {"old": env_old, "engine": env_new, "new": env_new}
            ckpts = {"old": ckpt, "engine": ckpt, "new": new_ckpt}
            for r in range(args.repeats):
                for which in ("old", "engine", "new"):
                    out = subprocess.run([sys.executable, "-c", TIME, str(ckpts[which]), str(args.n)], check=True,
                                         env=envs[which], capture_output=True, text=True, cwd=tmp)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    times[which].append(result)
                    print(f"round {r + 1} {which}: {result['seconds']:.2f} s ({result['sampler']}, "
                          f"{result['steps']} steps, cfg {result['cfg_scale']}, NFE {result['nfe']:g})", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    median = {k: statistics.median(r["seconds"] for r in v) for k, v in times.items()}
    machine = f"{platform.machine()} {platform.processor()}".strip() + f", {os.cpu_count()} CPUs"
    rounds = {k: ", ".join(f"{r['seconds']:.2f}" for r in v) for k, v in times.items()}
    lines = [f"# Sampling speed: {args.n} MNIST digits with `mnist-cpu`'s default sampler", "",
             f"Written by `python benchmarks/sampling_speed.py --old-ref {args.old_ref} --n {args.n} --repeats "
             f"{args.repeats}` on the CPU ({machine}, {times['new'][0]['threads']} torch threads). The three "
             "rows alternate, each in a fresh process; the first two share one checkpoint.", "",
             "| version | checkpoint | sampler | seconds per round | median |", "|---|---|---|---|---|",
             *[f"| {version} | {ck} | {_sampler(times[k][0])} | {rounds[k]} | {median[k]:.2f} |"
               for k, version, ck in (("old", f"{args.old_ref} (before)", "its mnist-cpu"),
                                      ("engine", "this tree", f"{args.old_ref}'s mnist-cpu"),
                                      ("new", "this tree (after)", "its mnist-cpu"))],
             "", f"Engine alone (the same checkpoint): {median['engine'] / median['old']:.3f} x the time before. "
             f"The main job as a user gets it: {median['new']:.1f} s against {median['old']:.1f} s before "
             f"({median['new'] / median['old']:.3f} x); target 20 s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps({f"median_{k}": v for k, v in median.items()}))


if __name__ == "__main__":
    main()
