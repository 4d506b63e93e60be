"""The GPU check: throughput, memory and a short real run on one accelerator, in one results file.

Within `--minutes` (default 8; each part is skipped, and says so, when the time left is short):

1. Training throughput of DiT-S/2, B/2 and XL/2 (latent 4×32×32, 256 tokens, 1,000 classes) at
   batch 256 in bf16 autocast, a full step (forward, loss, backward, AdamW), eager and with
   `torch.compile`, beside diffusers' `DiTTransformer2DModel` of the same shape when diffusers is
   installed: images/s, achieved TFLOP/s = 3 · 2 · MACs(forward) · batch / step time, its fraction
   of the chip's dense bf16 peak, and the peak memory of each.
2. Sampling throughput: forward passes of each DiT under `torch.inference_mode` in bf16 at batch
   256, as images · NFE per second.
3. A short `mnist-gpu` run (`--run-minutes` of training, the learning rate annealed within it),
   then 1,000 samples with the preset's sampler: seconds, MNIST-classifier FD beside its floor,
   and accuracy (needs MNIST: `MINIDIT_DATA` or `--data`).

    python benchmarks/gpu_check.py                  # on a GPU: benchmarks/results/gpu_check.{md,json}
    python benchmarks/gpu_check.py --smoke          # CPU, seconds: tiny models, the whole path once

The smoke mode runs the same code with the small `dit-mnist-cpu` model, batch 4, two steps, no
compile, and a three-step run of a two-block DiT on synthetic data; it writes to `--out` (default a
temporary folder) and CI runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from minidit.dit import DIT_CONFIGS, DiTConfig, make_dit
from minidit.flops import count_macs, count_params

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first match of the name wins
PEAK_BF16 = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0),
             ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2)]
PAPER_CONFIGS = ("DiT-S/2", "DiT-B/2", "DiT-XL/2")


class Clock:
    """The time left of the check's budget."""

    def __init__(self, minutes: float):
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def diffusers_dit(c: DiTConfig):
    """diffusers' DiTTransformer2DModel of DiT config `c`, or None when diffusers is not installed."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return None
    return DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth, sample_size=c.input_size,
        patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes, activation_fn="gelu-approximate",
        norm_type="ada_norm_zero")


def _inputs(c: DiTConfig, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, c.num_classes, (batch,), generator=g)
    target = torch.randn(batch, c.out_channels, c.input_size, c.input_size, generator=g)
    return x.to(device), t.to(device), y.to(device), target.to(device)


def _forward(library: str, net, x, t, y):
    if library == "diffusers":
        return net(x, timestep=t, class_labels=y, return_dict=False)[0]
    return net(x, t, y)


def time_training(name: str, library: str, compiled: bool, args, device: torch.device) -> dict:
    """Seconds per full training step (forward, MSE, backward, AdamW) and the peak memory."""
    c = DIT_CONFIGS[name]
    model = make_dit(name) if library == "minidit" else diffusers_dit(c)
    if model is None:
        return {"skipped": "diffusers is not installed (pip install diffusers)"}
    _free(device)
    model = model.to(device).train()
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, t, y, target = _inputs(c, args.batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step():
        with autocast:
            loss = F.mse_loss(_forward(library, net, x, t, y).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    begin = time.perf_counter()
    for _ in range(args.warmup):  # the first steps compile and allocate
        step()
    _sync(device)
    warmup_s = time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - begin) / args.steps
    out = {"params_M": count_params(model) / 1e6, "step_ms": 1e3 * seconds, "images_per_s": args.batch_size / seconds,
           "peak_GiB": _peak_gib(device), "warmup_s": warmup_s}
    del model, net, opt
    _free(device)
    return out


def time_sampling(name: str, args, device: torch.device) -> dict:
    """Forward passes per second under inference mode (bf16 autocast as in training), as images · NFE / s."""
    c = DIT_CONFIGS[name]
    _free(device)
    model = make_dit(name).to(device).eval()
    x, t, y, _ = _inputs(c, args.batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(args.warmup):
            model(x, t, y)
        _sync(device)
        begin = time.perf_counter()
        for _ in range(args.steps):
            model(x, t, y)
        _sync(device)
    seconds = (time.perf_counter() - begin) / args.steps
    out = {"forward_ms": 1e3 * seconds, "images_nfe_per_s": args.batch_size / seconds, "peak_GiB": _peak_gib(device)}
    del model
    _free(device)
    return out


def short_run(args, device: torch.device, folder: Path) -> dict:
    """`mnist-gpu` for `--run-minutes`, then 1,000 samples scored (smoke: a few steps on synthetic data)."""
    from minidit.cli import config_from_preset
    from minidit.run.build import load_checkpoint
    from minidit.run.engine import train
    from minidit.run.generate import evaluate_model, sample_model

    overrides = [f"out_dir={folder}", f"device={device.type}", "sample_every=0"]
    if args.smoke:
        overrides += ["dataset=synthetic", "dataset_size=64", "batch_size=8", "model=dit-mnist-cpu", "steps=3",
                      'model_overrides={"hidden_size": 32, "depth": 2, "num_heads": 2}', "warmup_steps=1",
                      "checkpoint_every=3"]
    elif args.data:
        overrides.append(f"data_root={args.data}")
    config = dataclasses.replace(config_from_preset("mnist-gpu", overrides), minutes=args.run_minutes)
    summary = train(config, progress=not args.no_progress)
    _, ema_model, objective, config = load_checkpoint(summary["checkpoint"], device)
    n = 16 if args.smoke else 1000
    out = {"steps": summary["step"], "train_minutes": summary["elapsed_s"] / 60,
           "images_per_s": summary["images_per_s"], "n": n}
    keys = ("sampler", "steps", "cfg_scale", "nfe", "seconds")
    if args.smoke:  # synthetic data has no feature net: sample only
        drawn = sample_model(ema_model, objective, config, n)
        return {**out, "sample": {k: drawn[k] for k in keys}}
    scores = evaluate_model(ema_model, objective, config, n)
    return {**out, "sample": {k: scores[k] for k in keys}, **{k: scores[k] for k in ("fd", "fd_floor", "accuracy")}}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
    return f"CPU {platform.machine()} {platform.processor()}".strip() + f", {os.cpu_count()} cores"


def run_check(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU, or --smoke to test the script on the CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clock, folder = Clock(args.minutes), Path(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    report = {"device": _device_name(device), "torch": torch.__version__, "batch_size": args.batch_size,
              "bf16": args.bf16, "peak_bf16_tflops": peak, "command": " ".join(["python", *sys.argv]),
              "training": [], "sampling": [], "run": None}
    configs = args.configs or (["dit-mnist-cpu"] if args.smoke else list(PAPER_CONFIGS))
    compiles = [False] if args.smoke else [False, True]
    # 1. training throughput: eager for every size first, then compiled (the slow part) while time lasts
    for compiled in compiles:
        for cfg in configs:
            c = DIT_CONFIGS[cfg]
            macs = count_macs(make_dit(cfg).to("meta"), *(v[:1].to("meta") for v in _inputs(c, 1, device)[:3]))
            for library in ("minidit", "diffusers"):
                row = {"model": cfg, "library": library, "compile": compiled}
                if clock.left() < args.reserve_s + (90 if compiled else 20):
                    row["skipped"] = "out of time"
                else:
                    try:
                        row.update(time_training(cfg, library, compiled, args, device))
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        _free(device)
                if "step_ms" in row:
                    row["tflops"] = 6 * macs * args.batch_size / (row["step_ms"] / 1e3) / 1e12
                    row["of_peak"] = row["tflops"] / peak if peak else None
                report["training"].append(row)
                print(json.dumps(row), flush=True)
    # 2. sampling throughput
    for cfg in configs:
        row = {"model": cfg}
        row.update(time_sampling(cfg, args, device) if clock.left() > args.reserve_s else {"skipped": "out of time"})
        report["sampling"].append(row)
        print(json.dumps(row), flush=True)
    # 3. the short real run, in the time kept for it
    if args.smoke or clock.left() > 60 * args.run_minutes + 60:
        with tempfile.TemporaryDirectory() as run_folder:
            report["run"] = short_run(args, device, Path(run_folder) / "mnist-gpu")
    else:
        report["run"] = {"skipped": f"out of time ({clock.left():.0f} s left)"}
    print(json.dumps(report["run"]), flush=True)
    write_results(report, folder)
    return report


def _cell(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def write_results(report: dict, folder: Path) -> None:
    """gpu_check.json (everything) and gpu_check.md (the tables)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# GPU check: {report['device']}", "",
             f"Written by `{report['command']}` (torch {report['torch']}); batch {report['batch_size']}, "
             f"bf16 autocast {report['bf16']}; peak dense bf16 {_cell(report['peak_bf16_tflops'], '.1f')} TFLOP/s. "
             "TFLOP/s counts 3 × 2 × the forward MACs of minidit's model of that shape.", "",
             "## Training step (forward, loss, backward, AdamW)", "",
             "| model | library | compile | params (M) | ms / step | images / s | TFLOP/s | of peak | peak memory (GiB) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["training"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['library']} | {r['compile']} | {r['skipped']} | | | | | |")
            continue
        of_peak = "—" if r["of_peak"] is None else f"{100 * r['of_peak']:.1f}%"
        lines.append(f"| {r['model']} | {r['library']} | {r['compile']} | {r['params_M']:.1f} | {r['step_ms']:.1f} | "
                     f"{r['images_per_s']:.0f} | {r['tflops']:.1f} | {of_peak} | {_cell(r['peak_GiB'], '.2f')} |")
    lines += ["", "## Sampling (forward passes, inference mode)", "",
              "| model | ms / forward | images · NFE / s | peak memory (GiB) |", "| --- | ---: | ---: | ---: |"]
    for r in report["sampling"]:
        lines.append(f"| {r['model']} | {r['skipped']} | | |" if "skipped" in r else
                     f"| {r['model']} | {r['forward_ms']:.1f} | {r['images_nfe_per_s']:.0f} | {_cell(r['peak_GiB'], '.2f')} |")
    run = report["run"]
    lines += ["", "## A short `mnist-gpu` run", ""]
    if "skipped" in run:
        lines.append(f"Skipped: {run['skipped']}.")
    elif "fd" in run:
        s = run["sample"]
        lines.append(f"{run['steps']} steps in {run['train_minutes']:.2f} min ({_cell(run['images_per_s'], '.0f')} "
                     f"images/s); {run['n']} samples ({s['sampler']}, {s['steps']} steps, cfg {s['cfg_scale']:g}, "
                     f"NFE {s['nfe']:g}) in {s['seconds']:.1f} s: FD {run['fd']:.3f} (real-vs-real floor "
                     f"{run['fd_floor']:.3f}), accuracy {100 * run['accuracy']:.1f}%.")
    else:
        lines.append(f"{run['steps']} steps in {run['train_minutes']:.3f} min; {run['n']} samples in "
                     f"{run['sample']['seconds']:.2f} s (smoke mode: synthetic data, not scored).")
    (folder / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'gpu_check.md'} and .json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, seconds: checks the script itself")
    p.add_argument("--minutes", type=float, default=8.0, help="the whole check's budget")
    p.add_argument("--run-minutes", type=float, default=2.0, help="training time of the mnist-gpu run")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="seconds kept for the mnist-gpu run and scoring (default: run minutes + 1.5 min)")
    p.add_argument("--configs", nargs="+", choices=list(DIT_CONFIGS), help="DiT configs (default S/2, B/2, XL/2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (smoke: 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if not in PEAK_BF16")
    p.add_argument("--data", help="MNIST root (default MINIDIT_DATA or the package's data folder)")
    p.add_argument("--device", help="default cuda (smoke: cpu)")
    p.add_argument("--out", help="results folder (default benchmarks/results; smoke: a temporary folder)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.batch_size = args.batch_size or (4 if smoke else 256)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.steps = args.steps or (2 if smoke else 10)
    args.device = args.device or ("cpu" if smoke else None)
    args.run_minutes = 0.5 if smoke and args.run_minutes == 2.0 else args.run_minutes
    args.reserve_s = args.reserve_s if args.reserve_s is not None else 60 * args.run_minutes + 90
    if smoke:
        args.bf16 = False  # CPU bf16 matmuls are slow and not what the smoke test checks
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.out is None:
        if args.smoke:
            with tempfile.TemporaryDirectory() as tmp:
                args.out = tmp
                return run_check(args)
        args.out = str(Path(__file__).parent / "results")
    return run_check(args)


if __name__ == "__main__":
    main()
