"""The quickstart notebook runs top to bottom against the real local server (nbclient)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import SECRET

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(llama_server, monkeypatch):
    import nbformat  # the test extra: pip install -e '.[test]'
    from nbclient import NotebookClient

    monkeypatch.setenv("ANYSCALE_API_BASE", llama_server.base_url)
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    monkeypatch.setenv("ANYSCALE_MODEL", llama_server.alias)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()  # raises on the first failing cell
    outputs = "".join(
        str(output.get("text") or output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "Jupiter" in outputs and "ContextWindowExceededError" in outputs
