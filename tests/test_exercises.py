"""The course exercises: checks accept the reference solutions and name the mistakes of wrong
ones; the student-notebook generator stubs solutions out; committed student notebooks are fresh."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from minidit import exercises as ex
from minidit.exercises import assignments
from minidit.exercises import notebooks as nbtools
from minidit.cli import main

from exercise_helpers import fails as _fails

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Reference solutions (the ones in the tutorials) and their classic mistakes


def alpha_bar_from_betas(betas):
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0, t, eps, alpha_bar, sqrt=True, wrap_dims=True):
    ab = alpha_bar[t].to(x0.dtype)  # [B]
    ab = ab.reshape(-1, *([1] * (x0.ndim - 1))) if wrap_dims else ab.reshape(-1, 1, 1, 1)
    return (ab.sqrt() if sqrt else ab) * x0 + (1 - ab).sqrt() * eps


def posterior(x0, xt, t, betas, alpha_bar, wrap=False, forward_var=False):
    shape = (-1, *([1] * (x0.ndim - 1)))
    prev = alpha_bar[t - 1] if wrap else torch.where(t > 0, alpha_bar[(t - 1).clamp_min(0)], 1.0)
    beta, ab, ab_prev = betas[t].reshape(shape), alpha_bar[t].reshape(shape), prev.reshape(shape)
    mean = beta * ab_prev.sqrt() / (1 - ab) * x0 + (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab) * xt
    return mean, beta if forward_var else (1 - ab_prev) / (1 - ab) * beta


def ddpm_loss(model, x0, t, eps, alpha_bar, target="eps", reduce="example"):
    xt = q_sample(x0, t, eps, alpha_bar)
    err = (model(xt, t) - (eps if target == "eps" else x0)).pow(2)
    return err.mean() if reduce == "all" else err.flatten(1).mean(dim=1)


def p_sample_step(model, xt, t, z, betas, alpha_bar, noise_at_0=False, sign=-1.0):
    shape = (-1, *([1] * (xt.ndim - 1)))
    beta, ab = betas[t].reshape(shape), alpha_bar[t].reshape(shape)
    mean = (xt + sign * beta / (1 - ab).sqrt() * model(xt, t)) / (1 - beta).sqrt()
    keep = torch.ones_like(t) if noise_at_0 else (t > 0)
    return mean + keep.reshape(shape) * beta.sqrt() * z


def ddim_step(model, xt, t, t_prev, alpha_bar, wrap=False, direction_now=False):
    ab = alpha_bar[t]
    ab_prev = alpha_bar[t_prev] if (t_prev >= 0 or wrap) else torch.tensor(1.0, dtype=alpha_bar.dtype)
    eps = model(xt, torch.full((xt.shape[0],), t, dtype=torch.long))
    x0 = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
    return ab_prev.sqrt() * x0 + (1 - (ab if direction_now else ab_prev)).sqrt() * eps


# ----------------------------------------------------------------------------------------
# The checks


def test_checks_accept_the_reference_solutions(capsys):
    ex.check_alpha_bar(alpha_bar_from_betas)
    ex.check_q_sample(q_sample)
    ex.check_posterior(posterior)
    ex.check_ddpm_loss(ddpm_loss)
    ex.check_p_sample(p_sample_step)
    ex.check_ddim_step(ddim_step)
    assert capsys.readouterr().out.count("correct") == 6


def test_check_alpha_bar_names_the_mistake():
    _fails(ex.check_alpha_bar, lambda b: torch.cumprod(b, 0), "running product of the β's")
    _fails(ex.check_alpha_bar, lambda b: torch.cat([torch.ones(1, dtype=b.dtype), torch.cumprod(1 - b, 0)[:-1]]),
           "ᾱ_{t−1}")
    _fails(ex.check_alpha_bar, lambda b: torch.cumprod(1 - b, 0)[:-1], "shape (39,)", "expected (40,)")


def test_check_q_sample_names_shape_and_term():
    _fails(ex.check_q_sample, lambda *a: q_sample(*a, sqrt=False), "signal term", "scaled x_0 by ᾱ_t")
    _fails(ex.check_q_sample, lambda x0, t, eps, ab: q_sample(x0, t, eps, ab) - (1 - ab[t]).sqrt().reshape(
        -1, *([1] * (x0.ndim - 1))) * eps + (1 - ab[t]).reshape(-1, *([1] * (x0.ndim - 1))) * eps,
        "noise term", "variance")
    # coefficients shaped for images only: the 2-D toy points get a wrong shape
    _fails(ex.check_q_sample, lambda *a: q_sample(*a, wrap_dims=False), "x0 of shape [16, 2]", "[B, 1, ..., 1]")
    _fails(ex.check_q_sample, lambda x0, t, eps, ab: ab[t].sqrt() * x0, "size of tensor")
    _fails(ex.check_q_sample, lambda x0, t, eps, ab: q_sample(x0, t.clamp_min(1), eps, ab), "at t = 0 (right at t = ")
    _fails(ex.check_q_sample, lambda *a: (_ for _ in ()).throw(NotImplementedError()), "not implemented")


def test_check_posterior_names_the_term_and_timestep():
    _fails(ex.check_posterior, lambda *a: posterior(*a, wrap=True), "x_0 term", "wraps around")
    _fails(ex.check_posterior, lambda *a: posterior(*a, forward_var=True), "variance", "forward variance")
    _fails(ex.check_posterior, lambda *a: posterior(*a)[0], "return a pair")
    _fails(ex.check_posterior, lambda *a: (posterior(*a)[0], posterior(*a)[1].flatten()), "variance has shape")


def test_check_ddpm_loss_names_target_input_and_shape():
    _fails(ex.check_ddpm_loss, lambda *a: ddpm_loss(*a, target="x0"), "regressed x_0")
    _fails(ex.check_ddpm_loss, lambda *a: ddpm_loss(*a, reduce="all"), "shape ()", "one loss per example")
    _fails(ex.check_ddpm_loss, lambda m, x0, t, eps, ab: (m(x0, t) - eps).pow(2).flatten(1).mean(1),
           "you passed x_0")
    _fails(ex.check_ddpm_loss, lambda m, x0, t, eps, ab: (m(q_sample(x0, t, eps, ab), t / 100) - eps).pow(2)
           .flatten(1).mean(1), "integer timesteps")


def test_check_p_sample_names_the_term():
    _fails(ex.check_p_sample, lambda *a: p_sample_step(*a, noise_at_0=True), "noise term", "t = 0")
    _fails(ex.check_p_sample, lambda *a: p_sample_step(*a, sign=1.0), "the mean", "subtract the noise")


def test_check_ddim_step_names_the_term():
    _fails(ex.check_ddim_step, lambda *a: ddim_step(*a, wrap=True), "t' = −1", "wraps around")
    _fails(ex.check_ddim_step, lambda *a: ddim_step(*a, direction_now=True), "direction term")


# ----------------------------------------------------------------------------------------
# The generator and the cleaner


def _notebook(*cells):
    return {"cells": [{"cell_type": kind, "id": f"c{i}", "metadata": meta, "source": src,
                       **({"execution_count": 3, "outputs": [{"output_type": "stream", "name": "stdout",
                                                              "text": "hi\n"}]} if kind == "code" else {})}
                      for i, (kind, src, meta) in enumerate(cells)],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python", "version": "3.11.7"}},
            "nbformat": 4, "nbformat_minor": 5}


SOLUTION_CELL = ("def f(x):\n"
                 "    \"\"\"Doubles.\"\"\"\n"
                 "    ### BEGIN SOLUTION\n"
                 "    y = 2 * x\n"
                 "    return y\n"
                 "    ### END SOLUTION\n"
                 "\n"
                 "print(f)")


def test_strip_solutions_keeps_signature_and_indentation():
    out = nbtools.strip_solutions(SOLUTION_CELL)
    assert out == ("def f(x):\n    \"\"\"Doubles.\"\"\"\n    # YOUR CODE HERE\n    raise NotImplementedError()\n"
                   "\nprint(f)")
    assert nbtools.strip_solutions("### BEGIN SOLUTION\nanswer\n### END SOLUTION", "markdown") == "YOUR ANSWER HERE"
    for bad in ["### BEGIN SOLUTION\nx = 1", "x = 1\n### END SOLUTION", "### BEGIN SOLUTION\n### BEGIN SOLUTION"]:
        with pytest.raises(ValueError, match="SOLUTION"):
            nbtools.strip_solutions(bad)


def test_generate_writes_student_notebooks_and_check_detects_staleness(tmp_path, capsys):
    src = tmp_path / "tutorials"
    src.mkdir()
    badge = "[![Open](x.svg)](https://colab.research.google.com/github/o/r/blob/main/tutorials/01_a.ipynb)"
    nb = _notebook(("markdown", badge, {}), ("code", SOLUTION_CELL, {"nbgrader": {"solution": True},
                                                                    "execution": {"t": 1}, "scrolled": True}))
    (src / "01_a.ipynb").write_text(json.dumps(nb))
    out = src / "student"
    assert main(["exercises", "generate", str(src), "--out", str(out), "--check"]) == 1  # nothing there yet
    assert main(["exercises", "generate", str(src), "--out", str(out)]) == 0
    student = json.loads((out / "01_a.ipynb").read_text())
    code = student["cells"][1]
    assert "".join(code["source"]).count("raise NotImplementedError()") == 1 and "2 * x" not in "".join(code["source"])
    assert code["outputs"] == [] and code["execution_count"] is None
    assert code["metadata"] == {"nbgrader": {"solution": True}}  # run noise dropped, nbgrader kept
    assert "blob/main/tutorials/student/01_a.ipynb" in "".join(student["cells"][0]["source"])
    assert main(["exercises", "generate", str(src), "--out", str(out), "--check"]) == 0
    (out / "99_orphan.ipynb").write_text("{}")  # a student notebook whose source is gone is stale too
    assert main(["exercises", "generate", str(src), "--out", str(out), "--check"]) == 1
    assert "99_orphan" in capsys.readouterr().out


def test_clean_keeps_outputs_drops_noise_and_is_idempotent(tmp_path):
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(_notebook(("code", "print('hi')\nx = 1", {"tags": ["parameters"], "collapsed": 1}))))
    assert main(["exercises", "clean", str(tmp_path), "--check"]) == 1
    assert main(["exercises", "clean", str(path)]) == 0
    nb = json.loads(path.read_text())
    cell = nb["cells"][0]
    assert cell["outputs"][0]["text"] == ["hi\n"] and cell["execution_count"] is None
    assert cell["metadata"] == {"tags": ["parameters"]} and cell["source"] == ["print('hi')\n", "x = 1"]
    assert nb["metadata"]["language_info"] == {"name": "python"}
    assert main(["exercises", "clean", str(path), "--check"]) == 0


def test_committed_notebooks_are_clean_and_student_versions_up_to_date():
    tutorials = REPO / "tutorials"
    notebooks = sorted(tutorials.glob("*.ipynb"))
    assert notebooks, "no tutorial notebooks found"
    assert nbtools.clean(notebooks, check=True) == []
    assert nbtools.generate(tutorials, tutorials / "student", check=True) == [], \
        "run: minidit exercises generate tutorials/ --out tutorials/student/"
    # that every exercise is graded by a locked check cell: tests/test_grading.py


# ----------------------------------------------------------------------------------------
# Notebooks as nbgrader assignments: exercises, their checks, written questions, problems


def _grade(grade_id, points=1):
    return {"nbgrader": {"grade": True, "solution": False, "locked": True, "points": points, "grade_id": grade_id,
                         "schema_version": 3, "task": False}}


def _solution(grade_id):
    return {"nbgrader": {"grade": False, "solution": True, "locked": False, "grade_id": grade_id,
                         "schema_version": 3, "task": False}}


ANSWER = {"nbgrader": {"grade": True, "solution": True, "locked": False, "points": 2, "grade_id": "q1",
                       "schema_version": 3, "task": False}}


def _assignment():
    """Two exercises (f, then g that uses y from f's check cell) and one written question."""
    return _notebook(("code", SOLUTION_CELL, _solution("f")),
                     ("code", "check_f(f)\ny = f(3)", _grade("check_f")),
                     ("code", "def g(x):\n    ### BEGIN SOLUTION\n    return y + x\n    ### END SOLUTION",
                      _solution("g")),
                     ("code", "check_g(g, extra=1)", _grade("check_g", points=2)),
                     ("markdown", "**Question 1 (2 points).** Why?", {}),
                     ("markdown", "### BEGIN SOLUTION\nBecause.\n### END SOLUTION", copy.deepcopy(ANSWER)))


def test_assignment_finds_exercises_checks_and_questions():
    nb = _assignment()
    f, g = assignments.exercises(nb)
    assert (f.cell, f.functions, f.checks, f.calls, f.points) == (0, ("f",), (1,), (("check_f", "f"),), 1)
    assert (g.cell, g.functions, g.checks, g.points) == (2, ("g",), (3,), 2)
    assert assignments.graded_cells(nb) == [1, 3]
    assert assignments.questions(nb) == [assignments.Question(5, "q1", 2)]
    assert assignments.problems(nb) == []


def test_with_stub_stubs_only_the_one_exercise():
    nb = _assignment()
    stubbed = assignments.with_stub(nb, 2)
    assert "raise NotImplementedError()" in "".join(stubbed["cells"][2]["source"])
    assert "return y + x" not in "".join(stubbed["cells"][2]["source"])
    assert stubbed["cells"][0] == nb["cells"][0] and "return y + x" in "".join(nb["cells"][2]["source"])


@pytest.mark.parametrize("change, words", [
    (lambda nb: nb["cells"][1]["metadata"].clear(), "cell 1 calls check_f but is not a locked nbgrader grade cell"),
    (lambda nb: nb["cells"][3]["metadata"]["nbgrader"].update(grade_id="check_f"), "'check_f' is also cell 1's"),
    (lambda nb: nb["cells"][3]["metadata"]["nbgrader"].pop("points"), "without points"),
    (lambda nb: nb["cells"][0]["metadata"].clear(), "block in a cell without nbgrader metadata"),
    (lambda nb: nb["cells"][5]["metadata"]["nbgrader"].update(grade=False), "both `grade: true` and `solution"),
    (lambda nb: nb["cells"][5].update(source="Because."), "without a '### BEGIN SOLUTION' block"),
    (lambda nb: nb["cells"][4].update(source="Keep the ### BEGIN SOLUTION line."), "mentions a solution delimiter"),
    (lambda nb: nb["cells"][4].update(source="**Question 1 (3 points).**"), "says 3 points, its answer cell gives 2"),
    (lambda nb: nb["cells"][3].update(source="print(g)"), "no cell calls a check on the exercise's functions (g)"),
])
def test_assignment_problems_name_what_nbgrader_or_fairness_needs(change, words):
    nb = _assignment()
    change(nb)
    assert any(words in problem for problem in assignments.problems(nb)), assignments.problems(nb)


def test_student_notebook_blanks_a_solution_cell_without_delimiters_as_nbgrader_does():
    nb = _assignment()
    nb["cells"][5]["source"] = "The model answer, no delimiters."
    nb["cells"][0]["source"] = "def f(x):\n    return 2 * x"
    student = nbtools.student_notebook(nb)
    assert "".join(student["cells"][5]["source"]) == "YOUR ANSWER HERE"
    assert "".join(student["cells"][0]["source"]) == "# YOUR CODE HERE\nraise NotImplementedError()"
