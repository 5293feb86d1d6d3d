"""Build a static HTML rendering of the walkthrough: one page a notebook, as committed, and an index in notebook order.

    python scripts/build_site.py build/site        # then open build/site/index.html (file:// is fine)

Offline and self-contained: nbconvert's lab template without its CDN scripts (require.js, MathJax, mermaid, the
widget manager), every figure embedded as a data URI (outputs and `![](../figures/...)` alike), LaTeX turned into
MathML (which browsers draw natively), and each widget shown as the figure it drew when the notebook was executed
(`tasks.py notebooks` stores that figure next to the widget view). Nothing is executed here.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
import sys
from pathlib import Path

import latex2mathml.converter
import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer

ROOT = Path(__file__).resolve().parent.parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# The lab template, minus every script it would fetch from a CDN, plus a navigation bar.
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_css -%}<style>math { font-size: 1.12em; } math[display="block"] { margin: 0.6em 0; }</style>
{%- endblock html_head_css -%}
{%- block body_header -%}
{{ super() }}
<nav class="site-nav" style="padding: 8px 0 16px; font-family: sans-serif">{{ resources.site_nav }}</nav>
{%- endblock body_header -%}
{%- block body_footer -%}
<nav class="site-nav" style="padding: 16px 0; font-family: sans-serif">{{ resources.site_nav }}</nav>
{{ super() }}
{%- endblock body_footer -%}
"""


def mathml(latex: str, display: str) -> str:
    try:
        return latex2mathml.converter.convert(html.unescape(latex), display=display)
    except Exception:                                   # noqa: BLE001 - show what cannot be converted as TeX
        return f"<code>{latex}</code>"


# nbconvert's markdown renderer leaves $...$ for MathJax to typeset in the browser; here it becomes MathML.
IPythonRenderer.inline_math = lambda self, body: mathml(body, "inline")
IPythonRenderer.block_math = lambda self, body: mathml(body, "block")
IPythonRenderer.latex_environment = lambda self, name, body: mathml(
    f"\\begin{{{name}}}{body}\\end{{{name}}}", "block")


def attach_images(cell: nbformat.NotebookNode, folder: Path) -> None:
    """`![alt](../figures/x.png)` in a markdown cell becomes an attachment, which nbconvert embeds.

    (nbconvert's own `embed_images` reads only files under the notebook's folder, and figures/ is beside it.)
    """
    def attach(match: re.Match) -> str:
        path = (folder / match.group(2)).resolve()
        mime = mimetypes.guess_type(path.name)[0]
        if not path.is_file() or not path.is_relative_to(ROOT) or not (mime or "").startswith("image/"):
            return match.group(0)
        cell.setdefault("attachments", {})[path.name] = {mime: base64.b64encode(path.read_bytes()).decode()}
        return f"![{match.group(1)}](attachment:{path.name})"

    cell.source = re.sub(r"!\[([^\]]*)\]\(([^):\s]+)\)", attach, cell.source)


def static_outputs(nb: nbformat.NotebookNode, folder: Path) -> nbformat.NotebookNode:
    """Each widget output keeps only its static figure (or nothing), the widget state goes, local images attached."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            attach_images(cell, folder)
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                if "image/png" in data:
                    data.pop("text/plain", None)        # the widget's repr, "interactive(children=(IntSlider(..."
    return nb


def title_of(nb: nbformat.NotebookNode, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.MULTILINE)
            if match:
                return match.group(1).strip()
    return fallback


def nav(pages: list[tuple[str, str]], i: int) -> str:
    links = ['<a href="index.html">index</a>']
    if i > 0:
        links.append(f'<a href="{pages[i - 1][0]}">&larr; {html.escape(pages[i - 1][1])}</a>')
    if i + 1 < len(pages):
        links.append(f'<a href="{pages[i + 1][0]}">{html.escape(pages[i + 1][1])} &rarr;</a>')
    return " &nbsp;|&nbsp; ".join(links)


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    notebooks = [nbformat.read(path, as_version=4) for path in paths]
    pages = [(f"{path.stem}.html", title_of(nb, path.stem)) for path, nb in zip(paths, notebooks)]
    exporter = HTMLExporter(template_file="site.html.j2", extra_loaders=[DictLoader({"site.html.j2": TEMPLATE})],
                            embed_images=True, exclude_input_prompt=False)
    written = []
    for i, (path, nb) in enumerate(zip(paths, notebooks)):
        resources = {"metadata": {"name": pages[i][1], "path": str(path.parent)}, "site_nav": nav(pages, i)}
        body, _ = exporter.from_notebook_node(static_outputs(nb, path.parent), resources=resources)
        # links between notebooks point at their pages
        body = re.sub(r'href="(\d\d_[A-Za-z0-9_]+)\.ipynb(#[^"]*)?"', r'href="\1.html\2"', body)
        target = out / pages[i][0]
        target.write_text(body, encoding="utf-8")
        written.append(target)
    items = "\n".join(f'<li><a href="{page}">{html.escape(title)}</a></li>' for page, title in pages)
    index = out / "index.html"
    index.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Mistral 7B and Mixtral 8x7B from scratch</title></head>
<body style="font-family: sans-serif; max-width: 52em; margin: 2em auto; line-height: 1.5">
<h1>Mistral 7B and Mixtral 8x7B from scratch</h1>
<p>The walkthrough's notebooks, rendered as committed (executed by <code>python3 tasks.py notebooks</code>). Interactive
widgets show the figure they drew; run the notebooks in JupyterLab (<code>python3 tasks.py lab</code>) to move them.</p>
<ul class="notebooks" style="list-style: none; padding-left: 0">
{items}
</ul>
</body></html>
""", encoding="utf-8")
    return [index, *written]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "site"
    for page in build(target.resolve()):
        print(page.relative_to(ROOT) if page.is_relative_to(ROOT) else page)
