"""The distribution a user installs: build the wheel, install it into a fresh virtualenv outside the repository
(no editable install), and run the console script there, from an empty folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "tests", "bench", "tools", "docs", "tmp")


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_installs_and_runs_in_a_fresh_virtualenv(tmp_path):
    # Built from a copy of the sources, so the build leaves nothing in the repository.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    wheels = tmp_path / "wheels"
    # This environment's setuptools when it has one (no download); else pip fetches it from the index.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", wheels, source, cwd=tmp_path)
    (wheel,) = wheels.glob("neoxlite-*.whl")

    # A virtualenv without pip (this interpreter's pip installs into it); it sees this environment's
    # dependencies (torch, bitsandbytes, ...) through a .pth line, but not the repository and not the editable
    # install (a .pth line adds a folder; the .pth files inside it, like the editable finder, are not run).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path)
                   .stdout.strip())
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()] or [sysconfig.get_path("purelib")]
    assert str(REPO) not in ours and "" not in ours  # the repository's own folders stay out of sight
    (purelib / "dependencies.pth").write_text("\n".join(ours) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel,
        cwd=tmp_path)

    installed = sorted(p.name for p in purelib.iterdir())
    assert "neoxlite" in installed and "quant" not in installed and "app" not in installed, installed
    assert {"quant", "app", "demo", "offload"} <= {p.name for p in (purelib / "neoxlite").iterdir()}

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = run(python, "-c", "import neoxlite, neoxlite.app, neoxlite.quant; print(neoxlite.__file__)", cwd=work, env=env)
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout
    assert run(venv / "bin" / "neoxlite", "--version", cwd=work, env=env).stdout.strip() == (
        f"neoxlite {version('neoxlite')}")
    generated = run(venv / "bin" / "neoxlite", "generate", "def add(a, b):", "--max-new-tokens", "8", cwd=work,
                    env=env)
    assert generated.stdout.startswith("def add(a, b):") and " tok/s]" in generated.stderr, generated.stderr
