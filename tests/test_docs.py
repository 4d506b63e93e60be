"""The documentation site: it shows the student tutorials, its docstrings render as written, and
every relative link of every built page resolves.

The site is built by `mkdocs build --strict` with docs/hooks.py (see mkdocs.yml). The slow tests
build it once into a temporary folder and read the HTML.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import posixpath
import re
import subprocess
import sys
from html import unescape
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))  # the instructor versions
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


@functools.cache
def _load_hooks():
    spec = importlib.util.spec_from_file_location("minidit_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hooks():
    """docs/hooks.py as a module (MkDocs loads it by path, so do the same)."""
    pytest.importorskip("mkdocs")
    return _load_hooks()


# -- the tutorials on the site are the student versions ------------------------------------------

def _words(text: str) -> str:
    """Text as its words alone, so that Markdown, HTML and syntax highlighting do not matter."""
    return " ".join(re.findall(r"\w+", text))


def _solution_lines(nb: dict) -> list[str]:
    """The lines between BEGIN and END SOLUTION that could give something away (3+ words),
    less those that the notebook also shows outside its solutions (a call repeated later)."""
    inside, lines, shown = False, [], []
    for cell in nb["cells"]:
        for line in "".join(cell["source"]).splitlines():
            if line.strip() in (BEGIN, END):
                inside = line.strip() == BEGIN
            elif inside:
                lines.append(line)
            else:
                shown.append(line)
    shown_words = _words("\n".join(shown))
    return [line for line in lines if len(_words(line).split()) >= 3 and _words(line) not in shown_words]


def _cell(cell_type: str, source: str, outputs=None, **nbgrader) -> dict:
    cell = {"cell_type": cell_type, "metadata": {"nbgrader": nbgrader} if nbgrader else {}, "source": source}
    return cell | ({"outputs": outputs or [], "execution_count": 1} if cell_type == "code" else {})


def test_site_notebook_stubs_solutions_and_keeps_the_other_outputs():
    hooks = _hooks()
    figure = {"output_type": "display_data", "data": {"image/png": "iVBORw0K", "text/plain": ["<Figure>"]},
              "metadata": {}}
    printed = {"output_type": "stream", "name": "stdout", "text": ["secret value 42\n"]}
    badge = "[![Open In Colab](https://colab.research.google.com/github/minidit/minidit/blob/main/tutorials/01_x.ipynb)"
    nb = {"cells": [
        _cell("markdown", badge),
        _cell("code", "def f(x):\n    ### BEGIN SOLUTION\n    return x * 7\n    ### END SOLUTION\nprint(f(6))",
              [printed], grade=False, solution=True, grade_id="f", locked=False),
        _cell("code", "plot()", [figure]),
        _cell("markdown", "Why?\n\n### BEGIN SOLUTION\nBecause the noise is Gaussian.\n### END SOLUTION",
              grade=True, solution=True, grade_id="q1", points=1, locked=False),
        _cell("markdown", "Because nothing marks this model answer.", grade=True, solution=True, grade_id="q2"),
        _cell("code", "x = 1  # no markers, all solution", [printed], grade=False, solution=True, grade_id="g"),
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    site = hooks.site_notebook(copy.deepcopy(nb))
    sources = ["".join(cell["source"]) for cell in site["cells"]]
    assert "tutorials/student/01_x.ipynb" in sources[0], "the Colab badge opens the student version"
    assert sources[1] == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\nprint(f(6))"
    assert site["cells"][1]["outputs"] == [], "a solution cell's outputs would give the answer away"
    assert site["cells"][2]["outputs"][0]["data"]["image/png"] == "iVBORw0K", "other outputs are kept"
    assert sources[3] == "Why?\n\nYOUR ANSWER HERE" and "outputs" not in site["cells"][3]
    assert sources[4] == "YOUR ANSWER HERE", "an nbgrader answer cell without markers is replaced whole"
    assert sources[5] == "# YOUR CODE HERE\nraise NotImplementedError()" and site["cells"][5]["outputs"] == []
    assert "x * 7" in "".join(nb["cells"][1]["source"]), "the instructor notebook is left as it was"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_site_notebook_of_each_tutorial_holds_no_solution(path):
    hooks = _hooks()
    nb = hooks.read_notebook(path)
    site = hooks.dumps(hooks.site_notebook(nb))
    site_words = _words(site.replace("\\n", "\n"))  # the JSON text: sources and every output
    leaked = [line for line in _solution_lines(nb) if _words(line) in site_words]
    assert not leaked, f"{path.name}: solution lines on the site: {leaked}"
    outputs = sum(len(cell.get("outputs", [])) for cell in nb["cells"] if not hooks.is_solution(cell))
    assert hooks.dumps(hooks.site_notebook(nb)).count('"output_type"') == outputs, "outputs of other cells kept"


def test_tutorials_come_first_in_the_navigation():
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):  # mkdocs.yml names Python objects (!!python/name:...); not needed here
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)["nav"]
    titles = [next(iter(entry)) for entry in nav]
    assert titles.index("Tutorials") < 3 and titles.index("Tutorials") < titles.index("API reference"), titles
    pages = [next(iter(e.values())) for e in nav[titles.index("Tutorials")]["Tutorials"]]
    assert pages[1:] == [f"tutorials/{p.name}" for p in TUTORIALS], "every tutorial, in order, under Tutorials"


# -- docstrings render as written ----------------------------------------------------------------

def _documented_modules() -> list[str]:
    return sorted({line.split()[1] for page in (ROOT / "docs" / "api").glob("*.md")
                   for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("::: ")})


def _docstring_texts(obj):
    """(object, Markdown text) for each piece of prose mkdocstrings renders from obj's docstring."""
    for section in obj.docstring.parsed:
        value = section.value
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str):
                yield item
            elif isinstance(item, tuple):  # Examples: (kind, text)
                yield item[1]
            elif getattr(item, "description", None):
                yield item.description


