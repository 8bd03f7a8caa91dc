"""Notebooks are valid JSON notebooks whose code cells parse (shell/magic lines aside)."""

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_is_a_notebook():
  assert NOTEBOOKS


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
