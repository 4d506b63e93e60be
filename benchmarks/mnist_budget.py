"""The laptop budget: train the `mnist-cpu` preset for a fixed time, then sample and score it.

1. Train once for `--minutes` (or the preset's steps, whichever ends first; the learning rate
   and EMA anneal within that budget), keeping a checkpoint every steps/`--segments` steps, then
   score `--curve-n` samples of the EMA weights of each: quality during the run. (Points before
   the end are mid-run weights at a high learning rate, not shorter runs.)
2. Draw `--n` class-balanced samples with the sampler, steps and guidance scale stored in the
   preset's objective, timed (the target is at most `--target-s` = 60 s), and score them.
3. With `--all-samplers`, score every sampler the objective can drive at each of `--steps-list`.

Quality is the MNIST-classifier Frechet distance beside its real-vs-real floor at the same n
(`minidit.metrics.evaluate_samples`; not the Inception FID of the literature) and the accuracy
of a classifier on the conditioned labels. Results go to RESULTS/mnist_budget.{md,json,png}.

Usage:
    python benchmarks/mnist_budget.py                                 # the 10-minute budget
    python benchmarks/mnist_budget.py --minutes 0.5 --n 100 --curve-n 50 --results-dir /tmp/r
    python benchmarks/mnist_budget.py --all-samplers --steps-list 10 20 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from minidit.cli import config_from_preset
from minidit.plotting import read_log
from minidit.flops import count_params
from minidit.run.build import load_checkpoint, make_model, make_objective
from minidit.run.engine import train
from minidit.run.generate import evaluate_model
from minidit.run.objectives import ADAPTIVE
from minidit.run.outputs import atomic_write, check_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="mnist-cpu")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    p.add_argument("--segments", type=int, default=5, help="checkpoints kept for the quality-vs-time curve")
    p.add_argument("--n", type=int, default=1000, help="samples of the timed final draw and its scores")
    p.add_argument("--curve-n", type=int, default=500, help="samples scored for each kept checkpoint")
    p.add_argument("--target-s", type=float, default=20.0, help="time budget of the final draw (issue 14: 20 s)")
    p.add_argument("--target", type=float, nargs=2, metavar=("ACCURACY", "FD_RATIO"),
                   help="quality target of the final draw: accuracy >= ACCURACY and FD <= FD_RATIO x floor "
                        "(default: issue 14's, 0.95 and 3 with one thread, 0.98 and 1.2 with more)")
    p.add_argument("--all-samplers", action="store_true", help="score every sampler at --steps-list")
    p.add_argument("--steps-list", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--sampler-n", type=int, help="samples per sampler row (default --n)")
    p.add_argument("--with-own-steps", action="store_true",
                   help="also run ddpm (all T steps) and the adaptive rk45 samplers in the sweep")
    p.add_argument("--out-dir", default="runs/mnist-budget", help="the training run's folder")
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig changes, as for minidit train")
    return p.parse_args(argv)


def score(ckpt: Path, n: int, device, progress: bool, **sampling) -> dict:
    """Load the EMA weights of `ckpt` and score n samples (see minidit.run.generate.evaluate_model)."""
    _, ema_model, objective, config = load_checkpoint(ckpt, device)
    return evaluate_model(ema_model, objective, config, n, progress=progress, **sampling)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results_dir = check_folder(args.results_dir)
    base = config_from_preset(args.preset, [*args.overrides, f"out_dir={args.out_dir}", f"seed={args.seed}"])
    if args.device:
        base = dataclasses.replace(base, device=args.device)
    ckpt, progress = Path(base.out_dir) / "latest.pt", not args.no_progress
    device = base.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = {"preset": args.preset, "config": base.to_dict(), "minutes": args.minutes, "device": str(device),
              "machine": f"{platform.machine()} {platform.processor()}".strip() + f", {os.cpu_count()} CPUs, "
                         f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "curve": [], "final": None, "samplers": []}
    # 1. train once, keeping a checkpoint every steps/segments steps, then score each
    wall = time.perf_counter()
    config = dataclasses.replace(base, minutes=args.minutes, keep_checkpoints=True,
                                 checkpoint_every=max(1, base.steps // args.segments))
    summary = train(config, restart=True, progress=progress)
    report["train"] = {"params": count_params(make_model(base)), "step": summary["step"], "minutes": summary["elapsed_s"] / 60,
                       "images_per_s": summary["images_per_s"], "stopped_by": "steps" if summary["step"] >= base.steps
                       else "time"}
    logged = {r["step"]: r for r in read_log(Path(base.out_dir) / "log.jsonl") if "elapsed_s" in r}
    for path in sorted(Path(base.out_dir).glob("step_*.pt")):
        step = int(path.stem.split("_")[1])
        point = score(path, args.curve_n, device, progress, seed=args.seed)
        elapsed = logged.get(step, {}).get("elapsed_s")
        point.update(step=step, train_minutes=None if elapsed is None else elapsed / 60)
        report["curve"].append(point)
        print(f"step {step}: FD {point['fd']:.2f} (floor {point['fd_floor']:.2f}), accuracy {point['accuracy']:.3f}")
    # 2. the timed final draw with the preset's own sampler
    final = score(ckpt, args.n, device, progress, seed=args.seed)
    final.update(target_s=args.target_s, within_target=final["seconds"] <= args.target_s)
    accuracy, ratio = args.target or ((0.95, 3.0) if torch.get_num_threads() == 1 else (0.98, 1.2))
    final.update(target_accuracy=accuracy, target_fd_ratio=ratio, fd_ratio=final["fd"] / final["fd_floor"],
                 quality_met=final["accuracy"] >= accuracy and final["fd"] <= ratio * final["fd_floor"])
    report["final"] = final
    print(f"final: {args.n} samples in {final['seconds']:.1f} s (target {args.target_s:.0f} s), "
          f"FD {final['fd']:.2f} (floor {final['fd_floor']:.2f}, {final['fd_ratio']:.2f}x), accuracy "
          f"{final['accuracy']:.3f}; quality target (accuracy >= {accuracy}, FD <= {ratio}x floor) "
          f"{'met' if final['quality_met'] else 'MISSED'}")
    # 3. every sampler at each step count
    if args.all_samplers:
        _, _, objective, _ = load_checkpoint(ckpt)
        for name in objective.sampler_names():
            own = name in ADAPTIVE or (name == "ddpm" and objective.kind == "ddpm")  # all T steps
            if own and not args.with_own_steps:
                continue
            for steps in [None] if own else args.steps_list:
                row = score(ckpt, args.sampler_n or args.n, device, progress, sampler=name, steps=steps,
                            seed=args.seed)
                report["samplers"].append(row)
                print(f"{name:>16} steps {steps}: NFE {row['nfe']:g}, {row['seconds']:.1f} s, "
                      f"FD {row['fd']:.2f}, accuracy {row['accuracy']:.3f}")
    report["wall_minutes"] = (time.perf_counter() - wall) / 60
    objective = make_objective(base)
    report["default_sampling"] = {"sampler": objective.sampler, "steps": objective.sample_steps,
                                  "cfg_scale": objective.cfg_scale,
                                  "cfg_interval": getattr(objective, "cfg_interval", None)}
    write_results(report, results_dir, argv, f"mnist_budget_{args.threads}thread" if args.threads else "mnist_budget")
    return report


def write_results(report: dict, folder: Path, argv: list[str] | None, stem: str = "mnist_budget") -> None:
    """STEM.json (everything), .md (tables) and .png (quality against training time)."""
    text = json.dumps(report, indent=2)
    atomic_write(folder / f"{stem}.json", lambda tmp: tmp.write_text(text))
    curve, final = report["curve"], report["final"]
    # the curve: FD and its floor on the left axis, accuracy on the right
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    curve = [p for p in curve if p["train_minutes"] is not None]
    minutes = [p["train_minutes"] for p in curve]
    ax.plot(minutes, [p["fd"] for p in curve], "o-", label="FD of samples")
    ax.plot(minutes, [p["fd_floor"] for p in curve], "k--", label="real-vs-real floor")
    ax.set(xlabel="training time (min)", ylabel=f"MNIST-classifier FD (n={curve[0]['n'] if curve else '?'})",
           yscale="log")
    twin = ax.twinx()
    twin.plot(minutes, [p["accuracy"] for p in curve], "s:", color="tab:green", label="accuracy")
    twin.set(ylabel="classifier accuracy", ylim=(0, 1))
    handles, labels = zip(*[pair for a in (ax, twin) for pair in zip(*a.get_legend_handles_labels())])
    ax.legend(handles, labels, loc="upper center")
    fig.tight_layout()
    atomic_write(folder / f"{stem}.png", lambda tmp: fig.savefig(tmp, dpi=120))
    cmd = "python benchmarks/mnist_budget.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# MNIST budget: preset `{report['preset']}`, {report['minutes']:g} minutes of training",
        "", f"Command: `{cmd.strip()}`  ", f"Device: {report['device']} ({report['machine']})  ",
        f"Wall time of the whole script: {report['wall_minutes']:.1f} min  ",
        f"Training: a network of {report['train']['params'] / 1e6:.2f} M parameters, "
        f"{report['train']['step']} steps in {report['train']['minutes']:.2f} min "
        f"({report['train']['images_per_s']:.0f} images/s), stopped by its {report['train']['stopped_by']} budget", "",
        "FD is the MNIST-classifier Frechet distance (not Inception FID); the floor is real MNIST "
        "train images against the same test reference at the same n.", "",
        "## Final draw (the preset's sampler)", "",
        "| n | sampler | steps | cfg | NFE | seconds | target | FD | floor | FD / floor | accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        _row(final) + f" {final['target_s']:.0f} s {'ok' if final['within_target'] else 'MISSED'} |"
        f" {final['fd']:.3f} | {final['fd_floor']:.3f} | {final['fd_ratio']:.2f} | {final['accuracy']:.4f} |",
        "", f"Quality target with {torch.get_num_threads()} thread(s) (issue 14): accuracy >= "
        f"{final['target_accuracy']:g} and FD <= {final['target_fd_ratio']:g} x floor: "
        f"**{'met' if final['quality_met'] else 'missed'}**.",
        "", "## Quality during the run", "",
        "The kept checkpoints of the one run, each scored; before the last, the weights are mid-run (learning "
        "rate and EMA not yet annealed), not those of a shorter run.", "", f"![curve]({stem}.png)", "",
        "| step | training min | FD | floor | accuracy |", "| --- | --- | --- | --- | --- |",
        *[f"| {p['step']} | {_minutes(p)} | {p['fd']:.3f} | {p['fd_floor']:.3f} "
          f"| {p['accuracy']:.4f} |" for p in report["curve"]],
    ]
    if report["samplers"]:
        lines += ["", "## Every sampler", "",
                  "| n | sampler | steps | cfg | NFE | seconds | FD | floor | accuracy |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  *[_row(r) + f" {r['fd']:.3f} | {r['fd_floor']:.3f} | {r['accuracy']:.4f} |"
                    for r in report["samplers"]]]
    body = "\n".join(lines) + "\n"
    atomic_write(folder / f"{stem}.md", lambda tmp: tmp.write_text(body))
    print(f"wrote {folder / stem}.md, .json and .png")


def _minutes(point: dict) -> str:
    return "—" if point["train_minutes"] is None else f"{point['train_minutes']:.2f}"


def _row(r: dict) -> str:
    steps = "auto" if r["steps"] is None else r["steps"]
    interval = r.get("cfg_interval")
    cfg = f"{r['cfg_scale']:g}" + ("" if interval is None else f" on σ in ({interval[0]:g}, {interval[1]:g}]")
    return f"| {r['n']} | {r['sampler']} | {steps} | {cfg} | {r['nfe']:g} | {r['seconds']:.1f} |"


if __name__ == "__main__":
    main()
