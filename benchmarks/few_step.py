"""Few-step generation on MNIST: FD and accuracy at 1, 2 and 4 evaluations for each student, beside the
teacher at 10 and 20, with what each student cost to train.

The teacher is the shipped main job, `pretrained:mnist-dit` (a flow DiT on the shipped autoencoder's
latents; `--teacher` takes a checkpoint instead, trained with the mnist-cpu preset when missing). Each
student is a preset of `minidit.run.config`, trained from that teacher on the same latents in its own
process on the CPU, then scored like the main job: `--n` class-balanced samples, the MNIST-classifier
Frechet distance beside its real-vs-real floor at the same n (`minidit.metrics`; not Inception FID) and
the accuracy of a classifier on the conditioned labels.

    method             preset                       what the student learns
    cd                 mnist-cd-cpu                 consistency distillation: Heun steps of the teacher, N = 18 [CM]
    ct                 mnist-ct-cpu                 consistency training from scratch, iCT's recipe [iCT]
    meanflow           mnist-meanflow-cpu           MeanFlow from the teacher's weights, guidance 1.5 trained in
    meanflow-distill   mnist-meanflow-distill-cpu   MeanFlow on the teacher's guided velocity
    progressive        mnist-pd4/pd2/pd1-cpu        progressive distillation, 8 -> 4 -> 2 -> 1 steps, one round
                                                    per student; its k-step row is the round that learnt k
                                                    steps and its cost all rounds up to it [PD]

Students draw with their own sampler and guidance scale 1 (the teacher's guidance is distilled or
trained in); the teacher with its own Heun sampler (5 and 10 steps: 10 and 20 evaluations) and with
Euler (10 and 20 steps), at its guidance 1.5. After every job
the rows go to RESULTS/few_step.{json,md}; a job whose rows are there is not run again, and a student
whose run folder holds a finished run is only scored, so a killed benchmark resumes where it stopped.

    python benchmarks/few_step.py                            # every method (15 CPU-minutes each)
    python benchmarks/few_step.py --methods cd meanflow --threads 2
    python benchmarks/few_step.py --tiny                     # a smoke test: tiny models, 3 steps, 30 samples
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

from minidit.device import cpu_name
from minidit.run import weights
from minidit.run.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STUDENT_STEPS = (1, 2, 4)
TEACHER = "pretrained:mnist-dit"
# the teacher's rows: (method, sampler, sampler steps), 10 and 20 network evaluations each
TEACHER_ROWS = (("teacher-heun", "heun", 5), ("teacher-heun", "heun", 10),
                ("teacher-euler", "euler", 10), ("teacher-euler", "euler", 20))

# method -> [(preset, the sampler steps its checkpoint is scored at)], trained in this order
METHODS: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "cd": [("mnist-cd-cpu", STUDENT_STEPS)],
    "ct": [("mnist-ct-cpu", STUDENT_STEPS)],
    "meanflow": [("mnist-meanflow-cpu", STUDENT_STEPS)],
    "meanflow-distill": [("mnist-meanflow-distill-cpu", STUDENT_STEPS)],
    "progressive": [("mnist-pd4-cpu", (4,)), ("mnist-pd2-cpu", (2,)), ("mnist-pd1-cpu", (1,))],
}
TINY = ["dataset_size=256", "batch_size=8", "log_every=1", "sample_every=0", "checkpoint_every=0",
        "model_overrides.hidden_size=32", "model_overrides.depth=1", "model_overrides.num_heads=2"]

WORKER = r'''
import json, sys
from minidit.cli import config_from_preset
from minidit.run import weights
from minidit.run.build import load_checkpoint, load_shipped
from minidit.run.checkpoint import read_checkpoint
from minidit.run.engine import train
from minidit.run.generate import evaluate_model
job = json.loads(sys.argv[1])
if job["preset"] is not None:  # train (or finish, or find finished) the run, then score its checkpoint
    train(config_from_preset(job["preset"], job["overrides"]), resume=True, progress=False)
if job["checkpoint"].startswith(weights.PREFIX):  # a shipped model: its record says what it cost
    name = job["checkpoint"][len(weights.PREFIX):]
    ema, objective, config = load_shipped(name, "cpu")
    record = weights.entries()[name].record
    cost = {"train_minutes": record["train_minutes"], "train_steps": record["steps"]}
else:
    state = read_checkpoint(job["checkpoint"])  # what the run cost, wherever it was trained
    cost = {"train_minutes": state["elapsed_s"] / 60, "train_steps": state["step"]}
    _, ema, objective, config = load_checkpoint(job["checkpoint"], "cpu")
evals = [evaluate_model(ema, objective, config, job["n"], seed=job["seed"], **sampling) for sampling in job["sampling"]]
json.dump({"cost": cost, "evals": evals}, open(job["result"], "w"))
'''


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    p.add_argument("--teacher", default=TEACHER, help="a shipped model (pretrained:NAME) or a checkpoint, trained "
                   "with the mnist-cpu preset when missing")
    p.add_argument("--minutes", type=float, help="training minutes of each student (default: its preset's; "
                   "progressive: shared by its rounds)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument("--n", type=int, default=1000, help="samples scored per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the students' runs stay (each in "
                   "its preset's folder name)")
    p.add_argument("--tiny", action="store_true", help="a smoke test: tiny models, 3 steps, 30 samples, and "
                   "(unless given) a temporary results and runs folder with a tiny teacher of its own")
    return p.parse_args(argv)


def plan(args) -> list[dict]:
    """The jobs in order: the teacher, then each method's presets, each student taught by the teacher
    (a progressive round by the round before it)."""
    tiny = TINY + ["steps=3", "minutes=none"] if args.tiny else []
    teacher = str(args.teacher)
    trained = teacher.startswith(weights.PREFIX) or Path(teacher).is_file()
    jobs = [{"method": "teacher", "preset": None if trained else "mnist-cpu", "checkpoint": teacher,
             "rows": [(method, steps) for method, _, steps in TEACHER_ROWS],
             "sampling": [{"sampler": sampler, "steps": steps} for _, sampler, steps in TEACHER_ROWS],
             "overrides": [f"out_dir={Path(teacher).parent}", "device=cpu", *tiny]}]
    for method in args.methods or list(METHODS):
        previous = teacher
        rounds = len(METHODS[method])  # progressive distillation shares the minutes among its rounds
        minutes = [f"minutes={args.minutes / rounds:g}"] if args.minutes and not args.tiny else []
        for preset, steps in METHODS[method]:
            out = args.runs_dir / preset
            taught = [f"{teacher_key(preset)}={previous}"] if method != "ct" else []  # CT: the data alone
            jobs.append({"method": method, "preset": preset, "checkpoint": str(out / "latest.pt"),
                         "rows": [(method, k) for k in steps], "sampling": [{"steps": k} for k in steps],
                         "overrides": [f"out_dir={out}", *taught, "device=cpu", *minutes, *tiny]})
            previous = out / "latest.pt"
    return jobs


def teacher_key(preset: str) -> str:
    """The override that names a preset's teacher: a latent student's teacher sits in its inner objective."""
    return "objective.inner.teacher" if PRESETS[preset].objective.get("kind") == "latent" else "objective.teacher"


def _key(method: str, steps: int) -> str:
    """A row's name in RESULTS/few_step.json."""
    return f"{method}|{steps}"


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:  # a folder of its own unless told otherwise, and a tiny teacher in it
            if args.results_dir == RESULTS:
                args.results_dir = Path(tmp) / "results"
            if args.runs_dir == Path("runs"):
                args.runs_dir = Path(tmp) / "runs"
            if args.teacher == TEACHER:
                args.teacher = str(args.runs_dir / "teacher" / "latest.pt")
            args.n = 30 if args.n == 1000 else args.n
        run_jobs(args, Path(tmp))


