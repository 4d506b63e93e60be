"""Same seed, same grid, same samples: every sampler of this minidit against an older minidit.

The redesign of the joint between networks and samplers (one denoiser, one sampler signature,
grids apart from solvers) must not change what the samplers draw. This script runs the older
minidit (a git ref of this repository, checked out into a temporary worktree and run in a
subprocess) and this one side by side on the same inputs, and prints the largest difference
per sampler:

  * exact denoisers in float64 (a Gaussian mixture on the VP, sub-VP, VE and flow processes;
    DDPM's table with an exact ε-model) driven by every sampler with the same seeds;
  * real checkpoints written by the older minidit (a flow, an SDE and a DDPM model; tiny
    networks on random 8x8 images), sampled through `minidit sample`'s code path.

    python benchmarks/sampler_equivalence.py --old-ref 1400e39 [--out benchmarks/results/sampler_equivalence.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MEANS = [[-2.0, 0.0], [1.5, 1.0], [0.5, -1.5]]
WEIGHTS, STDS = [0.3, 0.5, 0.2], [0.5, 0.3, 0.4]
N, STEPS = 256, 12
OLD_CONTINUOUS = ["euler_maruyama", "reverse_diffusion", "langevin", "pc", "ode_euler", "ode_heun", "ode_rk45",
                  "edm", "dpm_solver++"]

# ----------------------------------------------------------------------------------------
# The older minidit, run in a subprocess: writes its samples to a .pt file
# ----------------------------------------------------------------------------------------

OLD_SCRIPT = r'''
import sys, torch
from minidit import samplers, flow
from minidit.sde import VPSDE, SubVPSDE, VESDE
from minidit.denoisers import mixture_denoiser
from minidit.toy import GaussianMixture
from minidit.ddpm import GaussianDiffusion
from minidit.ddim import ddim_sample
from minidit.schedules import make_schedule
from minidit.commands import make_sampler, draw, class_labels
from minidit.checkpoint import load_checkpoint
cfg = eval(sys.argv[2]); out = {}
mix = GaussianMixture(torch.tensor(cfg["WEIGHTS"]), torch.tensor(cfg["MEANS"]), torch.tensor(cfg["STDS"])).to(dtype=torch.float64)
x1 = torch.randn(cfg["N"], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
for pname, proc in [("vp", VPSDE()), ("subvp", SubVPSDE()), ("ve", VESDE())]:
    for name in cfg["OLD_CONTINUOUS"]:
        kw = {} if name == "ode_rk45" else {"steps": cfg["STEPS"]}
        start = {"shape": (cfg["N"], 2)} if name == "edm" else {"x_init": x1 * proc.prior_std()}  # prior_std = σ(1) there
        out[f"{pname}/{name}"] = samplers.sample(name, mixture_denoiser(mix, proc, "eps"), proc, generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64, progress=False, **start, **kw).x
fp = flow.FlowProcess()
for m in ("euler", "heun", "rk45"):
    kw = {} if m == "rk45" else {"steps": cfg["STEPS"]}
    out[f"flow/{m}"] = flow.flow_sample(mixture_denoiser(mix, fp, "velocity"), x_init=x1, method=m, dtype=torch.float64,
                                        progress=False, **kw).x
for name in ("edm", "dpm_solver++"):
    start = {"shape": (cfg["N"], 2)} if name == "edm" else {"x_init": x1}
    out[f"flow/{name}"] = samplers.sample(name, mixture_denoiser(mix, fp, "velocity"), fp, steps=cfg["STEPS"], dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(1), progress=False, **start).x
s = make_schedule("cosine", 100); d = GaussianDiffusion(s)
vp_table = VPSDE()
class Exact(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))  # the samplers' dtype
    def forward(self, x, t):
        ab = s.alpha_bar[t.round().long()]
        tt = vp_table.t_from_log_snr((ab / (1 - ab)).log())
        return mixture_denoiser(mix, vp_table, "eps").fn(x, tt)
out["table/ddpm"] = d.sample(Exact(), (cfg["N"], 2), x_T=x1, generator=torch.Generator().manual_seed(2), progress=False)
out["table/ddim"] = ddim_sample(d, Exact(), (cfg["N"], 2), steps=cfg["STEPS"], x_T=x1, progress=False)
out["table/ddim_eta"] = ddim_sample(d, Exact(), (cfg["N"], 2), steps=cfg["STEPS"], eta=0.7, x_T=x1,
                                     generator=torch.Generator().manual_seed(3), progress=False)
for kind, ckpt in cfg["CKPTS"].items():
    _, ema, objective, config = load_checkpoint(ckpt)
    names = ["ddim", "ddpm", "ode_heun", "edm", "dpm_solver++", "euler_maruyama"] if kind.startswith("ddpm") else (
        ["euler", "heun", "rk45", "edm", "dpm_solver++"] if kind == "flow" else ["ode_heun", "pc", "edm", "dpm_solver++", "ode_rk45"])
    for name in names:
        steps = None if name in ("ddpm", "rk45", "ode_rk45") else 6
        sampler = make_sampler(objective, ema, name, steps)
        out[f"ckpt-{kind}/{name}"] = draw(sampler, class_labels(20, 10), (1, 8, 8), batch_size=8, seed=4)["images"]
torch.save(out, sys.argv[1])
'''


def old_samples(ref: str, ckpts: dict, work: Path) -> dict:
    """Check out `ref` into a worktree and run OLD_SCRIPT there."""
    tree = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    try:
        cfg = {"MEANS": MEANS, "WEIGHTS": WEIGHTS, "STDS": STDS, "N": N, "STEPS": STEPS,
               "OLD_CONTINUOUS": OLD_CONTINUOUS, "CKPTS": ckpts}
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, "-c", OLD_SCRIPT, str(work / "old.pt"), repr(cfg)], check=True, env=env,
                       cwd=work)
        return torch.load(work / "old.pt")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def old_checkpoints(ref: str, work: Path) -> dict:
    """Tiny runs trained by the older minidit: a flow, an SDE and two DDPM models."""
    tree = work / "old-train"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    tiny = ["model=mlp", "dataset=synthetic", "dataset_size=64", "batch_size=16", "model_overrides.hidden=16",
            "log_every=5", "sample_every=0", "checkpoint_every=0", "lr=1e-3"]
    objectives = {"flow": '{"kind": "flow", "sample_steps": 4, "cfg_scale": 1.5}',
                  "sde": '{"kind": "sde", "sample_steps": 4}',
                  "ddpm-linear": '{"kind": "ddpm", "T": 50, "sample_steps": 4}',
                  "ddpm-cosine": '{"kind": "ddpm", "T": 50, "schedule": "cosine", "prediction": "v", "sample_steps": 4}'}
    ckpts = {}
    try:
        for kind, objective in objectives.items():
            out = work / kind
            code = ("import sys; from minidit.cli import main; sys.exit(main(sys.argv[1:]))")
            subprocess.run([sys.executable, "-c", code, "train", "--preset", "mnist-cpu", "--out", str(out), "--steps",
                            "10", "--device", "cpu", "--eval-n", "0", "--grid-n", "10", "--no-progress", *tiny,
                            f"objective={objective}"], check=True, env={**os.environ, "PYTHONPATH": str(tree)},
                           capture_output=True, cwd=work)  # not the checkout: python -c puts the cwd first
                                                           # on sys.path, ahead of PYTHONPATH
            ckpts[kind] = str(out / "latest.pt")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return ckpts


# ----------------------------------------------------------------------------------------
# This minidit, on the same inputs
# ----------------------------------------------------------------------------------------


def new_samples(ckpts: dict) -> dict:
    from minidit import grids
    from minidit.ddim import sample_ddim
    from minidit.ddpm import sample_ddpm
    from minidit.denoiser import Denoiser
    from minidit.edm import EDMProcess
    from minidit.flow import FlowProcess
    from minidit.run.build import load_checkpoint
    from minidit.run.generate import class_labels, draw
    from minidit.samplers import SAMPLERS
    from minidit.schedules import make_schedule
    from minidit.sde import VESDE, VPSDE, SubVPSDE
    from minidit.toy import GaussianMixture, mixture_denoiser

    mix = GaussianMixture(torch.tensor(WEIGHTS), torch.tensor(MEANS), torch.tensor(STDS)).to(dtype=torch.float64)
    x1 = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {}
    for pname, proc in [("vp", VPSDE()), ("subvp", SubVPSDE()), ("ve", VESDE())]:
        den = mixture_denoiser(mix, proc, "eps")
        for name in OLD_CONTINUOUS:
            g = torch.Generator().manual_seed(1)
            if name == "edm":
                edm = den.on(EDMProcess())
                grid = grids.karras_grid(edm.process, STEPS, span=proc)
                x = edm.process.prior_noise((N, 2), float(grid[0]), g, dtype=torch.float64)
                out[f"{pname}/{name}"] = SAMPLERS["heun"](edm, x, grid, generator=g)
                continue
            grid = (grids.log_snr_grid if name == "dpm_solver++" else grids.uniform_grid)(proc, STEPS)
            solver = SAMPLERS[name.removeprefix("ode_")]
            x_init = x1 * float(proc.sigma(torch.tensor(1.0, dtype=torch.float64)))  # the older prior, N(0, σ(1)²)
            out[f"{pname}/{name}"] = solver(den, x_init, grid, generator=g)
    fp = FlowProcess()
    den = mixture_denoiser(mix, fp, "velocity")
    for m in ("euler", "heun", "rk45"):
        out[f"flow/{m}"] = SAMPLERS[m](den, x1, grids.uniform_grid(fp, STEPS, t_end=0.0))
    edm = den.on(EDMProcess())
    grid = grids.karras_grid(edm.process, STEPS, span=fp)
    g = torch.Generator().manual_seed(1)
    out["flow/edm"] = SAMPLERS["heun"](edm, edm.process.prior_noise((N, 2), float(grid[0]), g, dtype=torch.float64),
                                       grid, generator=g)
    out["flow/dpm_solver++"] = SAMPLERS["dpm_solver++"](den, x1, grids.log_snr_grid(fp, STEPS))
    s = make_schedule("cosine", 100)
    exact = mixture_denoiser(mix, VPSDE(), "eps")

    def table_eps(x, tau):  # the same exact ε at the table's integer steps
        ab = s.alpha_bar[tau.round().long()]
        return exact.network(x, VPSDE().t_from_log_snr((ab / (1 - ab)).log()))

    den = Denoiser(table_eps, "eps", s.process, time_scale=100, time_shift=-1.0)
    out["table/ddpm"] = sample_ddpm(den, x1, grids.ddpm_grid(100), generator=torch.Generator().manual_seed(2))
    out["table/ddim"] = sample_ddim(den, x1, grids.ddpm_grid(100, STEPS))
    out["table/ddim_eta"] = sample_ddim(den, x1, grids.ddpm_grid(100, STEPS), eta=0.7,
                                        generator=torch.Generator().manual_seed(3))
    for kind, ckpt in ckpts.items():
        _, ema, objective, config = load_checkpoint(ckpt)
        names = ["ddim", "ddpm", "ode_heun", "edm", "dpm_solver++", "euler_maruyama"] if kind.startswith("ddpm") else (
            ["euler", "heun", "rk45", "edm", "dpm_solver++"] if kind == "flow" else
            ["ode_heun", "pc", "edm", "dpm_solver++", "ode_rk45"])
        for name in names:
            steps = None if name in ("ddpm", "rk45", "ode_rk45") else 6
            sampler = objective.make_sampler(ema, name, steps)
            out[f"ckpt-{kind}/{name}"] = draw(sampler, class_labels(20, 10), (1, 8, 8), batch_size=8, seed=4)["images"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-ref", required=True, help="a git ref of this repository before the redesign")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sampler_equivalence.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpts = old_checkpoints(args.old_ref, work)
        old = old_samples(args.old_ref, ckpts, work)
        new = new_samples(ckpts)
    rows = []
    for key in old:
        diff = float((old[key].double() - new[key].double()).abs().max())
        scale = float(old[key].double().abs().max())
        rows.append((key, diff, scale))
        print(f"{key:32s} max |old − new| = {diff:.3g}  (max |x| = {scale:.3g})")
    lines = ["# Sampler equivalence: this minidit against " + args.old_ref, "",
             "Written by `python benchmarks/sampler_equivalence.py --old-ref " + args.old_ref + "` on the CPU "
             f"(torch {torch.__version__}). Each row draws with the same seed and grid before and after the "
             "redesign; exact denoisers run in float64, checkpoints (tiny MLPs written by the older "
             "minidit) in float32.", "", "| case | max abs difference | max abs value |", "|---|---|---|"]
    lines += [f"| {k} | {d:.3g} | {s:.3g} |" for k, d, s in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps({"cases": len(rows), "largest": max(d for _, d, _ in rows)}))


if __name__ == "__main__":
    main()
