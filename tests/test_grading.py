"""Grading that is fair and real: every check cell is graded, one mistake costs one exercise, the
instructors' page lists what the notebooks grade, and nbgrader itself grades a known-wrong submission.

The two slow tests execute notebooks in smoke mode as nbgrader's autograde does: on to the end
after an error (`allow_errors`), and a graded cell scores when it ran without one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from minidit.exercises import assignments
from minidit.exercises.notebooks import student_notebook

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))  # the instructor versions


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _label(cell: dict, index: int) -> str:
    grade_id = assignments.grading(cell).get("grade_id")
    return f"cell {index}" + (f" ({grade_id})" if grade_id else "")


# ----------------------------------------------------------------------------------------
# The metadata: every check is graded, and nbgrader accepts the notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_check_is_graded_and_nbgrader_accepts_the_metadata(path):
    from nbgrader.nbgraderformat import MetadataValidator  # nbgrader comes with the dev extra

    problems = assignments.problems(_load(path))
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)
    MetadataValidator().validate_nb(nbformat.read(path, as_version=4))  # nbgrader's own rules


def _table_rows() -> dict[str, tuple[str, str, str]]:
    """docs/instructors.md's table: notebook number -> (exercises, autograded points, written questions)."""
    text = (REPO / "docs" / "instructors.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d\d) [^|]*\|([^|]*)\|([^|]*)\|([^|]*)\|\s*$", text, re.M)
    return {number: tuple(col.strip() for col in cols) for number, *cols in rows}


def _expected_row(nb: dict) -> tuple[str, str, str]:
    calls = [f"`{fn}` → `{check}`" for ex in assignments.exercises(nb) for check, fn in ex.calls]
    points = sum(ex.points for ex in assignments.exercises(nb))
    questions = assignments.questions(nb)
    written = f"{len(questions)} ({sum(q.points for q in questions):g} points)" if questions else "—"
    return ", ".join(calls) or "—", f"{points:g}" if calls else "—", written


def test_the_instructors_page_lists_exactly_what_the_notebooks_grade():
    want = {path.name[:2]: _expected_row(_load(path)) for path in NOTEBOOKS
            if assignments.exercises(_load(path)) or assignments.questions(_load(path))}
    assert want, "no notebook grades anything"
    got = _table_rows()
    expected = "\n".join(f"| {path.stem[:2]} {path.stem[3:].replace('_', ' ')} | " + " | ".join(want[path.stem[:2]])
                         + " |" for path in NOTEBOOKS if path.stem[:2] in want)
    assert got == want, f"update the table in docs/instructors.md to (keep the names in the first column):\n{expected}"


# ----------------------------------------------------------------------------------------
# One mistake costs one exercise


def _watched(nb: dict) -> list[int]:
    """The cells whose failure costs points: graded code cells, and any cell that calls a check."""
    return [i for i, cell in enumerate(nb["cells"]) if assignments.is_graded(cell) or assignments.is_check(cell)]


def _cases():
    """(notebook, exercise) for every exercise with a watched cell after it that is not its own.
    The others cannot cascade: only their own checks run after them, and the stub fails those."""
    for path in NOTEBOOKS:
        nb = _load(path)
        for ex in assignments.exercises(nb):
            if any(i > ex.cell and i not in ex.checks for i in _watched(nb)):
                yield pytest.param(f"{path.name}:{ex.cell}", id=f"{path.stem[:2]}-{(*ex.functions, ex.cell)[0]}")


async def _execute(nb: dict, env: dict, cwd: Path, slots: asyncio.Semaphore) -> tuple[dict[int, str], float]:
    """Run the code cells up to the last watched one, on after errors; return {cell: error} of the
    failures and the seconds it took."""
    last = max(_watched(nb))
    keep = [i for i in range(last + 1) if nb["cells"][i]["cell_type"] == "code"]
    part = nbformat.reads(json.dumps({**nb, "cells": [nb["cells"][i] for i in keep]}), as_version=4)
    cwd.mkdir(parents=True)
    async with slots:
        tic = time.perf_counter()
        await NotebookClient(part, timeout=900, allow_errors=True, kernel_name="python3").async_execute(
            env=env, cwd=str(cwd))
        seconds = time.perf_counter() - tic
    errors = {i: [o for o in cell.outputs if o.output_type == "error"] for i, cell in zip(keep, part.cells)}
    return {i: f"{out[0].ename}: {out[0].evalue}" for i, out in errors.items() if out}, seconds


@pytest.fixture(scope="module")
def stubbed_runs(request, tmp_path_factory):
    """Executes every selected case once, as many at a time as there are cores; case -> failures."""
    results = {}

    def run(case: str, data_root: Path) -> dict[int, str]:
        if not results:
            chosen = sorted({item.callspec.params["case"] for item in request.session.items  # this test's cases only
                             if getattr(item, "originalname", None) == "test_one_mistake_costs_one_exercise"})
            env = {**os.environ, "MINIDIT_SMOKE": "1", "MINIDIT_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
            root = tmp_path_factory.mktemp("cascade")

            async def all_cases():
                slots = asyncio.Semaphore(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
                jobs = []
                for n, each in enumerate(chosen):
                    path, cell = each.rsplit(":", 1)
                    nb = assignments.with_stub(_load(TUTORIALS / path), int(cell))
                    jobs.append(_execute(nb, env, root / str(n), slots))
                return await asyncio.gather(*jobs)

            tic = time.perf_counter()
            runs = asyncio.run(all_cases())
            results.update({each: failures for each, (failures, _) in zip(chosen, runs)})
            print(f"\ncascade: {len(chosen)} stubbed notebooks executed in {time.perf_counter() - tic:.0f} s "
                  f"({', '.join(f'{each} {s:.0f} s' for each, (_, s) in zip(chosen, runs))})")
        return results[case]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases()))