def _rendered_objects(obj):
    """obj and the members mkdocstrings shows on its page: no private names, no imported names,
    no submodules (they have pages of their own)."""
    yield obj
    for name, member in obj.members.items():
        if member.is_alias or member.is_module or re.match(r"^_[^_]", name):
            continue
        yield from _rendered_objects(member)


def markdown_hazards(text: str, md) -> list[str]:
    """What Markdown would do to `text` that its writer did not mean: emphasis made of `*` or `_`,
    links made of brackets, characters that vanish (`*`, `_`, `\\`, `<`, `>`)."""
    from bs4 import BeautifulSoup

    md.reset()
    soup = BeautifulSoup(md.convert(text), "html.parser")
    problems = [f"{tag.name}: {str(tag)[:80]!r}" for tag in soup.find_all(["em", "strong", "a"])]
    for code in soup.find_all("code"):
        code.string = ""  # what follows reads the prose only
    prose = soup.get_text()
    problems += [f"reference link (autorefs): {m[0]!r}" for m in re.finditer(r"\[[^\[\]]*\]\s?\[[^\[\]]*\]", prose)]
    written = re.sub(r"(`+)(.+?)\1", "", text, flags=re.S)  # the prose as written, code spans dropped
    written = re.sub(r"^(    |\t).*$", "", written, flags=re.M)  # and indented code blocks
    problems += [f"{written.count(c) - prose.count(c)} of {written.count(c)} {c!r} vanished"
                 for c in "*_\\<>" if written.count(c) > prose.count(c)]
    return problems


def test_docstrings_render_as_written():
    """Formulas in prose sit in backticks, display equations in indented blocks (docs/api/index.md):
    Markdown must neither make emphasis of `x_t, x_0` or `P*P*C` nor eat a character."""
    griffe = pytest.importorskip("griffe")
    markdown = pytest.importorskip("markdown")
    pytest.importorskip("bs4")
    md = markdown.Markdown(extensions=["admonition", "tables", "pymdownx.arithmatex", "pymdownx.superfences"],
                           extension_configs={"pymdownx.arithmatex": {"generic": True}})
    logging.getLogger("griffe").setLevel(logging.ERROR)  # parameter-type notes are not our business here
    package = griffe.load("minidit", docstring_parser="google", allow_inspection=False, resolve_aliases=False)
    found, checked = [], 0
    for module in _documented_modules():
        for obj in _rendered_objects(package[module.removeprefix("minidit.")] if module != "minidit" else package):
            if obj.docstring is None:
                continue
            for text in _docstring_texts(obj):
                checked += 1
                found += [f"{obj.path} ({obj.filepath.relative_to(ROOT)}:{obj.docstring.lineno}): {p}"
                          for p in markdown_hazards(text, md)]
    assert checked > 500, f"only {checked} docstring texts found: is the package parsed?"
    assert not found, "Markdown hazards in docstrings:\n" + "\n".join(found)


