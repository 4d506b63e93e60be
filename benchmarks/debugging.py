"""My loss is low but my samples are noise: each check of docs/debugging.md, demonstrated.

A training loss cannot see most of what breaks samples: the loss of a good network is the same
whatever the sampler does with its output. So every check here takes a good trained model (by
default the shipped `mnist-dit`, a flow-matching DiT on the latents of `mnist-ae`, sampled with
its own sampler, steps and guidance), makes one mistake, and scores the samples with the mistake
beside the samples done right, from the same start noise and the same labels:

    quality: accuracy A, FD F (floor R), n N          (`minidit.metrics.quality_line`)

The results go to benchmarks/results/debugging.md, one snippet section per check, which
docs/debugging.md quotes.

    python benchmarks/debugging.py [--model mnist-dit] [--n 100] [--out benchmarks/results/debugging.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import time
from pathlib import Path

import torch

from minidit.data import load_mnist
from minidit.denoiser import KINDS
from minidit.grids import uniform_grid
from minidit.guidance import guided
from minidit.metrics import evaluate_samples, quality_line
from minidit.run import pretrained
from minidit.run.build import make_model
from minidit.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]


class Demo:
    """A good shipped model, one fixed batch of start noise and labels, and the scored runs so far."""

    def __init__(self, name: str, n: int, seed: int = 0):
        self.name = name
        self.net, self.objective, self.config = pretrained.load(name)
        self.inner = self.objective.inner_objective  # the diffusion objective on the latents
        self.n = n
        self.labels = torch.arange(n) % 10  # [n]: the same number of each class
        self.noise = torch.randn((n, *self.objective.load().latent_shape),
                                 generator=torch.Generator().manual_seed(seed))  # [n, c, h, w] ~ N(0, I)
        self.sections: list[tuple[str, str, list[tuple[str, str]]]] = []

    def own(self) -> str:
        i = self.inner
        return (f"{i.sampler} x {i.sample_steps}, guidance {i.cfg_scale} on sigma/alpha in "
                f"({i.cfg_interval[0]:g}, {i.cfg_interval[1]:g}]")

    def score(self, images: torch.Tensor) -> str:
        return quality_line(evaluate_samples(images.clamp(-1, 1), self.labels, n=self.n, progress=False))

    @torch.no_grad()
    def draw(self, den=None, steps: int | None = None, cfg_scale: float | None = None, interval="default",
             grid: torch.Tensor | None = None) -> torch.Tensor | str:
        """Images [n, 1, 28, 28]: the model's own sampler and settings unless told otherwise (or, where
        the sampler stopped at a NaN, the sentence that says so)."""
        inner = self.inner
        den = inner.denoiser(self.net) if den is None else den
        steps = inner.sample_steps if steps is None else steps
        cfg_scale = inner.cfg_scale if cfg_scale is None else cfg_scale
        interval = inner.cfg_interval if interval == "default" else interval
        grid = inner.grid(inner.default_grid(inner.sampler), steps, den.process) if grid is None else grid
        bound = guided(den, self.labels, cfg_scale, inner.null_label, interval if cfg_scale != 1.0 else None)
        x = self.noise * den.process.prior_std(float(grid[0]))  # the start: N(0, prior_std^2 I)
        try:
            z0 = SAMPLERS[inner.sampler](bound, x, grid, generator=torch.Generator().manual_seed(1))
        except ValueError as err:  # the samplers refuse to go on once the network's output is not finite
            if "NaN or inf" not in str(err):
                raise
            return f"no samples: {err}"
        return self.objective.decode(z0)

    def check(self, key: str, title: str, runs: list[tuple[str, torch.Tensor | str]]) -> None:
        """Score each (setting, images or a line already scored) and keep them for the report."""
        lines = []
        for setting, images in runs:
            line = images if isinstance(images, str) else self.score(images)
            lines.append((setting, line))
            print(f"[{key}] {setting:64s} {line}", flush=True)
        self.sections.append((key, title, lines))


def run_checks(demo: Demo) -> None:
    inner, net = demo.inner, demo.net
    good = demo.score(samples := demo.draw())
    fixed = f"right: the model's own settings ({demo.own()})"
    den = inner.denoiser(net)

    # 1. data range: a pipeline in [0, 1] read as [-1, 1] (here: good samples mapped to [0, 1])
    x, _ = load_mnist("test")
    u = (x + 1) / 2  # what ToTensor() gives without Normalize: [0, 1]
    demo.check("range", "Data range: [0, 1] images read as [-1, 1]", [
        (f"mistake: samples in [0, 1] (data mean {float(u.mean()):.2f}, std {float(u.std()):.2f})", (samples + 1) / 2),
        (f"right: samples in [-1, 1] (data mean {float(x.mean()):.2f}, std {float(x.std()):.2f})", good),
    ])

    # 2. prediction kind: the network's output read as another kind
    others = [k for k in ("eps", "x0", "v", "velocity") if k != den.prediction and k in KINDS][:2]
    demo.check("prediction", f"Prediction kind: a {den.prediction} network read as another kind", [
        (f"mistake: output read as {kind}", demo.draw(dataclasses.replace(den, prediction=kind))) for kind in others
    ] + [(f"right: read as {den.prediction}, as trained", good)])

    # 3. time convention: the network reads time_scale * t + time_shift
    trained_time = f"{den.time_scale:g} t" + (f" {den.time_shift:+g}" if den.time_shift else "")
    demo.check("time", "Time convention: the network fed t in [0, 1] instead of what it was trained on", [
        ("mistake: the network reads t in [0, 1]", demo.draw(dataclasses.replace(den, time_scale=1.0, time_shift=0.0))),
        (f"right: it reads {trained_time}, as trained", good),
    ])

    # 4. EMA weights that have not left their initialisation
    torch.manual_seed(0)
    init = make_model(demo.config).state_dict()  # a random initialisation
    trained = net.state_dict()

    def blend(keep_init: float) -> torch.nn.Module:
        model = make_model(demo.config)
        model.load_state_dict({k: keep_init * init[k] + (1 - keep_init) * v for k, v in trained.items()})
        return model.eval().requires_grad_(False)

    decay, n_updates = 0.9999, 100
    no_warmup = decay**n_updates  # the initialisation's share of the EMA after n updates
    warmup = math.prod(min(decay, (1 + k) / (10 + k)) for k in range(n_updates))  # minidit.ema's warm-up
    demo.check("ema", "EMA weights evaluated before they have left the initialisation", [
        (f"mistake: EMA decay {decay} without warm-up, {n_updates} updates ({no_warmup:.2f} init)",
         demo.draw(inner.denoiser(blend(no_warmup)))),
        (f"right: warm-up decay min(d, (1+n)/(10+n)) ({warmup:.0e} init)", demo.draw(inner.denoiser(blend(warmup)))),
    ])

    # 5. train mode: label dropout (the DiT's only random layer) stays on
    net.train()
    train_mode = demo.draw()
    net.eval()
    demo.check("train_mode", "Train mode: label dropout left on while sampling", [
        ("mistake: model.train() while sampling", train_mode),
        ("right: model.eval()", good),
    ])

    # 6. too few steps for the sampler
    demo.check("steps", "Too few steps for the sampler", [
        (f"mistake: {inner.sampler} with {steps} step{'s' * (steps > 1)}", demo.draw(steps=steps))
        for steps in (1, 2) if steps < inner.sample_steps
    ] + [(fixed, good)])

    # 7. guidance scale
    demo.check("guidance", "Guidance scale", [
        ("mistake: scale 0 (unconditional: the labels are ignored)", demo.draw(cfg_scale=0.0, interval=None)),
        ("mistake: scale 6 at every step", demo.draw(cfg_scale=6.0, interval=None)),
        (fixed, good),
    ])

    # 8. clipping x0 to [-1, 1] on latents, which have no such range
    z = demo.objective.encode(x[:1000], torch.Generator().manual_seed(0))
    outside = float((z.abs() > 1).float().mean())
    demo.check("clip", "Clipping the predicted x0 of a latent model to [-1, 1]", [
        (f"mistake: clip_x0=True ({outside:.0%} of real latents lie outside [-1, 1])",
         demo.draw(dataclasses.replace(den, clip_x0=True))),
        ("right: no clipping in latent space", good),
    ])

    # 9. signal leak: start from pure noise where alpha^2/(alpha^2 + sigma^2), DDPM's alpha_bar, is 0.1
    process = den.process
    t_leak = float(process.t_from_log_snr(math.log(0.1 / 0.9)))  # SNR = alpha_bar / (1 - alpha_bar)
    own_grid = inner.grid(inner.default_grid(inner.sampler), inner.sample_steps, process)
    leak_grid = uniform_grid(process, inner.sample_steps, t_start=t_leak, t_end=float(own_grid[-1]))

    def alpha_bar(t: float) -> float:
        a, s = float(process.alpha(torch.tensor(t))), float(process.sigma(torch.tensor(t)))
        return a * a / (a * a + s * s)

    demo.check("leak", "Signal leak: sampling starts from pure noise where the signal is not gone", [
        (f"mistake: start at t = {t_leak:.2f}, alpha_bar {alpha_bar(t_leak):.2f}", demo.draw(grid=leak_grid)),
        (f"right: start at t = {float(own_grid[0]):.2f}, alpha_bar {alpha_bar(float(own_grid[0])):.1e}", good),
    ])


def write(demo: Demo, out: Path, seconds: float, command: str) -> None:
    threads = torch.get_num_threads()
    device = f"CPU ({platform.machine()}, {threads} torch thread{'s' * (threads > 1)})"
    text = ["# Debugging checks, demonstrated\n", "<!-- --8<-- [start:header] -->",
            f"Written by `{command}` on the {device} in {seconds / 60:.1f} min. Each check makes one mistake "
            f"with the shipped `{demo.name}` ({demo.inner.kind} objective, {demo.inner.denoiser(demo.net).prediction} "
            f"prediction, on the latents of `mnist-ae`; its own sampler: {demo.own()}) and scores {demo.n} samples "
            f"of ten classes, drawn from the same start noise, against the MNIST test set.",
            "<!-- --8<-- [end:header] -->\n"]
    for key, title, lines in demo.sections:
        text.append(f"<!-- --8<-- [start:{key}] -->")
        text.append(f"| {title} | quality |\n|---|---|")
        text += [f"| {setting} | {line.removeprefix('quality: ')} |" for setting, line in lines]
        text.append(f"<!-- --8<-- [end:{key}] -->\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-dit", help="a shipped class-conditional latent model")
    parser.add_argument("--n", type=int, default=100, help="samples per setting")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "debugging.md")
    args = parser.parse_args()
    tic = time.perf_counter()
    demo = Demo(args.model, args.n)
    run_checks(demo)
    command = " ".join(["python benchmarks/debugging.py", *([f"--model {args.model}"] if args.model != "mnist-dit" else []),
                        *([f"--n {args.n}"] if args.n != 100 else [])])
    write(demo, args.out, time.perf_counter() - tic, command)


if __name__ == "__main__":
    main()
