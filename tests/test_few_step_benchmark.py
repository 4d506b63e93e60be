"""benchmarks/few_step.py: the job plan, the results table, and the whole benchmark in its tiny mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from minidit.run.config import PRESETS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "few_step.py"


@pytest.fixture(scope="module")
def few_step():
    spec = importlib.util.spec_from_file_location("few_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_plan_teaches_every_student_and_chains_the_rounds(few_step, tmp_path):
    args = few_step.parse_args(["--teacher", str(tmp_path / "t" / "latest.pt"), "--runs-dir", str(tmp_path / "r"),
                                "--minutes", "6"])
    jobs = few_step.plan(args)
    assert jobs[0]["method"] == "teacher" and jobs[0]["preset"] == "mnist-cpu"  # missing: trained first
    assert [s["steps"] for s in jobs[0]["sampling"]] == [5, 10, 10, 20]  # Heun 5, 10 and Euler 10, 20: NFE 10, 20
    presets = [j["preset"] for j in jobs[1:]]
    assert all(p in PRESETS for p in presets) and len(presets) == 7
    teacher_of = {j["preset"]: next((o.split("=", 1)[1] for o in j["overrides"] if ".teacher=" in o), None)
                  for j in jobs[1:]}
    assert teacher_of["mnist-cd-cpu"] == str(tmp_path / "t" / "latest.pt")
    assert teacher_of["mnist-ct-cpu"] is None  # consistency training learns from the data alone
    assert teacher_of["mnist-pd2-cpu"] == str(tmp_path / "r" / "mnist-pd4-cpu" / "latest.pt")
    minutes = {j["preset"]: [o for o in j["overrides"] if o.startswith("minutes=")] for j in jobs[1:]}
    assert minutes["mnist-cd-cpu"] == ["minutes=6"] and minutes["mnist-pd1-cpu"] == ["minutes=2"]
    assert [j["rows"] for j in jobs if j["method"] == "progressive"] == [
        [("progressive", 4)], [("progressive", 2)], [("progressive", 1)]]


def test_plan_names_the_teacher_where_the_preset_reads_it(few_step, tmp_path):
    """The MNIST students are latent objectives around their own: the override reaches the inner one,
    and the config it makes is the preset's with that teacher."""
    from minidit.cli import config_from_preset
    args = few_step.parse_args(["--runs-dir", str(tmp_path)])
    jobs = {j["preset"]: j for j in few_step.plan(args)}
    assert jobs[None]["checkpoint"] == "pretrained:mnist-dit"  # the shipped teacher: nothing to train
    config = config_from_preset("mnist-cd-cpu", jobs["mnist-cd-cpu"]["overrides"])
    assert config.objective["kind"] == "latent" and config.objective["inner"]["teacher"] == "pretrained:mnist-dit"
    assert "teacher" not in config.objective  # not beside the inner objective
    config = config_from_preset("mnist-pd1-cpu", jobs["mnist-pd1-cpu"]["overrides"])
    assert config.objective["inner"]["teacher"] == str(tmp_path / "mnist-pd2-cpu" / "latest.pt")


def test_table_lists_every_row(few_step, tmp_path):
    args = few_step.parse_args(["--results-dir", str(tmp_path)])
    row = dict(fd=10.0, fd_floor=2.0, accuracy=0.9, nfe=1, seconds=0.5, train_minutes=15.0, train_steps=3000)
    done = {"rows": {"cd|1": {"method": "cd", "preset": "mnist-cd-cpu", "sampler": "consistency", "steps": 1, **row},
                     "teacher-euler|10": {"method": "teacher-euler", "preset": "pretrained:mnist-dit",
                                          "sampler": "euler", "steps": 10, **row, "nfe": 10}}, "costs": {}}
    few_step.write_table(done, args)
    lines = (tmp_path / "few_step.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert table[0].startswith("| teacher-euler | pretrained:mnist-dit | euler | 10 | 10 |")
    assert table[1].startswith("| cd | mnist-cd-cpu | consistency | 1 | 1 | 10.00 | 2.00 | 5.00 | 0.900 | 15.0 | 3000")


@pytest.mark.slow
def test_tiny_benchmark_scores_the_teacher_and_students_and_resumes(few_step, tmp_path, mnist_root, monkeypatch,
                                                                     capsys):
    # every method's preset trains and samples in test_fewstep.py; here the benchmark itself runs end to end
    # on one distilled student and on the chain of progressive rounds
    monkeypatch.setenv("MINIDIT_DATA", str(mnist_root))
    argv = ["--tiny", "--methods", "cd", "progressive", "--results-dir", str(tmp_path / "results"),
            "--runs-dir", str(tmp_path / "runs")]
    few_step.main(argv)
    done = json.loads((tmp_path / "results" / "few_step.json").read_text())
    expected = {"teacher-heun|5", "teacher-heun|10", "teacher-euler|10", "teacher-euler|20",
                "progressive|4", "progressive|2", "progressive|1", "cd|1", "cd|2", "cd|4"}
    assert set(done["rows"]) == expected
    for key, row in done["rows"].items():
        nfe = 2 * row["steps"] if row["sampler"] == "heun" else row["steps"]
        assert row["nfe"] == nfe and row["fd"] > 0 and 0 <= row["accuracy"] <= 1, key
    rounds = [done["rows"][f"progressive|{k}"]["train_steps"] for k in (4, 2, 1)]
    assert rounds == [3, 6, 9]  # the cost of a round includes the rounds before it
    assert (tmp_path / "results" / "few_step.md").is_file() and (tmp_path / "results" / "few_step.png").is_file()
    assert "scoring" in capsys.readouterr().out
    # a second call finds every row done and runs nothing
    few_step.main(argv)
    assert "scoring" not in capsys.readouterr().out
    assert json.loads((tmp_path / "results" / "few_step.json").read_text()) == done
