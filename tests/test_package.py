"""The package as users get it: the console script, and a wheel that installs and imports."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import minidit
from minidit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert minidit.__version__ in capsys.readouterr().out
    assert main([]) == 0  # no subcommand prints the help
    assert "usage: minidit" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "minidit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"minidit {minidit.__version__}"


@pytest.mark.slow
def test_wheel_and_sdist_build_and_the_wheel_installs_in_a_fresh_venv(tmp_path):
    # 1. build both distributions with the project's own backend (no network needed).
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", str(dist), str(ROOT)],
        check=True, capture_output=True,
    )
    wheels = list(dist.glob("minidit-*.whl"))
    sdists = list(dist.glob("minidit-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "minidit/__init__.py" in names
    assert not any(n.startswith("tests/") for n in names), "tests must not ship in the wheel"

    # 2. a fresh venv; it sees the running interpreter's packages (torch: a multi-GB download
    #    otherwise), also when that interpreter is itself a venv, but not the editable checkout,
    #    so `import minidit` must come from the wheel.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p, "torch").is_dir()]
    Path(env_site, "outer_site.pth").write_text("\n".join(ours) + "\n")  # torch & co., never minidit's checkout
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheels[0])],
                   check=True, capture_output=True)
    probe = "import minidit, sys; print(minidit.__version__); print(minidit.__file__)"
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    version, location = out.stdout.split()
    assert version == minidit.__version__
    assert str(env_dir) in location, f"imported {location}, not the wheel installed in the venv"
    cli = subprocess.run([str(env_dir / "bin" / "minidit"), "--version"], capture_output=True, text=True, check=True)
    assert minidit.__version__ in cli.stdout
