"""Latent against pixel diffusion on MNIST, at the same wall-clock training budget on one CPU.

1. Train the autoencoder (`mnist-ae-cpu`, `--ae-minutes`) and score its round trip on `--n`
   training images: PSNR, and the MNIST-classifier FD of the reconstructions beside the floor
   (the FD of those very originals), plus the classifier accuracy of the reconstructions.
2. Train `mnist-latent-cpu` (the DiT on its 4x7x7 latents) and `mnist-flow-cpu` (the same DiT on
   28x28 pixels) for `--minutes` each, with the same recipe (rectified flow, batch 32, EMA).
3. For each, report training images/s (the latent one includes encoding every batch), and draw
   `--n` class-balanced samples with the preset's sampler (Euler x 10, CFG 1.5), timed (the
   latent one includes decoding), scored by FD (beside its floor) and accuracy.

Results go to RESULTS/latent_vs_pixel.{md,json,png}.

Usage:
    python benchmarks/latent_vs_pixel.py --minutes 8 --ae-minutes 3     # what results/ holds
    python benchmarks/latent_vs_pixel.py --minutes 0.2 --ae-minutes 0.2 --n 100 --results-dir /tmp/r
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

from minidit import plotting
from minidit.autoencoder import evaluate_reconstructions
from minidit.run.build import load_checkpoint
from minidit.run.config import PRESETS
from minidit.run.engine import train
from minidit.run.generate import evaluate_model, sample_model
from minidit.run.outputs import atomic_write, check_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--minutes", type=float, default=8.0, help="training time of each diffusion model")
    p.add_argument("--ae-minutes", type=float, default=3.0, help="training time of the autoencoder")
    p.add_argument("--n", type=int, default=1000, help="samples (and reconstructions) scored")
    p.add_argument("--out-dir", default="runs/latent-vs-pixel", help="where the three runs go")
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(config, progress: bool) -> dict:
    """Train `config` (on the CPU) and return its throughput over the whole run: images over the
    time of the optimiser steps (sample grids and checkpoints, which the loop logs apart, excluded)."""
    summary = train(config, progress=progress)
    records, last, images, seconds = plotting.read_log(Path(config.out_dir) / "log.jsonl"), 0, 0, 0.0
    for r in records:
        images += (r["step"] - last) * config.batch_size
        seconds += (r["step"] - last) * config.batch_size / r["images_per_s"]
        last = r["step"]
    return {"train_steps": summary["step"], "train_s": summary["elapsed_s"], "images": images,
            "images_per_s": images / seconds, "final_loss": summary["loss"],
            "params": sum(p.numel() for p in summary["model"].parameters())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress, out = not args.no_progress, Path(args.out_dir)
    results = check_folder(args.results_dir)
    common = {"device": "cpu", "seed": args.seed}  # the presets' recipes; the clock stops each run
    begin = time.perf_counter()
    report = {"minutes": args.minutes, "ae_minutes": args.ae_minutes, "n": args.n,
              "machine": f"{platform.machine()} {platform.processor()}".strip() + f", {os.cpu_count()} CPUs, "
                         f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}"}
    # 1. the autoencoder and its round trip
    ae_config = dataclasses.replace(PRESETS["mnist-ae-cpu"], **common, minutes=args.ae_minutes,
                                    out_dir=str(out / "ae"))
    report["autoencoder"] = run(ae_config, progress)
    _, ae, _, _ = load_checkpoint(out / "ae" / "latest.pt")
    recon = evaluate_reconstructions(ae, "mnist", args.n, progress=progress)
    report["autoencoder"].update({k: v for k, v in recon.items() if k not in ("images", "reconstructions")})
    # 2. the same DiT recipe on latents and on pixels, for the same training time
    latent = PRESETS["mnist-latent-cpu"]
    configs = {"latent": dataclasses.replace(latent, **common, minutes=args.minutes, out_dir=str(out / "latent"),
                                             objective={**latent.objective, "autoencoder": str(out / "ae/latest.pt")}),
               "pixel": dataclasses.replace(PRESETS["mnist-flow-cpu"], **common, minutes=args.minutes,
                                            out_dir=str(out / "pixel"))}
    grids = {"reconstructions": torch.cat([recon["images"][:50], recon["reconstructions"][:50]])}
    for name, config in configs.items():
        row = run(config, progress)
        _, ema, objective, config = load_checkpoint(out / name / "latest.pt")
        row.update(evaluate_model(ema, objective, config, args.n, seed=args.seed, progress=progress))
        if name == "latent":
            row["scaling_factor"] = config.objective["scaling_factor"]
        report[name] = row
        grids[name] = sample_model(ema, objective, config, 100, seed=args.seed)["images"]
    report["wall_min"] = (time.perf_counter() - begin) / 60
    write_results(report, grids, results, argv)
    return report


def write_results(report: dict, grids: dict, folder: Path, argv: list[str] | None) -> None:
    """latent_vs_pixel.json (every number), .md (the tables), .png (the grids side by side)."""
    text = json.dumps(report, indent=2)
    atomic_write(folder / "latent_vs_pixel.json", lambda tmp: tmp.write_text(text))
    fig = Figure(figsize=(15, 5.4))
    titles = {"pixel": "pixel DiT (mnist-flow-cpu)", "latent": "latent DiT (mnist-latent-cpu)",
              "reconstructions": "autoencoder: originals (top 5 rows), reconstructions"}
    for i, (name, images) in enumerate(grids.items()):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(plotting.make_grid(images, nrow=10), cmap="gray")
        ax.set_title(titles[name], fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(folder / "latent_vs_pixel.png", lambda tmp: fig.savefig(tmp, dpi=90))
    cmd = "python benchmarks/latent_vs_pixel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    ae, lat, pix = report["autoencoder"], report["latent"], report["pixel"]
    fd = lambda r: "n/a" if r["fd"] is None else f"{r['fd']:.3f}"  # noqa: E731
    lines = [
        f"# Latent vs pixel diffusion on MNIST, {report['minutes']:g} minutes of training each", "",
        f"Command: `{cmd.strip()}`  ",
        f"Device: {report['machine']}  ",
        f"Wall time of the whole script: {report['wall_min']:.1f} min", "",
        "FD is the MNIST-classifier Frechet distance (not Inception FID); the floor is real MNIST train "
        f"images against the test reference at the same n = {report['n']}.", "",
        f"## Autoencoder (`mnist-ae-cpu`, {report['ae_minutes']:g} min): 1x28x28 -> 4x7x7", "",
        "| params | steps | images/s | PSNR (dB) | FD of reconstructions | floor (originals) | accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {ae['params']:,} | {ae['train_steps']} | {ae['images_per_s']:.0f} | {ae['psnr']:.2f} | {fd(ae)} | "
        f"{ae['fd_floor']:.3f} | {ae['accuracy']:.4f} |", "",
        f"Latent scaling factor s = 1/std(z) = {lat['scaling_factor']:.4f}.", "",
        "## Diffusion in latent space against pixel space, same DiT recipe and training time", "",
        "| model | space | params | steps | train images/s | sampler | NFE | sampling s (n) | FD | floor | accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in (("mnist-flow-cpu", pix), ("mnist-latent-cpu", lat)):
        space = "1x28x28, patch 4, 49 tokens" if r is pix else "4x7x7, patch 1, 49 tokens"
        lines.append(f"| {name} | {space} | {r['params']:,} | {r['train_steps']} | {r['images_per_s']:.0f} | "
                     f"{r['sampler']} x {r['steps']}, cfg "
                     f"{r['cfg_scale']:g} | {r['nfe']:g} | {r['seconds']:.1f} ({r['n']}) | {r['fd']:.3f} | "
                     f"{r['fd_floor']:.3f} | {r['accuracy']:.4f} |")
    lines += ["", "Training images/s of the latent model include encoding each batch with the frozen encoder; "
              "its sampling time includes decoding.", "", "![samples](latent_vs_pixel.png)", ""]
    atomic_write(folder / "latent_vs_pixel.md", lambda tmp: tmp.write_text("\n".join(lines)))


if __name__ == "__main__":
    main()
