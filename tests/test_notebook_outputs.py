"""The committed notebooks are as `tasks.py notebooks` leaves them: normalised, so `tasks.py setup` leaves a clean tree,
with no stderr and no progress bars, and with a figure beside every widget view (what an untrusted notebook shows)."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

NOTEBOOKS = tasks.notebook_paths()


def outputs(nb: dict):
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            yield i, output


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs_are_normalised(path, tmp_path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    again = tmp_path / path.name
    tasks.write_notebook(tasks.normalize_notebook(copy.deepcopy(nb), path.stem), again)
    assert again.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
        f"{path.name} is not normalised: run `python3 tasks.py notebooks` before committing it")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_outputs_are_clean_and_widgets_have_figures(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, output in outputs(nb):
        assert not (output.get("output_type") == "stream" and output.get("name") == "stderr"), f"cell {i}: stderr"
        text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
        assert not re.search(r"\d+%\|", text), f"cell {i}: a progress bar: {text[:80]!r}"
        data = output.get("data", {})
        if tasks.WIDGET_VIEW in data:
            assert "image/png" in data, f"cell {i}: a widget view without its figure"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            for src in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", "".join(cell["source"])):
                if "://" not in src and not src.startswith("attachment:"):
                    assert (path.parent / src).resolve().is_file(), f"cell {i}: {src} is missing"
