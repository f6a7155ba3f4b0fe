"""Every notebook, executed end to end on the bundled model as a reader would run it: no error
output, at least two figures (PNG images), the lines that carry its story printed; each executed
notebook is rendered to HTML as ``<results>/notebooks/<name>.html`` so a reader sees it without
Jupyter (``<results>``: the folder in ``HEADSCOPE_RESULTS_DIR``, else ``results/`` at the
repository root). The notebooks are committed without outputs."""

import os
import re
from pathlib import Path

import pytest

from headscope.files import atomic_write_text

pytestmark = pytest.mark.repro

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
MIN_FIGURES = 2
# Lines each notebook's story prints (its key results), checked in the stream output.
KEY_LINES = {
    "atlas_tour.ipynb": ["atlas computed in", "Head atlas of", "loss on repeated tokens (nats): difference", "report.html",
                         "rerun:"],
    "induction_heads.ipynb": ["induction        top heads", "attends most to", "top-3 ablated", "top-3 induction ablated"],
    "memory_context_heads.ipynb": ["context heads (most positive)", "memory heads (most negative)",
                                   "held out, share preferring the context answer", "difference (top - random effect)"],
    "retrieval_heads.ipynb": ["top retrieval heads", "attends most to", "top-10 retrieval vs top-10 induction",
                              "difference (top - random effect)"],
    "safety_heads.ipynb": ["top Ships (KL)", "attack success clean", "harmless requests answered", "changed-by-tuning rank",
                           "SelectionStability(", "refusal direction: layer", "refusal direction ablated"],
    "select_and_copy.ipynb": ["the model states the answer", "letter logits: dev", "qk_end:", "random dev splits"],
    "successor_heads.ipynb": ["effective OV:", "top effective OV head", "numerals: leave-one-out", "edits land on"],
}


def results_folder() -> Path:
    """Where the HTML renderings go: ``$HEADSCOPE_RESULTS_DIR/notebooks`` or ``<repo>/results/notebooks``."""
    return Path(os.environ.get("HEADSCOPE_RESULTS_DIR") or ROOT / "results") / "notebooks"


def code_outputs(notebook) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def figures(outputs: list) -> list:
    """Outputs that display a PNG image (what ``plt.show()`` and a returned figure produce)."""
    return [o for o in outputs if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


# nbconvert's lab template, less the scripts it would fetch from a CDN when the page is opened
# (require.js, MathJax): the rendering is read offline, and the notebooks need neither.
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
"""


def render_html(notebook, path: Path) -> Path:
    """The executed notebook as one self-contained HTML page (nothing fetched when opened),
    written atomically."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2")
    body, _ = exporter.from_notebook_node(notebook)
    fetched = re.findall(r"""<(?:script|link|img)[^>]+(?:src|href)=["']?(https?://[^"' >]+)""", body)
    assert not fetched, f"the HTML rendering of the notebook would fetch {fetched[:3]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, body)


def test_every_notebook_is_executed():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(KEY_LINES)


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        assert not code_outputs(notebook), f"{path.name} has outputs: clear them (jupyter nbconvert --clear-output)"


@pytest.mark.parametrize("name", sorted(KEY_LINES))
def test_notebook_runs_with_figures_and_renders_to_html(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:  # a failed run is rendered too: its HTML shows where it stopped
        render_html(notebook, results_folder() / f"{Path(name).stem}.html")
    outputs = code_outputs(notebook)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len(figures(outputs)) >= MIN_FIGURES
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    print(text)
    assert [line for line in KEY_LINES[name] if line not in text] == []
