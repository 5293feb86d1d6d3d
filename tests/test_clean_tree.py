"""A clean tree on any CPU: `tasks.py setup` and `tasks.py test` run the notebooks with their figures under build/
(figures drawn on another CPU differ by a few pixels, so they must not overwrite the committed ones), and each fails,
naming the files, when its runs changed the working tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tasks  # noqa: E402


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git repository with two committed files and an ignored build/, standing in for the checkout."""
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("build/\n")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"committed")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(tasks, "ROOT", tmp_path)
    return tmp_path


def test_an_untouched_tree_passes(repo):
    before = tasks.tree_state()
    (repo / "build").mkdir()
    (repo / "build" / "a.png").write_bytes(b"drawn here")                  # ignored: where the runs draw
    assert before == {}
    tasks.check_tree_unchanged(before, "the runs")


@pytest.mark.parametrize("change", ["modify", "add", "delete", "modify-again"])
def test_a_changed_tree_fails_naming_the_file(repo, change):
    if change == "modify-again":                                           # dirty before, changed once more
        (repo / "figures" / "a.png").write_bytes(b"edited by hand")
    before = tasks.tree_state()
    path = repo / "figures" / ("b.png" if change == "add" else "a.png")
    if change == "delete":
        path.unlink()
    else:
        path.write_bytes(b"a few pixels off")
    with pytest.raises(SystemExit, match=r"the runs changed the working tree[\s\S]*figures/(a|b)\.png"):
        tasks.check_tree_unchanged(before, "the runs")


def test_a_file_dirty_before_and_left_alone_passes(repo):
    (repo / "figures" / "a.png").write_bytes(b"edited by hand")
    tasks.check_tree_unchanged(tasks.tree_state(), "the runs")


def test_setup_draws_every_notebook_under_build_and_checks_the_tree(monkeypatch):
    calls = []
    for name in ("install", "install_reference", "fetch", "trust"):
        monkeypatch.setattr(tasks, name, lambda *args, name=name: calls.append(name))
    monkeypatch.setattr(tasks, "execute", lambda path, out, figures=None: calls.append((path.name, out, figures)))
    monkeypatch.setattr(tasks, "tree_state", lambda: calls.append("tree_state") or {})
    monkeypatch.setattr(tasks, "check_tree_unchanged", lambda before, what: calls.append("checked"))
    tasks.setup()
    runs = [c for c in calls if isinstance(c, tuple)]
    assert [name for name, _, _ in runs] == [p.name for p in tasks.notebook_paths()]
    build = ROOT / "build"
    assert all(figures == tasks.SETUP_FIGURES and figures.is_relative_to(build) and out.is_relative_to(build)
               for _, out, figures in runs)
    assert "install_reference" in calls and calls.index("tree_state") < calls.index(runs[0]) < calls.index("checked")


def test_the_test_task_draws_under_build_and_checks_the_tree(monkeypatch):
    calls = []
    for name in ("fetch", "install_reference", "ensure_chromium"):
        monkeypatch.setattr(tasks, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(tasks, "tree_state", lambda: {})
    monkeypatch.setattr(tasks, "check_tree_unchanged", lambda before, what: calls.append("checked"))
    monkeypatch.setattr(tasks.subprocess, "run", lambda command, **kw: calls.append((command, kw["env"])))
    tasks.test()
    (command, env), = [c for c in calls if isinstance(c, tuple)]
    assert "pytest" in command and "--nbval-lax" in command
    assert Path(env["MISTRAL_TUTORIAL_FIGURES"]) == tasks.TEST_FIGURES and tasks.TEST_FIGURES.is_relative_to(ROOT / "build")
    assert calls[-1] == "checked" and "install_reference" in calls
