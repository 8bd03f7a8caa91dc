"""Notebooks are valid JSON notebooks whose code cells parse, and each runs top to bottom."""

import ast
import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Text each notebook prints when it ran through.
EXPECTED_OUTPUT = {
    "quickstart.ipynb": ("test bpd after 20 steps", "max |decode(encode(y)) - y|"),
    "explore.ipynb": ("test bpd: ", "test bpd at the bins' midpoints: ", "level 0: order"),
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_parse(path):
  notebook = json.loads(path.read_text())
  assert notebook["nbformat"] == 4
  for cell in notebook["cells"]:
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"]).splitlines()
    lines = [line for line in source if not line.lstrip().startswith(("!", "%"))]
    ast.parse("\n".join(lines))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat_with_cell_ids(path):
  """nbformat 4.5 requires unique cell ids; nbformat warns of missing ones (a future error)."""
  import nbformat

  notebook = json.loads(path.read_text())
  ids = [cell.get("id") for cell in notebook["cells"]]
  assert all(ids) and len(set(ids)) == len(ids), ids
  nbformat.validate(nbformat.reads(path.read_text(), as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
  """Every cell runs in a fresh kernel (the install cell finds the package and skips itself)."""
  import nbclient
  import nbformat

  repo = str(path.parents[1])
  monkeypatch.setenv("EIW_FLOW_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("MPLBACKEND", "agg")
  notebook = nbformat.read(str(path), as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()
  outputs = "".join(
      out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
      for out in cell.get("outputs", [])
  )
  for expected in EXPECTED_OUTPUT[path.name]:
    assert expected in outputs, outputs[-2000:]
  # Every cell that draws a figure shows it inline, as a PNG.
  for cell in notebook.cells:
    if cell.cell_type == "code" and "plt.show()" in cell.source:
      kinds = [kind for out in cell.get("outputs", []) for kind in out.get("data", {})]
      assert "image/png" in kinds, (cell.source[:200], cell.get("outputs"))
