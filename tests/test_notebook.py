"""notebooks/explore_store.ipynb runs top to bottom (nbclient, a real ipykernel) on a
demo-like store built here, so it cannot rot; and it is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from fixtures.feature_stores import write_demo_like_store
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_store.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_on_a_demo_store(tmp_path, monkeypatch):
    root = write_demo_like_store(tmp_path)
    monkeypatch.setenv("PATHRAY_STORE", str(root))
    monkeypatch.setenv("PATHRAY_MODEL", "kaiko-vits16")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # PCA scatter, thumbnail with tiles, heatmap
    text = "".join(o.get("text", "") for o in outputs)
    assert "tile polygons; hottest tile:" in text and "synthetic-a" in str(outputs)
