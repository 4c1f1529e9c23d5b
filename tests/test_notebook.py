"""examples/quickstart.ipynb runs headless, top to bottom, on its tiny model (the default), offline."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_on_the_tiny_model(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("ICLGD_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("ICLGD_DATA_DIR", str(data_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "-> OK" in text  # the dual form held on the model object
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the per-layer plot was drawn
