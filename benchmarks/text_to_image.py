"""Text to image on MNIST: the two ways a DiT reads a caption, measured side by side.

Two runs of the preset `mnist-text-cpu`, one reading the caption by cross-attention [PixArt-α]
(the preset) and one by joint attention (`model_overrides={"conditioning": "mmdit"}` [SD3]),
trained for the same minutes on the same machine. For each, at every guidance scale w of the
sweep, samples are drawn for full prompts (`minidit.captions.prompt_grid`: every digit with
every thickness and slant) and for the combinations held out of training (`HELD_OUT`), and scored:

    digit accuracy      the shipped MNIST classifier reads the prompted digit
    thickness, slant    the attribute measured on the sample (`minidit.captions`, the training set's
                        tercile bins) is the prompted one: chance 1/3 for a model that ignores the
                        word; "given the digit" is the share of real training digits of the
                        prompted class that carry the prompted attribute (a model that draws a
                        typical digit of that class scores about this)
    FD                  MNIST-classifier Frechet distance beside its real-vs-real floor (full prompts)

It writes text_to_image.json (every number), .md (the tables) and .png (a grid of prompts).

    python benchmarks/text_to_image.py --runs cross=runs/text-cross mmdit=runs/text-mmdit
    python benchmarks/text_to_image.py --runs cross=A mmdit=B --cfg 1 2 --n 30 --results-dir /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from minidit import data, plotting
from minidit.device import cpu_name
from minidit.captions import HELD_OUT, AttributeBins, caption
from minidit.flops import profile
from minidit.run.build import load_checkpoint
from minidit.run.generate import evaluate_model, sample_model
from minidit.run.outputs import atomic_write, check_folder

# the prompts of the picture: seen combinations, then the held-out ones (digit, thickness, slant class)
GRID_PROMPTS = ((7, 0, 1), (7, 2, 2), (1, 0, 0), (1, 2, 2), (3, 1, 1), (8, 2, 0), *HELD_OUT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                   help="finished runs of mnist-text-cpu (their latest.pt), named")
    p.add_argument("--cfg", nargs="+", type=float, default=[1.0, 1.5, 2.5, 4.0], help="guidance scales swept")
    p.add_argument("--n", type=int, default=450, help="samples scored for full prompts (5 per combination)")
    p.add_argument("--n-held-out", type=int, default=300, help="samples scored for the held-out combinations")
    p.add_argument("--grid-cfg", type=float, help="guidance of the picture (default: each run's own)")
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def given_digit_chance(root=None) -> dict:
    """P(attribute class | digit) on the training set: {"thickness": [10, 3], "slant": [10, 3]}."""
    images, labels = data.load_dataset("mnist", "train", root=root)
    thick, slant = AttributeBins.fit(images).classes(images)
    table = {}
    for name, cls in (("thickness", thick), ("slant", slant)):
        counts = torch.zeros(10, 3, dtype=torch.float64)
        counts.index_put_((labels, cls), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
        table[name] = (counts / counts.sum(1, keepdim=True)).tolist()
    return table


def baseline(prior: dict, combos: list[tuple[int, int, int]]) -> dict:
    """The mean of P(prompted attribute | prompted digit) over prompts `combos`."""
    return {name: sum(prior[name][d][c] for d, c in ((d, w if name == "thickness" else s) for d, w, s in combos))
            / len(combos) for name in ("thickness", "slant")}


def describe_run(run: Path, model, config) -> dict:
    log = [r for r in plotting.read_log(run / "log.jsonl") if "elapsed_s" in r]
    params, macs = profile(model.config)  # what `minidit flops` counts, one image
    return {"conditioning": model.config.conditioning, "params": params, "gmacs": macs / 1e9,
            "steps": log[-1]["step"], "train_minutes": log[-1]["elapsed_s"] / 60,
            "preset_objective": config.objective["inner"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress, results = not args.no_progress, check_folder(args.results_dir)
    begin = time.perf_counter()
    prior = given_digit_chance()
    seen = [(i % 10, (i // 10) % 3, (i // 30) % 3) for i in range(90)]  # what prompt_grid cycles through
    report = {"cfg": args.cfg, "n": args.n, "n_held_out": args.n_held_out, "chance": 1 / 3,
              "given_digit": {"seen": baseline(prior, seen), "held_out": baseline(prior, list(HELD_OUT))},
              "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s), "
                         f"torch {torch.__version__}",
              "runs": {}}
    grids = {}
    for item in args.runs:
        name, folder = item.split("=", 1)
        _, ema, objective, config = load_checkpoint(Path(folder) / "latest.pt")
        row = {"dir": folder, **describe_run(Path(folder), ema, config), "sweep": []}
        for w in args.cfg:
            for held_out, n in ((False, args.n), (True, args.n_held_out)):
                scores = evaluate_model(ema, objective, config, n, cfg_scale=w, held_out=held_out,
                                        seed=args.seed, progress=progress)
                row["sweep"].append({k: v for k, v in scores.items() if isinstance(v, (int, float, bool, type(None)))
                                     or k == "cfg_interval"})
                print(f"{name} cfg {w:g} {'held-out' if held_out else 'seen'}: digit {scores['accuracy']:.3f}, "
                      f"thickness {scores['thickness_accuracy']:.3f}, slant {scores['slant_accuracy']:.3f}, "
                      f"FD {scores['fd']:.2f} (floor {scores['fd_floor']:.2f}), n {n}", flush=True)
        prompts = [caption(*p) for p in GRID_PROMPTS]
        per_row = 8
        drawn = sample_model(ema, objective, config, len(prompts) * per_row, seed=args.seed,
                             prompts=[p for p in prompts for _ in range(per_row)],
                             **({} if args.grid_cfg is None else {"cfg_scale": args.grid_cfg}))
        grids[name] = (prompts, drawn["images"], drawn["cfg_scale"])
        report["runs"][name] = row
    report["wall_min"] = (time.perf_counter() - begin) / 60
    write_results(report, grids, results, argv)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_results(report: dict, grids: dict, folder: Path, argv: list[str] | None) -> None:
    """text_to_image.json, .md and .png (per run: one row of samples per prompt)."""
    atomic_write(folder / "text_to_image.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    command = "python benchmarks/text_to_image.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    g = report["given_digit"]
    lines = ["# Text to image on MNIST: cross-attention against joint attention (MMDiT)", "",
             f"Command: `{command.strip()}`  ", f"Device: {report['machine']}  ",
             f"Wall time of the whole script: {report['wall_min']:.1f} min", "",
             "Each run is `minidit train --preset mnist-text-cpu` (the MMDiT run adds "
             "`'model_overrides={\"conditioning\": \"mmdit\"}'`), trained for the same minutes on the same machine. "
             "Digit accuracy: the shipped MNIST classifier reads the prompted digit. Thickness and slant: the "
             "attribute measured on the sample (`minidit.captions`, the training set's tercile bins) is the "
             f"prompted one; chance {_pct(report['chance'])}, and a model that draws a typical digit of the prompted "
             f"class scores about the 'given the digit' line: thickness {_pct(g['seen']['thickness'])}, slant "
             f"{_pct(g['seen']['slant'])} on full prompts; thickness {_pct(g['held_out']['thickness'])}, slant "
             f"{_pct(g['held_out']['slant'])} on the held-out combinations "
             f"({', '.join(caption(*c) for c in HELD_OUT)}). FD: MNIST-classifier Frechet distance (not Inception "
             "FID) of the full-prompt samples, beside the real-vs-real floor at the same n.", "",
             "## The runs", "",
             "| run | conditioning | params | GMACs / image | training steps | minutes | sampler |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["runs"].items():
        o = r["preset_objective"]
        lines.append(f"| {name} | {r['conditioning']} | {r['params']:,} | {r['gmacs']:.4f} | {r['steps']} | "
                     f"{r['train_minutes']:.1f} | {o['sampler']} x {o['sample_steps']}, guidance on sigma/alpha in "
                     f"{tuple(o.get('cfg_interval') or ())} |")
    for held_out in (False, True):
        n = report["n_held_out"] if held_out else report["n"]
        lines += ["", f"## {'Held-out combinations' if held_out else 'Full prompts, seen combinations'} (n {n} "
                  "per cell)", "",
                  "| run | cfg w | digit | thickness | slant |" + ("" if held_out else " FD (floor) |"),
                  "| --- | --- | --- | --- | --- |" + ("" if held_out else " --- |")]
        for name, r in report["runs"].items():
            for s in r["sweep"]:
                if s["held_out"] != held_out:
                    continue
                fd = "" if held_out else f" {s['fd']:.2f} ({s['fd_floor']:.2f}) |"
                lines.append(f"| {name} | {s['cfg_scale']:g} | {_pct(s['accuracy'])} | {_pct(s['thickness_accuracy'])} "
                             f"| {_pct(s['slant_accuracy'])} |{fd}")
        key = "held_out" if held_out else "seen"
        lines.append(f"| chance / given the digit | | 10.0% | {_pct(report['chance'])} / {_pct(g[key]['thickness'])} "
                     f"| {_pct(report['chance'])} / {_pct(g[key]['slant'])} |" + ("" if held_out else " |"))
    lines += ["", "![prompts](text_to_image.png)", "",
              "One row per prompt (its caption on the left), eight samples each; the last five rows are the "
              "held-out combinations, never seen in training."]
    atomic_write(folder / "text_to_image.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    names = list(grids)
    rows = len(next(iter(grids.values()))[0])
    fig = Figure(figsize=(4.2 * len(names) + 2.2, 0.52 * rows + 0.6))
    for k, name in enumerate(names):
        prompts, images, w = grids[name]
        ax = fig.add_subplot(1, len(names), k + 1)
        ax.imshow(plotting.make_grid(images, nrow=len(images) // rows, padding=2), cmap="gray")
        ax.set_title(f"{name} (cfg {w:g})", fontsize=9)
        ax.set_xticks([])
        step = images.shape[-1] + 2
        ax.set_yticks([2 + step * (i + 0.5) for i in range(rows)],
                      labels=prompts if k == 0 else [""] * rows, fontsize=7)
    fig.tight_layout()
    atomic_write(folder / "text_to_image.png", lambda tmp: fig.savefig(tmp, format="png", dpi=90))


if __name__ == "__main__":
    main()
