"""A tutorial as an nbgrader assignment: its exercises, the graded cells that check them, its
written questions, and the metadata problems that would make nbgrader or the grades go wrong.

Three kinds of nbgrader cells make an assignment (nbgrader's cell metadata, schema 3):

    exercise   a code cell, `solution: true`, whose `### BEGIN SOLUTION` / `### END SOLUTION`
               block the student writes; it defines functions, e.g. `def q_sample(...)`
    check      a locked code cell, `grade: true` with `points`, that calls a check on them,
               `check_q_sample(q_sample)`: autograded, it scores when it runs without an error
    answer     a markdown cell, `grade: true, solution: true` with `points`, after a question:
               the model answer inside the delimiters, "YOUR ANSWER HERE" for the student;
               graded by hand

A notebook is a dict in nbformat-4 JSON (as `json.load` gives it); cells are named by index.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from minidit.exercises.notebooks import BEGIN, END, strip_solutions

CHECK_CALL = re.compile(r"^(check_\w+)\(\s*(\w+)", re.M)  # a top-level call check_x(fn, ...)


@dataclass(frozen=True)
class Exercise:
    """A code exercise: the solution cell, the functions it defines, the graded cells checking them."""

    cell: int
    grade_id: str
    functions: tuple[str, ...]
    checks: tuple[int, ...]  # the code cells that call a check on one of `functions` (graded or not)
    calls: tuple[tuple[str, str], ...]  # (check, function), as those cells call them
    points: float  # the points of those of its check cells that are graded


@dataclass(frozen=True)
class Question:
    """A written question: the manually graded markdown answer cell."""

    cell: int
    grade_id: str
    points: float


def source(cell: dict) -> str:
    """The cell's text (nbformat stores it as a string or as a list of lines)."""
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def grading(cell: dict) -> dict:
    """The cell's nbgrader metadata ({} when it has none)."""
    return cell.get("metadata", {}).get("nbgrader", {})


def check_calls(text: str) -> list[tuple[str, str]]:
    """The checks a code cell calls at top level, as (check, first argument)."""
    return CHECK_CALL.findall(text)


def is_check(cell: dict) -> bool:
    """A code cell that calls a check."""
    return cell["cell_type"] == "code" and bool(check_calls(source(cell)))


def is_graded(cell: dict) -> bool:
    """An autograded code cell: nbgrader counts its points when it runs without an error."""
    meta = grading(cell)
    return cell["cell_type"] == "code" and bool(meta.get("grade")) and not meta.get("solution")


def graded_cells(nb: dict) -> list[int]:
    """The indices of the autograded code cells."""
    return [i for i, cell in enumerate(nb["cells"]) if is_graded(cell)]


def exercises(nb: dict) -> list[Exercise]:
    """The code exercises in order, each with the cells that call a check on its functions."""
    cells, found = nb["cells"], []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not (grading(cell).get("solution") or BEGIN in source(cell)):
            continue
        functions = tuple(re.findall(r"^def (\w+)", source(cell), re.M))
        calls = [(j, call) for j, other in enumerate(cells) if other["cell_type"] == "code"
                 for call in check_calls(source(other)) if call[1] in functions]
        checks = tuple(dict.fromkeys(j for j, _ in calls))  # in order, each cell once
        points = sum(grading(cells[j]).get("points", 0) for j in checks if is_graded(cells[j]))
        found.append(Exercise(i, grading(cell).get("grade_id", ""), functions, checks,
                              tuple(call for _, call in calls), points))
    return found


def questions(nb: dict) -> list[Question]:
    """The written questions: markdown answer cells graded by hand."""
    return [Question(i, grading(c).get("grade_id", ""), grading(c).get("points", 0))
            for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "markdown" and grading(c).get("grade") and grading(c).get("solution")]


def with_stub(nb: dict, cell: int) -> dict:
    """A copy of the notebook in which only `cell`'s solution is the student's stub."""
    nb = copy.deepcopy(nb)
    target = nb["cells"][cell]
    target["source"] = strip_solutions(source(target), target["cell_type"])
    return nb


def problems(nb: dict) -> list[str]:
    """What keeps the notebook from being a fair nbgrader assignment; [] when nothing does.

    nbgrader's own rules (unique, non-empty grade ids; points on graded cells; markdown answers
    both graded and solution; delimiters only in solution cells, and any line that merely mentions
    a delimiter counts as one) and ours: every check call is graded, locked and worth points;
    every exercise is checked by a graded cell; every solution cell holds a delimited block; a
    question that states its points ("(2 points)") states its answer cell's.
    """
    out, seen = [], {}
    for i, cell in enumerate(nb["cells"]):
        meta, text, where = grading(cell), source(cell), f"cell {i}"
        lines = [line.strip() for line in text.splitlines()]
        delimited = BEGIN in lines
        if any(("BEGIN SOLUTION" in line or "END SOLUTION" in line) and line not in (BEGIN, END) for line in lines):
            out.append(f"{where}: a line mentions a solution delimiter; nbgrader takes any such line for "
                       f"{BEGIN!r} / {END!r}")
        if delimited and not meta.get("solution"):
            out.append(f"{where}: a {BEGIN!r} block in a cell without nbgrader metadata `solution: true`")
        if meta.get("solution") and not delimited:
            out.append(f"{where}: a solution cell without a {BEGIN!r} block (nbgrader would blank the whole cell)")
        if is_check(cell) and not (meta.get("grade") and meta.get("locked") and meta.get("points")):
            out.append(f"{where} calls {check_calls(text)[0][0]} but is not a locked nbgrader grade cell with "
                       "points: give it nbgrader metadata {grade: true, locked: true, points: 1, grade_id: ...}")
        if meta.get("grade") and not meta.get("points"):
            out.append(f"{where}: a graded cell without points")
        if cell["cell_type"] == "markdown" and bool(meta.get("grade")) != bool(meta.get("solution")):
            out.append(f"{where}: a markdown answer must be both `grade: true` and `solution: true`")
        if meta.get("grade") or meta.get("solution") or meta.get("locked"):
            grade_id = meta.get("grade_id", "")
            if not grade_id:
                out.append(f"{where}: an nbgrader cell without a grade_id")
            elif grade_id in seen:
                out.append(f"{where}: grade_id {grade_id!r} is also cell {seen[grade_id]}'s")
            seen.setdefault(grade_id, i)
    for q in questions(nb):
        said = re.findall(r"\((\d+(?:\.\d+)?) points?\)", source(nb["cells"][q.cell - 1])) if q.cell else []
        if said and float(said[0]) != q.points:
            out.append(f"cell {q.cell - 1}: the question says {said[0]} points, its answer cell gives {q.points:g}")
    for ex in exercises(nb):
        if not ex.checks:
            out.append(f"cell {ex.cell}: no cell calls a check on the exercise's functions "
                       f"({', '.join(ex.functions) or 'it defines none'})")
        elif min(ex.checks) < ex.cell:
            out.append(f"cell {ex.cell}: cell {min(ex.checks)} checks the exercise before it is written")
    return out