def test_one_mistake_costs_one_exercise(case, stubbed_runs, mnist_root):
    """The exercise's solution replaced by the student's stub fails its own checks and nothing else graded."""
    path, cell = case.rsplit(":", 1)
    nb = _load(TUTORIALS / path)
    ex = next(e for e in assignments.exercises(nb) if e.cell == int(cell))
    failed = stubbed_runs(case, mnist_root)
    watched = _watched(nb)
    extra = {i: failed[i] for i in watched if i in failed and i not in ex.checks}
    passed = [i for i in ex.checks if i not in failed]
    cells = nb["cells"]
    assert not extra and not passed, (
        f"{path}: with {', '.join(ex.functions)} (cell {ex.cell}) left as the stub, "
        + "; ".join([f"{_label(cells[i], i)} failed too: {error}" for i, error in extra.items()]
                    + [f"its own check {_label(cells[i], i)} passed" for i in passed]))


# ----------------------------------------------------------------------------------------
# The real nbgrader: generate_assignment, then autograde a known-wrong submission

NBGRADER_CONFIG = """\
c = get_config()
c.CourseDirectory.root = {root!r}
c.CourseDirectory.course_id = "minidit"
c.CourseDirectory.db_url = {db!r}
c.Execute.timeout = 900  # seconds per cell; smoke mode needs a few
"""

NOTEBOOK, BROKEN = "01_forward_diffusion.ipynb", "q_sample"  # the fastest notebook, its middle exercise

A_MISTAKE_THAT_RUNS = """

_{fn}_right = {fn}


def {fn}(*args, **kwargs):  # a mistake that runs: every tensor it returns is 1% too large
    out = _{fn}_right(*args, **kwargs)
    return tuple(1.01 * o for o in out) if isinstance(out, tuple) else 1.01 * out
"""


def _nbgrader(course: Path, env: dict, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_nbgrader_autogrades_a_known_wrong_submission(tmp_path, mnist_root):
    from nbgrader.api import Gradebook  # nbgrader comes with the dev extra

    course = tmp_path / "course"
    (course / "source" / "ps1").mkdir(parents=True)
    (course / "nbgrader_config.py").write_text(
        NBGRADER_CONFIG.format(root=str(course), db=f"sqlite:///{course / 'gradebook.db'}"))
    nb = _load(TUTORIALS / NOTEBOOK)
    (course / "source" / "ps1" / NOTEBOOK).write_text(json.dumps(nb), encoding="utf-8")
    env = {**os.environ, "MINIDIT_SMOKE": "1", "MINIDIT_DATA": str(mnist_root), "OMP_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter")}  # no user-wide nbgrader configuration
    tic = time.perf_counter()
    _nbgrader(course, env, "generate_assignment", "ps1")

    # nbgrader hands out what `minidit exercises generate` writes: solutions and answers stubbed the same way
    released = _load(course / "release" / "ps1" / NOTEBOOK)
    assert ([assignments.source(c) for c in released["cells"]]
            == [assignments.source(c) for c in student_notebook(nb)["cells"]])
    for q in assignments.questions(nb):
        assert assignments.source(released["cells"][q.cell]).strip() == "YOUR ANSWER HERE"

    # the student's notebook: every solution right except BROKEN, which runs but is 1% off
    ex = next(e for e in assignments.exercises(nb) if BROKEN in e.functions)
    wrong = json.loads(json.dumps(nb))
    wrong["cells"][ex.cell]["source"] = assignments.source(nb["cells"][ex.cell]) + A_MISTAKE_THAT_RUNS.format(fn=BROKEN)
    (course / "submitted" / "alice" / "ps1").mkdir(parents=True)
    (course / "submitted" / "alice" / "ps1" / NOTEBOOK).write_text(json.dumps(wrong), encoding="utf-8")
    _nbgrader(course, env, "autograde", "ps1")
    print(f"\nnbgrader generate_assignment + autograde of {NOTEBOOK}: {time.perf_counter() - tic:.0f} s")

    meta = [assignments.grading(cell) for cell in nb["cells"]]
    want = {meta[i]["grade_id"]: 0.0 if i in ex.checks else meta[i]["points"] for i in assignments.graded_cells(nb)}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "minidit") as gradebook:
        graded = gradebook.find_submission_notebook(NOTEBOOK.removesuffix(".ipynb"), "ps1", "alice")
        scores = {g.name: g.auto_score for g in graded.grades if g.cell.cell_type == "code"}
        manual = {g.name: (g.needs_manual_grade, g.max_score) for g in graded.grades if g.cell.cell_type == "markdown"}
        code_score, max_code_score = graded.code_score, graded.max_code_score
    assert ex.points > 0 and scores == want
    assert code_score == max_code_score - ex.points
    assert manual == {q.grade_id: (True, q.points) for q in assignments.questions(nb)}  # written answers wait
