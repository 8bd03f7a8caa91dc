"""The package's import graph: arrows point down, between groups (commands -> aot -> training ->
model, data, workdir -> config) and inside the model (flow -> backbones -> layers).

Read from the source (every `import` statement, lazy ones in functions included), so it costs
no imports and names the offending module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
from conftest import REPO

PACKAGE = "eiw_flow_jax"
BACKBONES = f"{PACKAGE}.model.backbones"

# What each group of the package may import besides itself (the top-level modules `main`,
# `convert`, `table`, `prepare` are the commands' `python -m` entry points).
ALLOWED = {
    "config": set(),
    "host": set(),
    "model": {"config"},
    "data": {"config"},
    "workdir": {"config"},
    "training": {"config", "model", "data", "workdir"},
    "aot": {"config", "model", "data", "training"},
    "commands": {"config", "model", "data", "workdir", "training", "aot", "host"},
    # The package itself (its lazily loaded public names) and the commands' entry points.
    "": {"commands", "host", "config", "model", "training"},
}


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
        submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(files)
        # `from pkg import mod` uses mod; pkg's __init__ (a docstring) only when names come from it
        found.update(submodules or {node.module})
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
  assert any(map(is_backbone, graph)) and f"{PACKAGE}.model.bijectors" in graph
  assert upward_imports(graph) == [], (
      "a module the backbones import leads back into eiw_flow_jax/backbones/: move it into the "
      "backbone that owns it, or keep it free of backbone imports"
  )


def group(name: str) -> str:
  """`eiw_flow_jax.training.train_loop` -> "training"; the package's own modules -> ""."""
  parts = name.split(".")
  if parts[-1] == "__main__":  # `python -m eiw_flow_jax.aot`: an entry point, like main.py
    return ""
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def wrong_groups(graph: dict[str, set[str]]) -> list[str]:
  """'module -> module' for each import from a group into one it may not use."""
  out = []
  for name in sorted(graph):
    for used in sorted(graph[name]):
      here, there = group(name), group(used)
      if there != here and there not in ALLOWED[here]:
        out.append(f"{name} -> {used}")
  return out


def test_groups_import_only_what_they_may():
  graph = import_graph(pathlib.Path(REPO))
  assert {group(name) for name in graph} == set(ALLOWED)
  assert wrong_groups(graph) == [], (
      "an import against the layering of docs/architecture.md (e.g. the model never imports "
      "training; config imports nothing of the package)"
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
                "model/__init__.py": "",
                "model/backbones/__init__.py": "",
                "model/backbones/denseflow.py": "from eiw_flow_jax.model.dequantizers import V\n",
                "model/backbones/nets.py": "",
                "model/dequantizers.py": "from eiw_flow_jax.model.backbones import nets\n",
                "model/bijectors.py": "",
            },
            ["eiw_flow_jax.model.backbones.denseflow -> eiw_flow_jax.model.dequantizers"],
            [],
        ),
        (
            {
                "model/__init__.py": "",
                "model/backbones/__init__.py": "",
                "model/backbones/glow.py": "import eiw_flow_jax.model.bijectors\n",
                "model/bijectors.py": "def f():\n  from eiw_flow_jax.model import flow\n",
                "model/flow.py": "from eiw_flow_jax.model.backbones import glow\n",
            },
            ["eiw_flow_jax.model.backbones.glow -> eiw_flow_jax.model.bijectors"],
            ["eiw_flow_jax.model.backbones.glow", "eiw_flow_jax.model.bijectors",
             "eiw_flow_jax.model.flow"],
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


def test_the_group_check_catches_a_model_importing_training(tmp_path):
  files = {"__init__.py": "", "model/__init__.py": "", "training/__init__.py": "",
           "model/flow.py": "def f():\n  from eiw_flow_jax.training import train_loop\n",
           "training/train_loop.py": "from eiw_flow_jax.model import flow\n"}
  for relative, text in files.items():
    file = tmp_path / PACKAGE / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
  assert wrong_groups(import_graph(tmp_path)) == [
      "eiw_flow_jax.model.flow -> eiw_flow_jax.training.train_loop"]
