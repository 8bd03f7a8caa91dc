"""Notebooks are valid JSON notebooks whose code cells parse, each runs top to bottom without
TPU probing noise, and their setup cell works wherever a notebook is opened."""

from __future__ import annotations

import ast
import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import JAX_IMPORT_VARIABLES, REPO

from eiw_flow_jax.host import platform as host_platform

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Text each notebook prints when it ran through.
EXPECTED_OUTPUT = {
    "quickstart.ipynb": ("test bpd after 20 steps", "max |decode(encode(y)) - y|"),
    "explore.ipynb": ("test bpd: ", "test bpd at the bins' midpoints: ", "level 0: order"),
}
# Text every notebook prints: where the package and the paths come from, and the device.
SETUP_OUTPUT = (f"relative paths resolve against REPO_ROOT = {REPO}\n", " on 1 CPU device(s): ")
# What JAX and libtpu print when they look for TPU chips that are not there.
TPU_NOISE = ("Unable to initialize backend 'tpu'", "No jellyfish device",
             "unexpected worker hostname")


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
  """Every cell runs in a fresh kernel, in the checkout (the setup cell finds the package and
  installs nothing). JAX_PLATFORMS is unset, as a user's is: with libtpu installed (the `tpu`
  extra) and no TPU, no TPU probing noise reaches the notebook."""
  import nbclient
  import nbformat

  repo = str(path.parents[1])
  monkeypatch.setenv("EIW_FLOW_NOTEBOOK_SMALL", "1")
  for variable in JAX_IMPORT_VARIABLES:  # as in a user's shell: see conftest
    monkeypatch.delenv(variable, raising=False)
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
  for expected in (*SETUP_OUTPUT, *EXPECTED_OUTPUT[path.name]):
    assert expected in outputs, outputs[-2000:]
  assert not tpu_noise(outputs), outputs[-3000:]
  # Every cell that draws a figure shows it inline, as a PNG.
  for cell in notebook.cells:
    if cell.cell_type == "code" and "plt.show()" in cell.source:
      kinds = [kind for out in cell.get("outputs", []) for kind in out.get("data", {})]
      assert "image/png" in kinds, (cell.source[:200], cell.get("outputs"))


# ----------------------------------------------------------------------------------------------
# The setup cell (each notebook's first code cell) where a notebook may be opened: in a checkout
# (the runs above), where the package is installed but there is no checkout, and in Colab with
# SOURCE naming a git URL, a wheel or an archive (installs mocked: no network, nothing installed).

def setup_cell(path: Path = NOTEBOOKS[0]) -> str:
  notebook = json.loads(path.read_text())
  return "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])


def test_every_notebook_has_the_same_setup_cell():
  assert len({setup_cell(path) for path in NOTEBOOKS}) == 1
  assert 'SOURCE = ""  # @param {type:"string"}' in setup_cell()  # Colab shows it as a form


# Runs the setup cell with `subprocess.run` and, unless `installed`, the lookup of eiw_flow_jax
# replaced: pip installs "happen" by putting the installed tree (or the unzipped wheel) first on
# sys.path, `git clone` copies a prepared tree. Prints the commands, REPO_ROOT and where
# eiw_flow_jax then imports from.
_DRIVER = r"""
import importlib.util, json, pathlib, shutil, subprocess, sys, zipfile

cell_file, mode, tree, gpu = sys.argv[1:5]
calls, site = [], pathlib.Path("site").resolve()
installed = mode == "installed"
real_find_spec, real_which = importlib.util.find_spec, shutil.which


def find_spec(name, package=None):
  return None if name == "eiw_flow_jax" and not installed else real_find_spec(name, package)


def run(cmd, check=False, **kwargs):
  global installed
  cmd = [str(c) for c in cmd]
  calls.append(cmd)
  assert mode != "installed", f"nothing to install, but it ran {cmd}"
  if cmd[0] == "git":
    shutil.copytree(tree, cmd[-1])
  else:
    target = next(a for a in cmd[4:] if not a.startswith("-")).split("[")[0]
    if target.endswith(".whl"):
      with zipfile.ZipFile(target) as z:
        z.extractall(site)
      target = str(site)
    sys.path.insert(0, target)
    installed = True
  return subprocess.CompletedProcess(cmd, 0)


importlib.util.find_spec = find_spec
subprocess.run = run
shutil.which = lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" and gpu == "1" else (
    None if name == "nvidia-smi" else real_which(name))
namespace = {"__name__": "__main__"}
exec(compile(open(cell_file).read(), "setup_cell", "exec"), namespace)
origin = pathlib.Path(real_find_spec("eiw_flow_jax").origin).parent
print("RESULT " + json.dumps({"calls": calls, "repo_root": str(namespace["REPO_ROOT"]),
                              "package": str(origin)}))
"""


