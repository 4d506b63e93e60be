"""The DiT scaling study at MNIST scale: does sample quality track forward GMACs?

Peebles and Xie train 12 DiTs (sizes S, B, L, XL x patch sizes 8, 4, 2) for the same 400K
steps and find that FID falls as the forward cost of the network grows, whether the GMACs
come from a wider and deeper model or from more tokens [DiT, Sec. 5, Table 4, Fig. 6, 8, 9]:

    L          = (H / P)^2                                tokens of an H x H image, patch P
    GMACs      ~ N [L (12 D^2 + 2 L D) + 6 D^2] / 1e9     forward pass, depth N, width D
    compute    = 3 x GMACs x batch size x steps           training GMACs (backward ~ 2 forward)

Here a grid of small DiTs (`--sizes`, default XS 32x2, S 64x4, M 128x6, head width 16) x
patch sizes 7, 4, 2 (16, 49 and 196 tokens of a 28 x 28 digit) is trained with one recipe,
the `mnist-flow-cpu` preset (rectified flow, batch 32, AdamW 2e-3, warm-up + cosine, EMA), for the
same number of steps: `--steps`, or as many as fit `--minutes` for the whole grid, measured by
timing a few steps of every model first. Each model is scored with `--n` class-balanced samples
(the preset's Euler x 10 sampler with guidance 1.5): the MNIST-classifier Frechet distance beside
its real-vs-real floor at the same n (`minidit.metrics`; not Inception FID) and the accuracy of a
classifier on the conditioned labels. After every model, RESULTS/scaling.{json,md,png} are
rewritten; a second run with the same arguments skips the models already scored and resumes
a model whose training was killed from its last checkpoint (runs/scaling/<model>/latest.pt).

Usage:
    python benchmarks/scaling.py --minutes 30 --n 500                 # the committed study
    python benchmarks/scaling.py --steps 20 --n 50 --sizes XS S --patches 7 4 --results-dir /tmp/r
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from minidit.run.generate import evaluate_model
from minidit.run.outputs import atomic_write, check_folder
from minidit.device import cpu_name, get_device
from minidit.dit import DIT_CONFIGS, DiTConfig
from minidit.flops import PAPER_TABLE4, profile
from minidit.run.build import make_model, make_objective
from minidit.run.config import PRESETS, TrainConfig
from minidit.run.engine import train

SIDE, CHANNELS, CLASSES = 28, 1, 10  # MNIST
SIZES = {"XS": (32, 2, 2), "S": (64, 4, 4), "M": (128, 6, 8), "L": (192, 8, 12)}  # name: (D, N, heads)
PATCHES = (7, 4, 2)  # the patch sizes that divide 28 (besides 1, 14 and 28)
# FID-50K of the paper's 12 models at 400K steps without guidance [DiT, Table 4]
PAPER_FID = {
    "DiT-S/8": 153.60, "DiT-S/4": 100.41, "DiT-S/2": 68.40, "DiT-B/8": 122.74, "DiT-B/4": 68.38,
    "DiT-B/2": 43.47, "DiT-L/8": 118.87, "DiT-L/4": 45.64, "DiT-L/2": 23.33, "DiT-XL/8": 106.41,
    "DiT-XL/4": 43.01, "DiT-XL/2": 19.47,
}  # fmt: skip


@dataclass(frozen=True)
class GridPoint:
    """One model of the grid: a size (width D, depth N, heads) and a patch size P."""

    size: str
    width: int
    depth: int
    heads: int
    patch: int

    @property
    def name(self) -> str:
        return f"{self.size}/{self.patch}"

    @property
    def tokens(self) -> int:
        return (SIDE // self.patch) ** 2  # L = (H / P)^2

    def overrides(self) -> dict:
        """`TrainConfig.model_overrides` of this point (on top of the dit-mnist-cpu preset)."""
        return {"hidden_size": self.width, "depth": self.depth, "num_heads": self.heads, "patch_size": self.patch}

    def dit_config(self) -> DiTConfig:
        """The DiTConfig that `minidit.run.build.make_model` builds for MNIST with these overrides."""
        return replace(DIT_CONFIGS["dit-mnist-cpu"], in_channels=CHANNELS, input_size=SIDE,
                       num_classes=CLASSES, learn_sigma=False, **self.overrides())


def build_grid(sizes: list[str], patches: list[int]) -> list[GridPoint]:
    """Every size x patch pair, cheapest patch first within a size."""
    if bad := [s for s in sizes if s not in SIZES]:
        raise ValueError(f"unknown sizes {bad}; valid sizes: {list(SIZES)}")
    if bad := [p for p in patches if p < 1 or SIDE % p]:
        raise ValueError(f"patches {bad} do not divide {SIDE}; valid patch sizes: 1, 2, 4, 7, 14, 28")
    return [GridPoint(s, *SIZES[s], p) for s in sizes for p in sorted(set(patches), reverse=True)]


def training_compute(gmacs: float, steps: int, batch_size: int) -> float:
    """Training GMACs = 3 x forward GMACs x images seen [DiT, Sec. 5]."""
    return 3.0 * gmacs * steps * batch_size


def eval_seconds(step_s: float, n: int, sample_steps: int, batch_size: int) -> float:
    """Estimated time to draw n guided samples: 2 x sample_steps forwards per sample (the
    guided pair), one forward ~ 1/3 of a training step per image."""
    return step_s * 2 * sample_steps * n / (3 * batch_size)


def plan_steps(step_s: list[float], eval_s: list[float], budget_s: float, multiple: int = 50) -> int:
    """The largest multiple of `multiple` steps per model for which training and scoring the
    whole grid fits `budget_s`, keeping a 10% margin for checkpoints and data loading."""
    steps = (0.9 * budget_s - sum(eval_s)) / sum(step_s)
    if steps < multiple:
        raise ValueError(f"minutes too small: the grid needs {sum(eval_s) / 60:.1f} min to score and "
                         f"{sum(step_s) * multiple / 60:.1f} min per {multiple} steps; raise --minutes "
                         f"or drop sizes or patches")
    return int(steps // multiple * multiple)


def time_step(config: TrainConfig, repeats: int = 3) -> float:
    """Seconds of one training step of `config`'s model (after one warm-up step)."""
    device = get_device(config.device)
    model, objective = make_model(config).to(device), make_objective(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    gen = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(config.batch_size, CHANNELS, SIDE, SIDE, device=device)
    y = torch.arange(config.batch_size, device=device) % CLASSES
    for i in range(repeats + 1):
        if i == 1:
            begin = time.perf_counter()
        loss, _ = objective.loss(model, x0, y, gen)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - begin) / repeats


