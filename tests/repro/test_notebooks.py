"""Notebooks that CI executes end to end on the bundled model."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.repro

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.parametrize("name", ["memory_context_heads.ipynb", "retrieval_heads.ipynb", "successor_heads.ipynb",
                                  "safety_heads.ipynb", "select_and_copy.ipynb"])
def test_notebook_runs_without_errors(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    print(text)
    expected = {"memory_context_heads.ipynb": ["memory heads", "steer to context"],
                "retrieval_heads.ipynb": ["retrieval head L", "top-10 retrieval vs top-10 induction", "random-5 masked"],
                "successor_heads.ipynb": ["effective OV", "zero ablation of k=1", "numerals: leave-one-out", "edits succeed"],
                "safety_heads.ipynb": ["organism refuses", "top Ships heads", "attack success: clean", "changed-by-tuning rank"],
                "select_and_copy.ipynb": ["option-end token", "the model knows", "qk_end: L", "world qk_end"]}
    assert all(phrase in text for phrase in expected[name])