def run_setup_cell(tmp_path: Path, mode: str, source: str = "", gpu: bool = False,
                   tree: Path | None = None, env: dict | None = None):
  """The setup cell with SOURCE set as Colab's form sets it, run in `tmp_path`."""
  cell = setup_cell().replace('SOURCE = ""', f"SOURCE = {source!r}", 1)
  (tmp_path / "cell.py").write_text(cell)
  (tmp_path / "driver.py").write_text(_DRIVER)
  return subprocess.run(
      [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cell.py"), mode,
       str(tree or ""), "1" if gpu else "0"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def result_of(process) -> dict:
  assert process.returncode == 0, process.stderr[-3000:]
  (line,) = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
  """What a clone or an archive of the repository holds, as far as installing it goes."""
  tree = tmp_path_factory.mktemp("clone") / "eiw_flow_jax"
  tree.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "constraints.txt", "requirements.txt"):
    shutil.copy(Path(REPO) / name, tree / name)
  shutil.copytree(Path(REPO) / "eiw_flow_jax", tree / "eiw_flow_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  return tree


def test_setup_cell_with_the_package_installed_and_no_checkout(tmp_path, env):
  result = result_of(run_setup_cell(tmp_path, "installed", env=env))
  assert result["calls"] == []
  assert result["repo_root"] == str(tmp_path)
  assert result["package"] == os.path.join(REPO, "eiw_flow_jax")


def test_setup_cell_in_a_checkout_whose_package_is_not_installed(tmp_path, source_tree, env):
  """Jupyter started from another Python than the project's: the checkout, installed editable."""
  root = tmp_path / "eiw_flow_jax"
  shutil.copytree(source_tree, root)
  (root / "notebooks").mkdir()
  result = result_of(run_setup_cell(root / "notebooks", "colab", env=env))
  constraints = root / "constraints.txt"
  assert result["calls"] == [
      [sys.executable, "-m", "pip", "install", "-q", "-e", str(root), "-c", str(constraints)]]
  assert result["repo_root"] == str(root)
  assert result["package"] == str(root / "eiw_flow_jax")


def test_setup_cell_outside_a_checkout_without_source_says_what_to_set(tmp_path, env):
  process = run_setup_cell(tmp_path, "colab", env=env)
  assert process.returncode == 1
  assert ("eiw_flow_jax is not installed and this notebook is not in a checkout: set SOURCE"
          in process.stderr), process.stderr[-2000:]


def data_files_dir() -> str:
  """Where setup.cfg installs constraints.txt (`[options.data_files]`)."""
  parser = configparser.ConfigParser()
  parser.read(Path(REPO) / "setup.cfg")
  (folder,) = [k for k, v in parser["options.data_files"].items() if v.strip() == "constraints.txt"]
  return folder


@pytest.mark.parametrize("kind", ["git", "archive", "wheel", "wheel_on_gpu"])
def test_setup_cell_in_colab_installs_source_with_the_pinned_versions(
    kind, tmp_path, source_tree, env):
  colab = tmp_path / "content"  # Colab's working folder
  colab.mkdir()
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  if kind == "git":
    source = "https://example.invalid/someone/eiw_flow_jax.git"
    root = colab / "eiw_flow_jax"
  elif kind == "archive":  # e.g. GitHub's "Download ZIP", uploaded
    source = "eiw_flow_jax-main.tar.gz"
    with tarfile.open(colab / source, "w:gz") as archive:
      archive.add(source_tree, arcname="eiw_flow_jax-main")
    root = colab / "eiw_flow_jax-main_src" / "eiw_flow_jax-main"
  else:  # laid out as `pip wheel .` builds it: the package and setup.cfg's data files
    source = str(colab / "eiw_flow_jax-0.1.0-py3-none-any.whl")
    with zipfile.ZipFile(source, "w") as wheel:
      for file in sorted((source_tree / "eiw_flow_jax").rglob("*.py")):
        wheel.write(file, file.relative_to(source_tree).as_posix())
      wheel.write(source_tree / "constraints.txt",
                  f"eiw_flow_jax-0.1.0.data/data/{data_files_dir()}/constraints.txt")
  result = result_of(run_setup_cell(colab, "colab", source, gpu=kind == "wheel_on_gpu",
                                    tree=source_tree, env=env))
  if kind.startswith("wheel"):
    extra = "[cuda12]" if kind == "wheel_on_gpu" else ""
    constraints = colab / "eiw_flow_jax_constraints.txt"
    assert result["calls"] == [[*pip, source + extra, "-c", str(constraints)]]
    assert constraints.read_text() == (Path(REPO) / "constraints.txt").read_text()
    assert result["repo_root"] == str(colab)
    assert result["package"] == str(colab / "site" / "eiw_flow_jax")
    return
  install = [*pip, str(root), "-c", str(root / "constraints.txt")]
  clone = [["git", "clone", "--depth=1", source, str(root)]] if kind == "git" else []
  assert result["calls"] == [*clone, install]
  assert result["repo_root"] == str(root)
  assert result["package"] == str(root / "eiw_flow_jax")


def tpu_noise(text: str) -> list[str]:
  return [line for line in text.splitlines() if any(noise in line for noise in TPU_NOISE)]


def test_setup_cell_keeps_jax_from_probing_for_absent_tpus(tmp_path, user_env):
  """With libtpu installed (the `tpu` extra, as the README's test command installs it) and no
  TPU, JAX started after the setup cell prints nothing about TPUs; started without it, it does
  (the control: otherwise this test would check nothing)."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (the `tpu` extra), so nothing probes for TPUs")
  if host_platform.default_platform({}) != "cpu":
    pytest.skip("an accelerator is attached here: JAX is meant to use it")
  probe = "import jax; print(jax.devices()[0].platform)"
  control = subprocess.run([sys.executable, "-c", probe], env=user_env, capture_output=True,
                           text=True, timeout=120)
  assert tpu_noise(control.stderr), control.stderr[-2000:]
  (tmp_path / "cell.py").write_text(setup_cell() + "\n" + probe + "\n")
  process = subprocess.run([sys.executable, str(tmp_path / "cell.py")],
                           cwd=Path(REPO) / "notebooks", env=user_env, capture_output=True,
                           text=True, timeout=120)
  assert process.returncode == 0, process.stderr[-3000:]
  assert process.stdout.splitlines()[-1] == "cpu"
  assert not tpu_noise(process.stderr), process.stderr[-3000:]


def test_explore_resolves_a_relative_workdir_against_the_repository_root(tmp_path):
  """The README's `workdirs/digits`, given while the notebook runs in notebooks/."""
  notebook = json.loads((Path(REPO) / "notebooks" / "explore.ipynb").read_text())
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"][:2]
  source = "\n".join(line for c in code for line in "".join(c["source"]).splitlines()
                     if not line.lstrip().startswith("%"))
  (tmp_path / "cells.py").write_text(source + "\nprint('WORKDIR', WORKDIR)\n")
  env = {**os.environ, "EIW_FLOW_EXPLORE_WORKDIR": "workdirs/digits", "MPLBACKEND": "agg",
         "PYTHONPATH": REPO}
  process = subprocess.run([sys.executable, str(tmp_path / "cells.py")],
                           cwd=Path(REPO) / "notebooks", env=env, capture_output=True, text=True,
                           timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  assert f"WORKDIR {os.path.join(REPO, 'workdirs', 'digits')}" in process.stdout