def final_loss(run_dir: Path) -> float | None:
    """The last logged training loss of a run (the mean over its last `log_every` steps)."""
    log = Path(run_dir) / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    losses = [r["loss"] for r in records if r.get("event") == "train"]
    return losses[-1] if losses else None


def machine() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), core count and torch version."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--minutes", type=float, default=30.0, help="time budget of the whole grid")
    p.add_argument("--steps", type=int, help="training steps of every model (default: fit --minutes)")
    p.add_argument("--sizes", nargs="+", default=["XS", "S", "M"], help=f"of {list(SIZES)}")
    p.add_argument("--patches", type=int, nargs="+", default=list(PATCHES))
    p.add_argument("--n", type=int, default=500, help="samples scored per model (the floor uses the same n)")
    p.add_argument("--preset", default="mnist-flow-cpu", help="the training recipe (a minidit.run.config preset)")
    p.add_argument("--out-dir", default="runs/scaling", help="checkpoints, one folder per model")
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--fresh", action="store_true", help="ignore the results of an earlier run")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"steps must be a positive int, got {args.steps}")
    if not 2 <= args.n <= 10_000:
        raise ValueError(f"n must be in [2, 10000], got {args.n}")
    pixel_dits = [k for k, v in PRESETS.items() if v.dataset == "mnist" and v.model in DIT_CONFIGS
                  and v.objective.get("kind") not in ("autoencoder", "latent")]
    if args.preset not in pixel_dits:
        raise ValueError(f"preset must be a pixel-space MNIST DiT preset, one of {pixel_dits}, got {args.preset!r}")
    grid, results_dir = build_grid(args.sizes, args.patches), check_folder(args.results_dir)
    base = replace(PRESETS[args.preset], minutes=None, sample_every=0, checkpoint_every=250, n_samples=10,
                   seed=args.seed, device=args.device)
    device, progress = get_device(base.device), not args.no_progress
    recipe = {"preset": args.preset, "objective": base.objective, "batch_size": base.batch_size, "lr": base.lr,
              "warmup_steps": base.warmup_steps, "ema_decay": base.ema_decay, "seed": args.seed, "n": args.n,
              "grid": [p.name for p in grid]}
    json_path = results_dir / "scaling.json"
    old = {} if args.fresh or not json_path.is_file() else json.loads(json_path.read_text())
    same = old.get("recipe") == recipe and args.steps in (None, old.get("steps"))
    # 1. steps per model: given, kept from the interrupted run, or fitted to the budget
    wall = time.perf_counter()
    if args.steps is not None or same:
        steps, step_s = args.steps or old["steps"], old.get("step_seconds", {}) if same else {}
    else:
        step_s = {}
        for p in grid:
            step_s[p.name] = time_step(replace(base, model_overrides=p.overrides()))
            print(f"timing {p.name}: {1000 * step_s[p.name]:.0f} ms per step", flush=True)
        sample_steps = base.objective.get("sample_steps", 10)
        evals = [eval_seconds(s, args.n, sample_steps, base.batch_size) for s in step_s.values()]
        steps = plan_steps(list(step_s.values()), evals, 60 * args.minutes)
    print(f"{len(grid)} models x {steps} steps of batch {base.batch_size}", flush=True)
    report = {"recipe": recipe, "steps": steps, "step_seconds": step_s, "minutes": args.minutes,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "threads": torch.get_num_threads(),
              "machine": machine(),
              "command": "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": [r for r in old.get("rows", []) if same],
              "wall_minutes": old.get("wall_minutes", 0.0) if same else 0.0,
              "finished": old.get("finished") if same else None}  # when the last row was added
    if old.get("rows") and not same:
        print(f"{json_path} holds a run of another recipe or grid; its rows are replaced", flush=True)
    done = {r["model"] for r in report["rows"]}
    for r in report["rows"]:  # results of an earlier version of this script: read the loss from the log
        r.setdefault("loss", final_loss(Path(args.out_dir) / f"{r['size']}-p{r['patch']}-s{steps}"))
    # 2. train and score each model, rewriting the results after each one
    for i, p in enumerate(grid, 1):
        if p.name in done:
            print(f"[{i}/{len(grid)}] {p.name}: done before, skipped", flush=True)
            continue
        begin = time.perf_counter()
        run_dir = Path(args.out_dir) / f"{p.size}-p{p.patch}-s{steps}"
        config = replace(base, model_overrides=p.overrides(), steps=steps, out_dir=str(run_dir))
        summary = train(config, resume=True, progress=progress)
        scores = evaluate_model(summary["ema_model"], make_objective(config), config, args.n, seed=args.seed,
                                progress=progress)
        params, macs = profile(p.dit_config())
        row = {"model": p.name, **dataclasses.asdict(p), "tokens": p.tokens, "params": params,
               "gmacs": macs / 1e9, "steps": steps, "images": steps * base.batch_size,
               "train_gmacs": training_compute(macs / 1e9, steps, base.batch_size),
               "train_minutes": summary["elapsed_s"] / 60, "loss": final_loss(run_dir),
               "eval_seconds": scores["seconds"],
               **{k: scores[k] for k in ("fd", "fd_floor", "accuracy", "n")}}
        report["rows"].append(row)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        report["wall_minutes"] += (time.perf_counter() - begin) / 60
        write_results(report, results_dir)
        print(f"[{i}/{len(grid)}] {p.name}: {params / 1e6:.2f} M params, {macs / 1e9:.4f} GMACs, "
              f"{row['train_minutes']:.1f} min: FD {row['fd']:.2f} (floor {row['fd_floor']:.2f}), "
              f"accuracy {row['accuracy']:.3f}; {(time.perf_counter() - wall) / 60:.1f} min so far", flush=True)
    write_results(report, results_dir)
    return report


