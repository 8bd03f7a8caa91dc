"""Parameter names are the backbones' own: nothing outside `eiw_flow_jax/model/backbones/` (and
the layer module that names a Glow step's layers) parses them or reaches into a backbone's
private members; the rest of the package goes through `Flow` and the backbone interface.

Read from the source (string literals, f-string templates, attribute names), so it costs no
imports and names the offending line.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
from conftest import REPO

PACKAGE = pathlib.Path(REPO) / "eiw_flow_jax"
BACKBONES = PACKAGE / "model" / "backbones"
# Modules allowed to spell parameter names: the backbones, and the layers that own a name.
OWNERS = (BACKBONES, PACKAGE / "model" / "bijectors.py")

# A number inside a name: a digit, a regex's \d, or an f-string's {...} (templates keep "{}").
_N = r"(?:\d|\\d|\{\})"
NAME_PATTERNS = {
    "a Glow step or split name": re.compile(rf"level{_N}+[+*]?_(?:step|split)"),
    "a Glow step's layer name": re.compile(rf"layers_{_N}"),
    "a DenseFlow module name": re.compile(rf"(?<![a-z_])(?:block|unit|transition|noise){_N}"),
    "a DenseFlow layer name": re.compile(rf"(?<![a-z_])layer{_N}+[+*]?_"),
    "a name suffix of a backbone's modules": re.compile(r"^_(?:steps?|split)$"),
}


def backbone_members(root: pathlib.Path) -> tuple[set[str], set[str]]:
  """(private methods of the backbones' classes, the submodules and parameters their setup
  assigns to `self`), read from `root`'s model/backbones/*.py."""
  private, attributes = set(), set()
  for file in (root / "eiw_flow_jax" / "model" / "backbones").glob("*.py"):
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      if not isinstance(node, ast.ClassDef):
        continue
      for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name.startswith("_") and not (
            item.name.startswith("__") and item.name.endswith("__")):
          private.add(item.name)
        if isinstance(item, ast.FunctionDef) and item.name == "setup":
          for target in ast.walk(item):
            if isinstance(target, ast.Attribute) and isinstance(target.ctx, ast.Store) and (
                isinstance(target.value, ast.Name) and target.value.id == "self"):
              attributes.add(target.attr)
  return private, attributes


def _docstrings(tree: ast.AST) -> set[int]:
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        out.add(id(body[0].value))
  return out


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, text) of every string literal but docstrings; f-strings as templates ("{}")."""
  skip = _docstrings(tree)
  in_fstrings = set()
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.JoinedStr):
      parts = []
      for value in node.values:
        if isinstance(value, ast.Constant):
          in_fstrings.add(id(value))
          parts.append(str(value.value))
        else:
          parts.append("{}")
      out.append((node.lineno, "".join(parts)))
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
        id(node) not in skip | in_fstrings):
      out.append((node.lineno, node.value))
  return out


def violations(root: pathlib.Path) -> list[str]:
  """'file:line: what' for each parameter name spelled, or backbone member reached, outside
  the owners, in `root`'s package."""
  package = root / "eiw_flow_jax"
  owners = [package / p.relative_to(PACKAGE) for p in OWNERS]
  private, attributes = backbone_members(root)
  out = []
  for file in sorted(package.rglob("*.py")):
    if any(file == owner or owner in file.parents for owner in owners):
      continue
    where = file.relative_to(root)
    tree = ast.parse(file.read_text(), str(file))
    for line, text in _strings(tree):
      for what, pattern in NAME_PATTERNS.items():
        if pattern.search(text):
          out.append(f"{where}:{line}: {what} in {text!r}")
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr in private:
        out.append(f"{where}:{node.lineno}: a backbone's private member .{node.attr}")
      elif isinstance(node, ast.Attribute) and node.attr in attributes and isinstance(
          node.value, ast.Name) and node.value.id in ("m", "module", "backbone"):
        out.append(f"{where}:{node.lineno}: a backbone's submodule "
                   f"{node.value.id}.{node.attr}")
  return sorted(out)


def test_nothing_outside_the_backbones_parses_parameter_names():
  private, attributes = backbone_members(pathlib.Path(REPO))
  assert {"_forward_pass", "_twin", "_stacked_variables"} <= private
  assert {"splits", "transitions", "top_prior"} <= attributes
  assert violations(pathlib.Path(REPO)) == [], (
      "parameter names or a backbone's internals used outside eiw_flow_jax/model/backbones: "
      "go through Flow (levels, split_permutations, migrate_layout, stacked_axis) or add a "
      "method to the backbone interface (model/backbones/base.py)"
  )


BACKBONE = """
class MultiScaleFlow:
  def setup(self):
    self.splits = []
    self.top_prior = None

  def _twin(self):
    return None
"""


@pytest.mark.parametrize("source, expected", [
    # What the train step did before the backbone interface: theta sliced out of names.
    ('def f(params):\n'
     '  return {int(n[len("level"):-len("_split")]): s["theta"] for n, s in params.items()\n'
     '          if n.startswith("level") and n.endswith("_split")}\n',
     ["2: a name suffix of a backbone's modules in '_split'",
      "3: a name suffix of a backbone's modules in '_split'"]),
    ('import re\nSTEPS = re.compile(r"\\[\'level\\d+_steps\'\\]")\n',
     ["2: a Glow step or split name in \"\\\\['level\\\\d+_steps'\\\\]\""]),
    ("def f(l, k):\n  return f'level{l}_step{k}', params['layers_2']\n",
     ["2: a Glow step or split name in 'level{}_step{}'",
      "2: a Glow step's layer name in 'layers_2'"]),
    ("def f(b, j):\n  return (f'block{b}', f'layer{j}_coupling', 'unit3')\n",
     ["2: a DenseFlow layer name in 'layer{}_coupling'",
      "2: a DenseFlow module name in 'block{}'",
      "2: a DenseFlow module name in 'unit3'"]),
    # What explore did: private members and submodules of the backbone.
    ("def walk(m, y):\n  return m._twin(), m.splits[0], m.top_prior\n",
     ["2: a backbone's private member ._twin",
      "2: a backbone's submodule m.splits",
      "2: a backbone's submodule m.top_prior"]),
    # Metric names and docstrings are not parameter names.
    ('"""level0_steps in a docstring"""\n'
     'def f(level, stats):\n'
     '  return f"perm_changed/level{level}", f"shuffle/level{level}", stats.splits\n', []),
])
def test_the_check_catches_parameter_names_and_private_members(tmp_path, source, expected):
  (tmp_path / "eiw_flow_jax" / "model" / "backbones").mkdir(parents=True)
  (tmp_path / "eiw_flow_jax" / "model" / "backbones" / "glow.py").write_text(BACKBONE)
  (tmp_path / "eiw_flow_jax" / "training").mkdir()
  (tmp_path / "eiw_flow_jax" / "training" / "step.py").write_text(source)
  found = violations(tmp_path)
  assert found == sorted(f"eiw_flow_jax/training/step.py:{e}" for e in expected)
