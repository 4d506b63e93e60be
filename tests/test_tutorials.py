"""The tutorial notebooks: their house rules, and a top-to-bottom run of each in smoke mode."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))  # the instructor versions; tutorials/student/ is generated
COLAB = "https://colab.research.google.com/github/minidit/minidit/blob/main/tutorials/{}"


def _sources(path: Path) -> list[tuple[dict, str]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(cell, "".join(cell["source"])) for cell in cells]


def test_there_are_tutorials():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_forward_diffusion.ipynb", "02_ddpm_from_scratch.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_house_rules(path):
    cells = _sources(path)
    assert COLAB.format(path.name) in cells[0][1], "the first cell carries the Open-in-Colab badge"
    code = [(cell, src) for cell, src in cells if cell["cell_type"] == "code"]
    install = code[0][1]  # first code cell: install minidit where it is missing, and never raise
    assert 'importlib.util.find_spec("minidit") is None' in install and "pip" in install, "first code cell: install"
    assert "check=True" not in install and not re.search(r"^\s*raise\b", install, re.M), "the install cell prints what to do, never raises"
    params = [src for cell, src in code if "parameters" in cell["metadata"].get("tags", [])]
    assert len(params) == 1 and 'SMOKE = os.environ.get("MINIDIT_SMOKE", "0") == "1"' in params[0]
    for _, src in code:  # the installed package is imported, never a checkout
        assert not re.search(r"os\.chdir|%cd |sys\.path\.(insert|append)|PYTHONPATH|git clone", src), src
    assert any("torch.testing.assert_close(" in src for _, src in code), "verify against the library"
    assert "took" in code[-1][1] and "device" in code[-1][1], "the last cell reports device and run time"
    assert path.stat().st_size < 1_000_000, "keep notebooks under 1 MB (figsize, dpi 80)"
    if "*Committed without outputs:*" in cells[0][1]:  # a GPU notebook, not run here: no stale outputs either
        assert not any(cell.get("outputs") for cell, _ in code), "marked as committed without outputs"
        return
    assert "*Committed outputs:* a full run took" in cells[0][1], "the header says how long the full run took"
    last_output = "".join("".join(o.get("text", [])) for o in code[-1][0].get("outputs", []))
    assert "(full mode)" in last_output, "commit the outputs of a full run"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, mnist_root, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIT_SMOKE", "1")
    monkeypatch.setenv("MINIDIT_DATA", str(mnist_root))
    # One thread: the smoke run is many tiny ops, where a second thread only adds synchronisation,
    # and on a busy machine an idle-waiting OpenMP team slows small ops down many times over.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    tic = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    last = "".join(output.get("text", "") for output in nb.cells[-1].outputs)
    assert "This run (smoke mode) took" in last, last
    print(f"{path.name}: {time.perf_counter() - tic:.0f} s in smoke mode")
