"""scripts/execute_notebook.py, what `tasks.py setup` and `tasks.py notebooks` run: its sliced polling keeps nbclient's
deadlines, and it executes a notebook (a widget cell among its cells) as nbclient does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import execute_notebook  # noqa: E402


class FakeChannel:
    """A channel whose message is there after `ready_after` seconds; each get_msg waits at most its timeout."""

    def __init__(self, ready_after: float) -> None:
        self.ready_at = time.monotonic() + ready_after
        self.timeouts: list[float | None] = []

    async def get_msg(self, timeout: float | None = None) -> dict:
        self.timeouts.append(timeout)
        wait = self.ready_at - time.monotonic()
        if timeout is not None and wait > timeout:
            await asyncio.sleep(timeout)
            raise Empty
        await asyncio.sleep(max(0.0, wait))
        return {"msg": "reply"}


def test_slices_are_short_and_the_message_still_arrives(monkeypatch):
    monkeypatch.setattr(execute_notebook, "SLICE_S", 0.05)
    channel = FakeChannel(ready_after=0.12)
    execute_notebook.poll_in_slices(channel)
    assert asyncio.run(channel.get_msg(timeout=5)) == {"msg": "reply"}
    assert len(channel.timeouts) >= 3 and all(t <= 0.05 for t in channel.timeouts)


def test_the_deadline_is_kept(monkeypatch):
    monkeypatch.setattr(execute_notebook, "SLICE_S", 0.05)
    channel = FakeChannel(ready_after=60)
    execute_notebook.poll_in_slices(channel)
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(channel.get_msg(timeout=0.18))
    assert 0.17 <= time.monotonic() - start < 1.0
    assert sum(channel.timeouts) == pytest.approx(0.18, abs=0.03)


def test_no_timeout_waits_in_slices_until_the_message(monkeypatch):
    monkeypatch.setattr(execute_notebook, "SLICE_S", 0.05)
    channel = FakeChannel(ready_after=0.12)
    execute_notebook.poll_in_slices(channel)
    assert asyncio.run(channel.get_msg()) == {"msg": "reply"}
    assert all(t == 0.05 for t in channel.timeouts)


def test_executes_a_notebook_with_a_widget_into_a_folder(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import ipywidgets\nprint('first')"),
        nbformat.v4.new_code_cell("ipywidgets.interact(lambda n: print(n * 2), n=ipywidgets.IntSlider(value=21));"),
        nbformat.v4.new_code_cell("print('last')"),
    ])
    source = tmp_path / "nb" / "demo.ipynb"
    source.parent.mkdir()
    nbformat.write(notebook, source)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "execute_notebook.py"), str(source), "--output-dir",
                    str(tmp_path / "out"), "--timeout", "120"], check=True, capture_output=True, text=True)
    executed = nbformat.read(tmp_path / "out" / "demo.ipynb", as_version=4)
    texts = ["".join(o.get("text", "")) for cell in executed.cells for o in cell.outputs]
    assert texts[0] == "first\n" and texts[-1] == "last\n"
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in executed.cells[1].outputs)
    assert nbformat.read(source, as_version=4).cells[0].outputs == []          # the source is left as it was


def test_runs_quietly_over_ipc_and_draws_where_it_is_told(tmp_path):
    """No kernel noise (ipykernel warns about TCP without encryption; the kernel runs over IPC), and a figure goes to
    $MISTRAL_TUTORIAL_FIGURES, which is how `tasks.py setup` and `test` keep figures/ as committed."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import matplotlib.pyplot as plt\nfrom mistral_tutorial import viz\nfig, ax = plt.subplots()\n"
        "ax.plot([0, 1])\nprint(viz.save_figure(fig, 'demo_line'))")])
    source = tmp_path / "demo.ipynb"
    nbformat.write(notebook, source)
    figures = tmp_path / "figures-here"
    env = {**os.environ, "MISTRAL_TUTORIAL_FIGURES": str(figures), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "execute_notebook.py"), str(source), "--output-dir",
                           str(tmp_path / "out"), "--timeout", "120"], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stderr == "", done.stderr
    assert (figures / "demo_line.png").is_file() and not (ROOT / "figures" / "demo_line.png").exists()
    executed = nbformat.read(tmp_path / "out" / "demo.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == str(figures / "demo_line.png")