def log_corr(x: list[float], y: list[float]) -> float:
    """Pearson correlation of log x and log y (nan for fewer than 3 points)."""
    return float(np.corrcoef(np.log(x), np.log(y))[0, 1]) if len(x) > 2 else math.nan


def write_results(report: dict, folder: Path) -> None:
    """scaling.json (everything), .md (our grid beside the paper's Table 4) and .png."""
    text = json.dumps(report, indent=2)
    atomic_write(folder / "scaling.json", lambda tmp: tmp.write_text(text))
    rows = report["rows"]
    if not rows:
        return
    atomic_write(folder / "scaling.png", lambda tmp: plot(rows).savefig(tmp, dpi=100))
    paper = [(g, PAPER_FID[k]) for k, (_, g) in PAPER_TABLE4.items()]
    ours = log_corr([r["gmacs"] for r in rows], [r["fd"] for r in rows])
    losses = [(r["gmacs"], r["loss"]) for r in rows if r.get("loss") is not None]
    loss_corr = log_corr(*zip(*losses)) if losses else math.nan
    theirs = log_corr(*zip(*paper))
    lines = [
        f"# DiT scaling at MNIST scale: {len(rows)} models x {report['steps']} steps", "",
        f"Command: `{report['command'].strip()}`  ",
        f"Device: {report['device']} ({report['machine']}), {report['threads']} torch thread(s)  ",
        f"Wall time of the grid: {report['wall_minutes']:.1f} min (budget {report['minutes']:g} min); "
        f"last model finished {report.get('finished')}  ",
        f"Recipe: preset `{report['recipe']['preset']}` (rectified flow, batch {report['recipe']['batch_size']}, "
        f"lr {report['recipe']['lr']:g}, warm-up + cosine over the {report['steps']} steps, EMA "
        f"{report['recipe']['ema_decay']:g}), sampled with Euler x 10 steps, guidance 1.5", "",
        "FD is the MNIST-classifier Frechet distance of n samples against MNIST test images (not Inception "
        "FID); the floor is real train images scored the same way at the same n. GMACs are one forward pass "
        "of one image (`minidit.flops`); training compute = 3 x GMACs x images seen [DiT, Sec. 5].", "",
        f"Correlation of log GMACs with log FD: **{ours:+.2f}** here; {theirs:+.2f} for the paper's Table 4 "
        f"(FID-50K at 400K steps). With the final training loss (the mean of the last 50 steps): "
        f"{loss_corr:+.2f}; the paper's Fig. 13 shows the loss falling with Gflops too.", "",
        "![scaling](scaling.png)", "",
        "| model | width | depth | patch | tokens | params (M) | GMACs/image | training GMACs | train min "
        "| final loss | FD | floor | accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {r['model']} | {r['width']} | {r['depth']} | {r['patch']} | {r['tokens']} | {r['params'] / 1e6:.3f} "
          f"| {r['gmacs']:.4f} | {r['train_gmacs']:.3g} | {r['train_minutes']:.1f} | "
          + ("-" if r.get("loss") is None else f"{r['loss']:.4f}")
          + f" | {r['fd']:.2f} | {r['fd_floor']:.2f} | {r['accuracy']:.3f} |" for r in rows],
        "", "## Beside: the paper's Table 4 (ImageNet 256, latents 32 x 32 x 4, 400K steps, batch 256)", "",
        "| model | tokens | params (M) | Gflops (= GMACs) | training GMACs | FID-50K |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {k} | {(32 // int(k.split('/')[1])) ** 2} | {m} | {g:.2f} | {training_compute(g, 400_000, 256):.3g} "
          f"| {PAPER_FID[k]:.2f} |" for k, (m, g) in PAPER_TABLE4.items()],
    ]
    atomic_write(folder / "scaling.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def plot(rows: list[dict]) -> Figure:
    """FD against GMACs and against training compute (ours), and the paper's FID against Gflops:
    colour = model size, marker = patch size, as in [DiT, Fig. 8, 9]."""
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    colours = {s: f"C{i}" for i, s in enumerate(sizes)}
    markers = {7: "s", 8: "s", 4: "^", 2: "o"}
    for ax, key, label in ((axes[0], "gmacs", "GMACs per image (forward)"),
                           (axes[1], "train_gmacs", "training compute (GMACs)")):
        for r in rows:
            ax.scatter(r[key], r["fd"], color=colours[r["size"]], marker=markers.get(r["patch"], "x"), s=50)
            ax.annotate(r["model"], (r[key], r["fd"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        floor = ax.axhline(np.mean([r["fd_floor"] for r in rows]), color="k", ls="--", lw=1,
                           label="real-vs-real floor")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel=f"MNIST-classifier FD (n={rows[0]['n']})")
    for k, (_, g) in PAPER_TABLE4.items():
        size, patch = k[4:].split("/")
        axes[2].scatter(g, PAPER_FID[k], color=f"C{['S', 'B', 'L', 'XL'].index(size)}",
                        marker=markers[int(patch)], s=50)
        axes[2].annotate(k[4:], (g, PAPER_FID[k]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes[2].set(xscale="log", yscale="log", xlabel="Gflops (= GMACs) per image", ylabel="FID-50K",
                title="paper, ImageNet 256 (Table 4)")
    axes[2].legend(handles=[axes[2].scatter([], [], color=f"C{i}", marker="o", label=f"DiT-{s}")
                            for i, s in enumerate(["S", "B", "L", "XL"])], fontsize=7)
    for ax in axes:  # plain numbers on the log y axes
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    axes[0].set_title(f"MNIST, {rows[0]['steps']} steps each")
    axes[1].set_title("same, against training compute")
    handles = [axes[0].scatter([], [], color=colours[s], marker="o", label=f"size {s}") for s in sizes]
    handles += [axes[0].scatter([], [], color="gray", marker=markers[p], label=f"patch {p}")
                for p in sorted({r["patch"] for r in rows}, reverse=True)]
    axes[0].legend(handles=[*handles, floor], fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