def run_jobs(args, tmp: Path) -> dict:
    """Run every job not yet in RESULTS/few_step.json; rewrite the results after each."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    store = args.results_dir / "few_step.json"
    done = json.loads(store.read_text()) if store.is_file() else {"rows": {}, "costs": {}}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cost_so_far: dict[str, dict] = {}  # a progressive chain: the cost of its rounds so far
    for job in plan(args):
        method, keys = job["method"], [_key(*row) for row in job["rows"]]
        name = job["preset"] or "teacher"
        if all(k in done["rows"] for k in keys):
            cost_so_far[method] = done["costs"].get(name, cost_so_far.get(method))
            continue
        result = tmp / f"{name}.json"
        spec = {**job, "n": args.n, "seed": args.seed, "result": str(result)}
        print(f"{method}: {'training ' + job['preset'] + ', then ' if job['preset'] else ''}scoring "
              f"{', '.join(str(s['steps']) for s in job['sampling'])} steps", flush=True)
        begin = time.time()
        proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} ({job['preset']}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        out = json.loads(result.read_text())
        cost = out["cost"]
        if method == "progressive" and cost_so_far.get(method):
            previous = cost_so_far[method]  # the rounds before this one
            cost = {k: cost[k] + previous[k] for k in ("train_minutes", "train_steps")}
        cost_so_far[method] = cost
        done["costs"][name] = cost
        for (row_method, _), key, scores in zip(job["rows"], keys, out["evals"]):
            done["rows"][key] = {"method": row_method, "preset": job["preset"] or job["checkpoint"],
                                 "wall_minutes": (time.time() - begin) / 60, **cost, **scores}
        store.write_text(json.dumps(done, indent=2) + "\n")  # after every job: nothing lost when killed
        write_table(done, args)
        write_plot(done, args)
        for key in keys:
            row = done["rows"][key]
            print(f"  {row['sampler']} x {row['steps']} (NFE {row['nfe']:g}): FD {row['fd']:.2f} "
                  f"(floor {row['fd_floor']:.2f}), accuracy {row['accuracy']:.3f}", flush=True)
    write_table(done, args)
    write_plot(done, args)
    return done


def write_table(done: dict, args) -> None:
    """RESULTS/few_step.md: one row per (method, steps), the teacher's first."""
    order = list(dict.fromkeys([m for m, _, _ in TEACHER_ROWS] + list(METHODS)))
    rows = sorted(done["rows"].values(), key=lambda r: (order.index(r["method"]), r["nfe"]))
    lines = ["# Few-step generation on MNIST: consistency models, MeanFlow and distillation", "",
             f"Written by `python benchmarks/few_step.py{' --tiny' if args.tiny else ''} --threads {args.threads}` "
             f"on the CPU ({platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs; torch {torch_version()}). "
             f"The teacher is `{args.teacher}`; each student trains from it on its latents (CT: from the data "
             f"alone) for its preset's budget. n = {args.n} class-balanced samples per row, MNIST-classifier FD "
             "(not Inception FID) beside the real-vs-real floor at the same n; accuracy of a classifier on the "
             "conditioned labels. Train min and steps: the student's run (progressive: all its rounds so far); "
             "the teacher's rows show its own.", "",
             "| method | model | sampler | steps | NFE | FD | floor | FD / floor | accuracy | train min "
             "| train steps | sampling s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        minutes = "-" if r.get("train_minutes") is None else f"{r['train_minutes']:.1f}"
        steps = "-" if r.get("train_steps") is None else str(r["train_steps"])
        lines.append(f"| {r['method']} | {r['preset']} | {r['sampler']} | {r['steps']} | {r['nfe']:g} | "
                     f"{r['fd']:.2f} | {r['fd_floor']:.2f} | {r['fd'] / r['fd_floor']:.2f} | {r['accuracy']:.3f} | "
                     f"{minutes} | {steps} | {r['seconds']:.1f} |")
    (args.results_dir / "few_step.md").write_text("\n".join(lines) + "\n")


def write_plot(done: dict, args) -> None:
    """RESULTS/few_step.png: FD / floor against network evaluations, one line per method."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    methods = list(dict.fromkeys(r["method"] for r in done["rows"].values()))
    for method in methods:
        points = sorted((r["nfe"], r["fd"] / r["fd_floor"]) for r in done["rows"].values() if r["method"] == method)
        ax.plot(*zip(*points), "s--" if method.startswith("teacher") else "o-", label=method)
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample (NFE)", ylabel="FD / floor",
           title=f"few-step generation on MNIST (n {args.n})")
    ax.set_xticks([1, 2, 4, 10, 20], labels=["1", "2", "4", "10", "20"])
    ax.set_yticks([1, 1.5, 2, 3, 4, 6, 8], labels=["1", "1.5", "2", "3", "4", "6", "8"])
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.results_dir / "few_step.png", dpi=90)
    plt.close(fig)


def torch_version() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
