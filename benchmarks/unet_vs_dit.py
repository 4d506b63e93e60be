"""The U-Net beside the DiT on MNIST: which backbone wins at equal GMACs, for equal steps and equal CPU time?

The DiT paper's claim is that the U-Net's inductive bias is not crucial: scaled by Gflops, a
transformer matches and beats ADM's U-Net [DiT, Sec. 1, 5]. Here pairs of backbones matched in
forward GMACs per image (`minidit.flops`, within ~10%) are trained on MNIST with one recipe, the
`mnist-flow-cpu` preset (rectified flow, batch 32, AdamW 2e-3, warm-up + cosine, EMA), twice:

    same steps:  both for --steps optimiser steps   equal training compute, 3 x GMACs x images [DiT, Sec. 5]
    same time:   both for --minutes of training     equal CPU time: the faster kernels see more images

GMACs count multiply-adds, not time: a 3 x 3 convolution on a 28 x 28 map and a matrix product of
49 tokens run at different speeds on a CPU, so the two budgets can disagree. The learning rate's
cosine follows whichever budget ends a run (`minidit.run.budget`), and a same-time run's EMA decay
is rescaled so that it averages over the same fraction of the run as a same-steps run's does.

Each run trains in its own process with --threads torch threads, then draws --n class-balanced
samples with the preset's sampler (Euler x 10, guidance 1.5), scored by
`minidit.run.generate.evaluate_model`: the MNIST-classifier Frechet distance beside its real-vs-real
floor at the same n, and the accuracy of a classifier on the conditioned labels. Rows accumulate in
RESULTS/unet_vs_dit.json, one per (size, backbone, budget, threads, n, seed), rewritten after each
run: a killed comparison skips the rows it has and resumes a killed training run from its checkpoint
in RUNS/. RESULTS/unet_vs_dit.{md,png} show FD and accuracy against training compute and minutes.

Usage:
    python benchmarks/unet_vs_dit.py --steps 1500 --minutes 5 --n 500     # the committed comparison
    python benchmarks/unet_vs_dit.py --sizes S M L --threads 2             # add the large pair
    python benchmarks/unet_vs_dit.py --tiny                                # smoke test (about a minute), in /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.figure import Figure

from minidit.run.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TINY_DIR = Path(tempfile.gettempdir()) / "minidit-unet-vs-dit"
RECIPE = PRESETS["mnist-flow-cpu"]
TIME_RUN_STEPS = 1_000_000  # the step cap of a same-time run: its minutes end it first

# size: (the DiT's overrides of dit-mnist-cpu, the U-Net config), matched in forward GMACs per image
PAIRS: dict[str, tuple[dict, str]] = {
    "S": ({"hidden_size": 64, "depth": 4, "num_heads": 4}, "unet-mnist-s"),  # 0.011 and 0.012 GMACs
    "M": ({}, "unet-mnist-cpu"),  # 0.062 and 0.059 GMACs
    "L": ({"hidden_size": 192, "depth": 8, "num_heads": 12}, "unet-mnist-l"),  # 0.183 and 0.190 GMACs
}

WORKER = r'''
import json, sys, torch
from minidit.cli import config_from_preset
from minidit.device import cpu_name
from minidit.flops import count_macs, count_params
from minidit.run.build import load_checkpoint, make_model
from minidit.run.engine import train
from minidit.run.generate import evaluate_model
result, threads, n, seed, *overrides = sys.argv[1:]
torch.set_num_threads(int(threads))
config = config_from_preset("mnist-flow-cpu", [*overrides, f"seed={seed}", "sample_every=0", "device=cpu"])
summary = train(config, resume=True, progress=False)
_, ema, objective, config = load_checkpoint(summary["checkpoint"], "cpu")
scores = evaluate_model(ema, objective, config, int(n), seed=int(seed))
with torch.device("meta"):
    net = make_model(config).eval()
    macs = count_macs(net, torch.empty(1, 1, 28, 28), torch.zeros(1), torch.zeros(1, dtype=torch.long))
row = {"params": count_params(net), "gmacs": macs / 1e9, "step": summary["step"],
       "train_minutes": summary["elapsed_s"] / 60, "loss": summary["loss"], "threads": torch.get_num_threads(),
       "batch_size": config.batch_size,
       "images_per_s": summary["step"] * config.batch_size / max(summary["elapsed_s"], 1e-9), **scores}
open(result, "w").write(json.dumps(row))
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes", nargs="+", choices=list(PAIRS), help="matched pairs (default: S M)")
    p.add_argument("--steps", type=int, help="optimiser steps of the same-steps runs (default 1500)")
    p.add_argument("--minutes", type=float, help="training minutes of the same-time runs (default 5)")
    p.add_argument("--n", type=int, help="samples scored per run; the floor uses the same n (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, help=f"default {RESULTS} ({TINY_DIR} with --tiny)")
    p.add_argument("--runs-dir", type=Path, help="one folder per run (default runs/unet-vs-dit, in /tmp with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a smoke test: pair S, 20 steps, 0.1 min, n = 50, in /tmp")
    args = p.parse_args(argv)
    # defaults, smaller under --tiny; a value given on the command line always wins
    tiny = {"sizes": ["S"], "steps": 20, "minutes": 0.1, "n": 50, "results_dir": TINY_DIR,
            "runs_dir": TINY_DIR / "runs"}
    full = {"sizes": ["S", "M"], "steps": 1500, "minutes": 5.0, "n": 500, "results_dir": RESULTS,
            "runs_dir": Path("runs/unet-vs-dit")}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or not args.minutes > 0 or not 2 <= args.n <= 10_000 or args.threads < 1:
        p.error(f"need steps >= 1, minutes > 0, n in [2, 10000] and threads >= 1, got {args.steps}, "
                f"{args.minutes}, {args.n}, {args.threads}")
    return args


def time_run_ema(steps: int, ema_decay: float = RECIPE.ema_decay) -> float:
    """The EMA decay d' of a same-time run (step cap TIME_RUN_STEPS) that averages over the same
    fraction of its run as d does over a run of `steps` steps. The training budget sets
    d_k = 1 − (1 − d')·cap / K for a run that will make K steps (`minidit.run.budget`), so
    d' = 1 − (1 − d)·steps / cap gives d_k = 1 − (1 − d)·steps / K."""
    return 1 - (1 - ema_decay) * steps / TIME_RUN_STEPS


def plan(args: argparse.Namespace) -> list[dict]:
    """Every run of the comparison: per size, the same-steps pair, then the same-time pair."""
    runs = []
    for size in args.sizes:
        dit_overrides, unet = PAIRS[size]
        described = ", ".join(f"{k}={v}" for k, v in dit_overrides.items())
        models = {"DiT": ("dit-mnist-cpu" + (f" ({described})" if described else ""),
                          ["model=dit-mnist-cpu", f"model_overrides={json.dumps(dit_overrides)}"]),
                  "U-Net": (unet, [f"model={unet}", "model_overrides={}"])}
        # the cosine learning rate follows whichever budget ends the run; the EMA is rescaled to match
        budgets = {f"{args.steps} steps": [f"steps={args.steps}", "minutes=None"],
                   f"{args.minutes:g} min": [f"steps={TIME_RUN_STEPS}", f"minutes={args.minutes}",
                                             f"ema_decay={time_run_ema(args.steps)!r}"]}
        for (budget, budget_args), mode in zip(budgets.items(), ("same steps", "same time")):
            for backbone, (model, model_args) in models.items():
                run = f"{size}|{backbone}|{budget}|{args.threads}t|seed{args.seed}"  # a new n re-scores it
                folder = run.replace("|", "-").replace(" ", "").replace("U-Net", "unet").lower()
                group = f"{size}|{budget}|{args.threads}t|seed{args.seed}|n{args.n}"  # the two rows compared
                runs.append({"key": f"{run}|n{args.n}", "group": group, "size": size, "backbone": backbone,
                             "model": model, "mode": mode,
                             "budget": budget, "run_dir": str(args.runs_dir / folder),
                             "overrides": [*model_args, *budget_args, f"out_dir={args.runs_dir / folder}"]})
    return runs


def machine(threads: int) -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), its core count, threads and torch."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {threads} torch thread(s) per run"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    store = args.results_dir / "unet_vs_dit.json"
    report = json.loads(store.read_text()) if store.is_file() else {"rows": {}}
    report.update(machine=machine(args.threads),
                  command="python benchmarks/unet_vs_dit.py " + " ".join(sys.argv[1:] if argv is None else argv))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs, failed = plan(args), []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(runs, 1):
            name = f"[{i}/{len(runs)}] {run['key']}"
            if run["key"] in report["rows"]:
                print(f"{name}: done before, skipped", flush=True)
                continue
            # 1. train and score in a fresh process: its own threads, nothing shared with the last run
            result, log, begin = Path(tmp) / "row.json", Path(tmp) / "run.log", time.time()
            cmd = [sys.executable, "-c", WORKER, str(result), str(args.threads), str(args.n), str(args.seed),
                   *run["overrides"]]
            with open(log, "w") as out:
                rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"{name} failed (exit {rc}):\n{log.read_text()[-3000:]}", flush=True)
                failed.append(run["key"])
                continue
            # 2. the row, kept at once: a killed comparison loses at most the run under way
            row = {**{k: run[k] for k in ("group", "size", "backbone", "model", "mode", "budget", "run_dir")},
                   **json.loads(result.read_text()), "wall_minutes": (time.time() - begin) / 60}
            row["images"] = row["step"] * row["batch_size"]
            row["train_gmacs"] = 3 * row["gmacs"] * row["images"]  # forward + backward ~ 3 forwards
            report["rows"][run["key"]] = row
            write_results(report, args.results_dir)
            print(f"{name}: {row['params'] / 1e6:.2f} M params, {row['gmacs']:.4f} GMACs, {row['step']} steps in "
                  f"{row['train_minutes']:.1f} min: FD {row['fd']:.2f} (floor {row['fd_floor']:.2f}), "
                  f"accuracy {row['accuracy']:.3f}", flush=True)
    write_results(report, args.results_dir)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}")
    return report


