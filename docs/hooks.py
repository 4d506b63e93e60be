"""MkDocs hooks (`hooks:` in mkdocs.yml): what the site publishes beside docs/.

- The tutorials, as students get them: each `tutorials/NN.ipynb` becomes the student version
  (`minidit.exercises.notebooks.student_notebook`: every `### BEGIN SOLUTION` block stubbed, the
  Colab badge pointing at `tutorials/student/`) with the committed outputs of the instructor run
  put back, except those of the solution cells. The notebooks are written to a temporary folder at
  build time; nothing generated lies in the checkout, and docs/ holds no solutions.
- The benchmark results: `benchmarks/results/*.md` and their images are pages of the site at
  `benchmarks/results/`, so the links from the notebooks into that folder resolve.
- Links in the notebooks are written for the repository (relative to `tutorials/`, so that they
  work on GitHub and in Jupyter); on the site they are rewritten to the page they name, or to
  the file on GitHub when the site has no page for it.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import tempfile
from html import unescape
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files, InclusionLevel

from minidit.exercises.notebooks import BEGIN, clean_notebook, dumps, read_notebook, student_notebook

ROOT = Path(__file__).resolve().parents[1]  # the checkout: mkdocs.yml, tutorials/, benchmarks/
RESULTS = "benchmarks/results"
_temporary: list[str] = []  # folders of this build's notebooks, removed after the build


def is_solution(cell: dict) -> bool:
    """A cell the student writes: an nbgrader solution cell, or one holding a BEGIN SOLUTION block."""
    lines = "".join(cell["source"]).splitlines()
    return bool(cell.get("metadata", {}).get("nbgrader", {}).get("solution")) or BEGIN in map(str.strip, lines)


def site_notebook(nb: dict) -> dict:
    """The tutorial the site shows: the student version with the instructor run's outputs.

    `student_notebook` stubs the solutions (code: `raise NotImplementedError()`, markdown
    answers: "YOUR ANSWER HERE") and drops every output; the outputs of all cells but the
    solution cells are then put back, so readers see the figures without the answers.
    """
    site = student_notebook(nb, subdir="student")
    instructor = clean_notebook(nb, keep_outputs=True)
    for cell, original in zip(site["cells"], instructor["cells"], strict=True):
        if cell["cell_type"] == "code" and not is_solution(original):
            cell["outputs"] = original["outputs"]
    return site


def _tutorial_files(config) -> list[File]:
    """Each tutorials/*.ipynb as its site version, written to a fresh temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="minidit-docs-"))
    _temporary.append(str(folder))
    files = []
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        target = folder / "tutorials" / path.name  # mkdocs-jupyter matches "tutorials/*.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(dumps(site_notebook(read_notebook(path))), encoding="utf-8")
        # A File with its own src_dir (not File.generated): mkdocs-jupyter wraps it and needs its src_dir.
        files.append(File(f"tutorials/{path.name}", src_dir=str(folder), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files


def _result_files(config) -> list[File]:
    """benchmarks/results/*.md and the images they show, as pages outside the navigation."""
    paths = [p for p in sorted((ROOT / RESULTS).glob("*")) if p.suffix in (".md", ".png", ".svg", ".jpg", ".gif")]
    return [File.generated(config, f"{RESULTS}/{p.name}", abs_src_path=str(p), inclusion=InclusionLevel.NOT_IN_NAV)
            for p in paths]


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns the notebooks into pages
def on_files(files: Files, config) -> Files:
    for file in _tutorial_files(config) + _result_files(config):
        old = files.get_file_from_path(file.src_uri)
        if old is not None:  # a copy in docs/ would publish the instructor version
            files.remove(old)
        files.append(file)
    return files


_URL = re.compile(r'\b(href|src)="([^"]*)"')


def site_url(url: str, repo_page: str, page_file: File, files: Files, repo_url: str | None) -> str:
    """A link written for the repository file `repo_page`, as the site must write it.

    Relative links to a file the site publishes (docs/X, tutorials/*.ipynb, benchmarks/results/*)
    point at its page; other files of the checkout at GitHub; anything else is left alone.
    """
    if not url or url.startswith(("#", "/")) or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url):
        return url
    path, hashmark, fragment = url.partition("#")
    target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_page), path))
    src_uri = target.removeprefix("docs/")
    file = files.get_file_from_path(src_uri)
    if file is not None:
        return file.url_relative_to(page_file) + hashmark + fragment
    if repo_url and not target.startswith("..") and (ROOT / target).exists():
        kind = "tree" if (ROOT / target).is_dir() else "blob"
        return f"{repo_url.rstrip('/')}/{kind}/main/{target}" + hashmark + fragment
    return url


_HEADING = re.compile(r'<h[1-6][^>]*\bid="([^"]*)"[^>]*>(.*?)</h[1-6]>', re.S)


def _plain(html: str) -> str:
    """The text of an HTML fragment, as one line, without the pilcrow of a heading's anchor."""
    return " ".join(unescape(re.sub(r"<[^>]*>", "", html)).replace("¶", "").split())


def _align_toc(toc, html: str) -> None:
    """Point each table-of-contents entry at the id its heading has in the page.

    mkdocs-jupyter slugs the headings for the table of contents from Markdown and nbconvert
    slugs them again in the page; they differ where a heading holds code ("Training `vit-mnist`"),
    which the table of contents also leaves out of the title.
    """
    ids = {}
    for id, inner in _HEADING.findall(html):
        ids.setdefault(_plain(re.sub(r"<code>.*?</code>", "", inner, flags=re.S)), id)
        ids[_plain(inner)] = id
    for item in toc:
        if f'id="{item.id}"' not in html:
            item.id = ids.get(_plain(item.title), item.id)
        _align_toc(item.children, html)


def on_page_content(html: str, page, config, files: Files) -> str:
    """Notebook pages: rewrite their repository-relative links for the site, align their TOC."""
    if not page.file.src_uri.endswith(".ipynb"):
        return html  # MkDocs itself resolves the links of Markdown pages
    repo_page = page.file.src_uri  # the notebooks lie at the same path in the checkout and on the site
    html = _URL.sub(lambda m: f'{m[1]}="{site_url(m[2], repo_page, page.file, files, config.repo_url)}"', html)
    _align_toc(page.toc, html)
    return html


def _remove_temporary() -> None:
    while _temporary:
        shutil.rmtree(_temporary.pop(), ignore_errors=True)


@event_priority(-100)  # after mkdocs-jupyter has copied the notebooks into the site
def on_post_build(config) -> None:
    _remove_temporary()


def on_build_error(error) -> None:
    _remove_temporary()
