"""An executed notebook as one self-contained web page (nbconvert), e.g. the report to share.

The page is JupyterLab's light rendering of the notebook's Markdown and displayed outputs (tables,
figures, Markdown, errors) without the code and without printed text (stdout / stderr: logs and
local paths, which stay in the notebook). Figures are embedded as `data:` URIs, styles are inline,
and no script is fetched (require.js, MathJax and mermaid, which nbconvert loads from a CDN, are
left out: the report has no widgets, math or diagrams), so the page opens offline, from a mail
attachment or a file share. A figure's alternative text is its `alt` metadata
(`IPython.display.Image(..., alt=...)`), which nbconvert's lab template would drop.
"""
from __future__ import annotations

from pathlib import Path

from .io import atomic_path

_TEMPLATE = "glad_page.html.j2"
_NO_CDN = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block data_png scoped -%}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
 alt="{{ ((output | get_metadata('alt', 'image/png')) or '') | escape_html }}">
</div>
{%- endblock data_png -%}
"""


def write_html(notebook: str | Path) -> Path:
    """Render the executed `notebook` as `<notebook>.html` beside it (written atomically); returns its path."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"no executed notebook at {notebook}: execute it first (python -m glad_core.batch "
                                f"... --report writes the report's)")
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.output_type != "stream"]
    exporter = HTMLExporter(extra_loaders=[DictLoader({_TEMPLATE: _NO_CDN})], template_file=_TEMPLATE,
                            exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    resources = {"metadata": {"name": notebook.stem, "path": str(notebook.parent)}}
    html, _ = exporter.from_notebook_node(nb, resources=resources)
    path = notebook.with_suffix(".html")
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path
