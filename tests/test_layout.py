"""The package's import graph: arrows point down, from the model to the backbones to the layers.

Read from the source (every `import` statement, lazy ones in functions included), so it costs
no imports and names the offending module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
from conftest import REPO

PACKAGE = "eiw_flow_jax"
BACKBONES = f"{PACKAGE}.backbones"


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (`from pkg import mod` counts as `pkg.mod`)."""
  files = {}
  for file in (root / PACKAGE).rglob("*.py"):
    parts = file.relative_to(root).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
  graph = {}
  for name, file in files.items():
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      if isinstance(node, ast.Import):
        found.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        found.add(node.module)
        found.update(f"{node.module}.{alias.name}" for alias in node.names)
    graph[name] = {m for m in found if m in files and m not in (name, PACKAGE)}
  return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph[todo.pop()] - seen:
      seen.add(nxt)
      todo.append(nxt)
  return seen


def is_backbone(name: str) -> bool:
  return name == BACKBONES or name.startswith(BACKBONES + ".")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """'backbone -> module' for each module a backbone uses that leads back into the backbones."""
  out = []
  for name in sorted(filter(is_backbone, graph)):
    for used in sorted(graph[name]):
      if not is_backbone(used) and any(map(is_backbone, reachable(graph, used) | {used})):
        out.append(f"{name} -> {used}")
  return out


def cycles(graph: dict[str, set[str]]) -> list[str]:
  return sorted(name for name in graph if name in reachable(graph, name))


def test_backbones_use_only_shared_layers():
  graph = import_graph(pathlib.Path(REPO))
  assert any(map(is_backbone, graph)) and f"{PACKAGE}.bijectors" in graph
  assert upward_imports(graph) == [], (
      "a module the backbones import leads back into eiw_flow_jax/backbones/: move it into the "
      "backbone that owns it, or keep it free of backbone imports"
  )


def test_no_import_cycles():
  assert cycles(import_graph(pathlib.Path(REPO))) == []


@pytest.mark.parametrize(
    "files, expected_upward, expected_cycles",
    [
        # The layout before this test: DenseFlow's dequantizer at the top level, importing from
        # the backbone that imports it.
        (
            {
                "backbones/__init__.py": "",
                "backbones/denseflow.py": "from eiw_flow_jax.dequantizers import V\n",
                "backbones/nets.py": "",
                "dequantizers.py": "from eiw_flow_jax.backbones import nets\n",
                "bijectors.py": "",
            },
            ["eiw_flow_jax.backbones.denseflow -> eiw_flow_jax.dequantizers"],
            [],
        ),
        (
            {
                "backbones/__init__.py": "",
                "backbones/glow.py": "import eiw_flow_jax.bijectors\n",
                "bijectors.py": "def f():\n  from eiw_flow_jax import model\n",
                "model.py": "from eiw_flow_jax.backbones import glow\n",
            },
            ["eiw_flow_jax.backbones.glow -> eiw_flow_jax.bijectors"],
            ["eiw_flow_jax.backbones.glow", "eiw_flow_jax.bijectors", "eiw_flow_jax.model"],
        ),
    ],
)
def test_the_checks_catch_wrong_arrows(tmp_path, files, expected_upward, expected_cycles):
  for relative, text in {"__init__.py": "", **files}.items():
    file = tmp_path / PACKAGE / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
  graph = import_graph(tmp_path)
  assert upward_imports(graph) == expected_upward
  assert cycles(graph) == expected_cycles
