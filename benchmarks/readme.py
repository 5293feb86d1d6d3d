"""Write a benchmark's table into README.md between its markers, `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def update_readme(name: str, table: str) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    print(f"README.md: {name} table updated")
