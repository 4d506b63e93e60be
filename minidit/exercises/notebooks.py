"""Tutorial notebooks as JSON: clean them, strip their solutions, write the student versions.

Solution notebooks mark student code with nbgrader's `### BEGIN SOLUTION` / `### END SOLUTION`
(graded by the checks of `minidit.exercises`), so instructors can use nbgrader directly.
`minidit exercises generate tutorials/ --out tutorials/student/ [--check]` writes (or checks)
the student notebooks: each solution becomes `raise NotImplementedError()`, outputs go.
`minidit exercises clean PATH... [--check]` drops execution counts and run metadata and keeps
outputs, so notebook diffs stay clean (nbformat-4 JSON is handled with `json` alone).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def _lines(text: str | list[str]) -> list[str]:
    """nbformat's multi-line strings: a list of lines, each with its newline."""
    return ("".join(text) if isinstance(text, list) else text).splitlines(keepends=True)


def strip_solutions(source: str, cell_type: str = "code") -> str:
    """Replace each BEGIN/END SOLUTION block by a stub at the indentation of its BEGIN line."""
    out, inside = [], False
    stub = ["# YOUR CODE HERE", "raise NotImplementedError()"] if cell_type == "code" else ["YOUR ANSWER HERE"]
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        if line.strip() == BEGIN:
            if inside:
                raise ValueError(f"line {number}: {BEGIN!r} inside another solution block")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out += [indent + text + "\n" for text in stub]
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"line {number}: {END!r} without a {BEGIN!r} before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"a {BEGIN!r} block is never closed by {END!r}")
    text = "".join(out)
    return text[:-1] if text.endswith("\n") and not source.endswith("\n") else text


def clean_notebook(nb: dict, keep_outputs: bool = True) -> dict:
    """Keep sources, tags, nbgrader metadata and (if asked) outputs; null every execution count."""
    default_kernel = {"display_name": "Python 3", "language": "python", "name": "python3"}
    cells = []
    for i, cell in enumerate(nb["cells"]):
        meta = {k: v for k, v in cell.get("metadata", {}).items() if k in ("tags", "nbgrader")}
        new = {"cell_type": cell["cell_type"], "id": cell.get("id", f"cell-{i}"), "metadata": meta,
               "source": _lines(cell["source"])}
        if cell["cell_type"] == "code":
            outputs = [dict(o) for o in cell.get("outputs", [])] if keep_outputs else []
            for o in outputs:
                o.update({"execution_count": None} if "execution_count" in o else {})
                o.update({"text": _lines(o["text"])} if "text" in o else {})
                for key in o.get("data", {}):  # text is stored as lines, images as one base64 string
                    if key.startswith("text/") or key == "image/svg+xml":
                        o["data"][key] = _lines(o["data"][key])
            new.update(execution_count=None, outputs=outputs)
        cells.append(new)
    kernel = nb.get("metadata", {}).get("kernelspec", default_kernel)
    return {"cells": cells, "metadata": {"kernelspec": kernel, "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def dumps(nb: dict) -> str:
    """nbformat's on-disk layout: one-space indent, sorted keys, UTF-8, final newline."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def student_notebook(nb: dict, subdir: str = "") -> dict:
    """The student version: solutions stubbed (a solution cell without a BEGIN/END block whole, as in
    nbgrader), outputs stripped, Colab links pointed into `subdir`."""
    nb = clean_notebook(nb, keep_outputs=False)
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        if cell["metadata"].get("nbgrader", {}).get("solution") and BEGIN not in map(str.strip, source.splitlines()):
            source = f"{BEGIN}\n{source}\n{END}"  # as nbgrader does: a solution cell without a block is all answer
        try:
            source = strip_solutions(source, cell["cell_type"])
        except ValueError as err:
            raise ValueError(f"cell {i}: {err}") from None
        if subdir and cell["cell_type"] == "markdown":  # .../tutorials/NB.ipynb -> .../tutorials/student/NB.ipynb
            source = re.sub(r"(colab\.research\.google\.com/github/\S+?/)([\w.-]+\.ipynb)", rf"\g<1>{subdir}/\2",
                            source)
        cell["source"] = _lines(source)
    return nb


def _sync(path: Path, text: str, check: bool) -> bool:
    """True when `path` does not hold `text` yet; then, unless `check`, write it."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    if not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return True


def read_notebook(path: Path) -> dict:
    """A notebook's JSON, or a ValueError that names the file and what is wrong with it."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a notebook: {err}") from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "cell_type" in c and "source" in c
                                              for c in cells):
        raise ValueError(f"{path} is not an nbformat-4 notebook: it needs a list of cells with a cell_type and "
                         "a source")
    return nb


def generate(src: str | Path, out: str | Path, check: bool = False) -> list[Path]:
    """Write (or, with check, only compare) the student notebooks; returns the stale paths."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"src must be a folder of notebooks, got {str(src)!r}")
    inside = out.resolve().is_relative_to(src.resolve())
    subdir = out.resolve().relative_to(src.resolve()).as_posix() if inside else ""
    texts = {}
    for path in sorted(src.glob("*.ipynb")):
        try:
            texts[out / path.name] = dumps(student_notebook(read_notebook(path), subdir))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    stale = [target for target, text in texts.items() if _sync(target, text, check)]
    return stale + [p for p in sorted(out.glob("*.ipynb")) if p not in texts]  # their sources are gone


def clean(paths: list[str | Path], check: bool = False) -> list[Path]:
    """Clean notebooks in place (or only compare); folders mean their *.ipynb. Returns the unclean ones."""
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("*.ipynb")) if p.is_dir() else [p])]
    return [f for f in files if _sync(f, dumps(clean_notebook(read_notebook(f))), check)]