def test_hazards_are_found():
    """The checker above sees the cases it exists for, and passes the convention."""
    markdown = pytest.importorskip("markdown")
    pytest.importorskip("bs4")
    md = markdown.Markdown(extensions=["pymdownx.superfences"])
    assert markdown_hazards("Tokens [B, L, P*P*C] and [D, P*P*C].", md)
    assert markdown_hazards("Mean of q(x_{t−1}|x_t, x_0) and _x_.", md)
    assert markdown_hazards("for σ_i in [S_tmin, S_tmax] [EDM, Alg. 2]", md)
    assert markdown_hazards("a <token> here", md)
    assert not markdown_hazards("Tokens `[B, L, P*P*C]`, mean of `q(x_{t−1} | x_t, x_0)` [DDPM, Eq. 7].", md)
    assert not markdown_hazards("The posterior:\n\n    q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)\n\nwith x_t, x_0.", md)


# -- the built site ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as CI builds it: `mkdocs build --strict` with the hooks, into a temporary folder."""
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


@pytest.mark.slow
def test_built_tutorials_show_no_solution(site):
    for path in TUTORIALS:
        nb = _hooks().read_notebook(path)
        page = site / "tutorials" / path.stem / "index.html"
        text = _words(unescape(re.sub(r"<[^>]*>", " ", page.read_text(encoding="utf-8"))))  # tags go, text stays
        leaked = [line for line in _solution_lines(nb) if _words(line) in text]
        assert not leaked, f"{page.relative_to(site)} shows solution lines: {leaked}"
        downloaded = _words((page.parent / path.name).read_text(encoding="utf-8").replace("\\n", "\n"))
        assert not [line for line in _solution_lines(nb) if _words(line) in downloaded], "the .ipynb offered there"


_LINK = re.compile(r'<(?:a|link|img|script|source|iframe)\b[^>]*?\b(?:href|src)="([^"]*)"', re.I)
_ID = re.compile(r'\bid="([^"]*)"')


def broken_links(site: Path) -> list[str]:
    """Every relative href/src of every built page that names no file of the site, or no anchor
    of the page it names."""
    ids: dict[Path, set[str]] = {}
    broken = []
    for page in sorted(site.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        for url in _LINK.findall(html):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//", url) or not url:
                continue  # https:, data:, mailto: ... and protocol-relative links leave the site
            path, _, anchor = unquote(url).partition("#")
            base = site if path.startswith("/") else page.parent
            target = Path(posixpath.normpath(base / path.lstrip("/"))) if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file() or not target.resolve().is_relative_to(site.resolve()):
                broken.append(f"{page.relative_to(site)}: {url}")
            elif anchor and target.suffix == ".html":
                if target not in ids:
                    ids[target] = set(_ID.findall(target.read_text(encoding="utf-8")))
                if anchor not in ids[target]:
                    broken.append(f"{page.relative_to(site)}: {url} (no such anchor)")
    return broken


def test_broken_links_are_found(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h2 id="here">A</h2><a href="#here">ok</a>', encoding="utf-8")
    (tmp_path / "pic.png").write_bytes(b"")
    (tmp_path / "index.html").write_text(
        '<a href="a/">ok</a> <a href="a/#here">ok</a> <img src="pic.png"> <a href="https://x.org/y">ok</a>'
        '<a href="../benchmarks/results/samplers.md">404</a> <a href="a/#gone">bad anchor</a>'
        '<img src="data:image/png;base64,AAAA"> <a href="b/">404</a>', encoding="utf-8")
    assert broken_links(tmp_path) == ["index.html: ../benchmarks/results/samplers.md",
                                      "index.html: a/#gone (no such anchor)", "index.html: b/"]


@pytest.mark.slow
def test_every_relative_link_on_the_site_resolves(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) > 60 and (site / "benchmarks" / "results" / "samplers" / "index.html").is_file()
    broken = broken_links(site)
    assert not broken, "links that are 404 on the site:\n" + "\n".join(broken)