def verdicts(rows: list[dict]) -> list[str]:
    """One line per pair of runs compared (a size and a budget, both backbones scored): who has the
    lower FD and the higher accuracy."""
    lines = []
    for group in dict.fromkeys(r["group"] for r in rows):
        pair = {r["backbone"]: r for r in rows if r["group"] == group}
        if len(pair) == 2:
            dit, unet = pair["DiT"], pair["U-Net"]
            fd_win = "DiT" if dit["fd"] < unet["fd"] else "U-Net"
            acc_win = "DiT" if dit["accuracy"] > unet["accuracy"] else "U-Net"
            lines.append(f"- **{dit['size']}, {dit['mode']}** ({dit['budget']}): lower FD: **{fd_win}** "
                         f"({dit['fd']:.2f} DiT vs {unet['fd']:.2f} U-Net); higher accuracy: **{acc_win}** "
                         f"({dit['accuracy']:.3f} vs {unet['accuracy']:.3f}); steps {dit['step']} vs {unet['step']}, "
                         f"training GMACs {dit['train_gmacs']:.3g} vs {unet['train_gmacs']:.3g}")
    return lines


def _write(path: Path, write) -> None:
    """`write(tmp)`, then rename tmp over `path`: a kill mid-write leaves the old file whole."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_results(report: dict, folder: Path) -> None:
    """unet_vs_dit.json (every number), .md (the table and who wins) and .png (the plot)."""
    text = json.dumps(report, indent=2) + "\n"
    _write(folder / "unet_vs_dit.json", lambda tmp: tmp.write_text(text))
    rows = sorted(report["rows"].values(), key=lambda r: (list(PAIRS).index(r["size"]), r["mode"], r["backbone"]))
    if not rows:
        return
    _write(folder / "unet_vs_dit.png", lambda tmp: plot(rows).savefig(tmp, dpi=100))
    lines = [
        "# The U-Net beside the DiT on MNIST, at matched GMACs", "",
        f"Command: `{report['command'].strip()}`  ",
        f"Device: {report['machine']}", "",
        "Each pair is matched in forward GMACs per image (`minidit flops`); both train with the `mnist-flow-cpu` "
        "recipe (rectified flow, batch 32, lr 2e-3, warm-up + cosine over the budget, EMA), for the same "
        "steps (equal training compute) and for the same minutes (equal CPU time), and are sampled with "
        "Euler x 10 steps, guidance 1.5. FD: the MNIST-classifier Frechet distance of n samples (not "
        "Inception FID) beside the real-vs-real floor at the same n; accuracy: a classifier's on the "
        "conditioned labels. Training compute = 3 x GMACs x images seen [DiT, Sec. 5].", "",
        "## Who wins", "", *verdicts(rows), "",
        "What this cannot show: one seed per run, short CPU budgets far from convergence, 28 x 28 digits "
        "rather than 256 x 256 ImageNet latents, and GMACs that cost different times on a CPU (convolutions "
        "against matrix products), so a small gap says little and the ranking may change with scale, "
        "training length and hardware.", "",
        "![FD and accuracy against training compute](unet_vs_dit.png)", "",
        "| size | backbone | model | budget | params (M) | GMACs/image | steps | training GMACs | train min "
        "| images/s | final loss | FD | floor | FD / floor | accuracy |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {r['size']} | {r['backbone']} | {r['model']} | {r['mode']}: {r['budget']} | {r['params'] / 1e6:.3f} "
          f"| {r['gmacs']:.4f} | {r['step']} | {r['train_gmacs']:.3g} | {r['train_minutes']:.1f} "
          f"| {r['images_per_s']:.0f} | " + ("-" if r.get("loss") is None else f"{r['loss']:.4f}")
          + f" | {r['fd']:.2f} | {r['fd_floor']:.2f} | {r['fd'] / r['fd_floor']:.2f} | {r['accuracy']:.3f} |"
          for r in rows],
    ]
    _write(folder / "unet_vs_dit.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def plot(rows: list[dict]) -> Figure:
    """FD against training compute and against training minutes, accuracy against training compute:
    colour = backbone, marker = size, filled = same steps, open = same time."""
    fig = Figure(figsize=(14, 4.2))
    axes = fig.subplots(1, 3)
    colours, markers = {"DiT": "C0", "U-Net": "C1"}, {"S": "o", "M": "s", "L": "^"}
    panels = ((axes[0], "train_gmacs", "fd", "training compute (GMACs)", "MNIST-classifier FD"),
              (axes[1], "train_gmacs", "accuracy", "training compute (GMACs)", "accuracy on the labels"),
              (axes[2], "train_minutes", "fd", "training time (CPU minutes)", "MNIST-classifier FD"))
    for ax, x_key, y_key, x_label, y_label in panels:
        for r in rows:
            filled = r["mode"] == "same steps"
            ax.scatter(r[x_key], r[y_key], s=60, marker=markers[r["size"]], edgecolors=colours[r["backbone"]],
                       facecolors=colours[r["backbone"]] if filled else "none", linewidths=1.5)
            ax.annotate(f"{r['size']}, {r['budget']}", (r[x_key], r[y_key]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        if y_key == "fd":
            ax.axhline(min(r["fd_floor"] for r in rows), color="k", ls="--", lw=1, label="real-vs-real floor")
            ax.set_yscale("log")
        ax.set(xscale="log", xlabel=x_label, ylabel=y_label)
    handles = [axes[0].scatter([], [], color=c, marker="o", label=b) for b, c in colours.items()]
    handles += [axes[0].scatter([], [], color="gray", marker=markers[s], label=f"size {s}")
                for s in dict.fromkeys(r["size"] for r in rows)]
    handles += [axes[0].scatter([], [], facecolors="gray", edgecolors="gray", label="same steps"),
                axes[0].scatter([], [], facecolors="none", edgecolors="gray", label="same time")]
    axes[0].legend(handles=[*handles, *axes[0].get_lines()], fontsize=7)
    axes[0].set_title(f"FD, n = {rows[0]['n']}")
    axes[1].set_title("accuracy")
    axes[2].set_title("FD against CPU time")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
