"""The versions the project is tested with: constraints.txt pins them, the README's install and
CI use it, and compiler-output tests run only on the pinned jax/jaxlib (tests/conftest.py)."""

from __future__ import annotations

import os
import re

import pytest
from conftest import PINNED, REPO, pinned_versions, transparent_hugepage_mode
from packaging.requirements import Requirement
from packaging.version import Version


def _requirements() -> list[Requirement]:
  with open(os.path.join(REPO, "requirements.txt")) as f:
    lines = [line.split("#")[0].strip() for line in f]
  return [Requirement(line) for line in lines if line]


def test_every_requirement_is_pinned_within_its_lower_bound():
  missing, outside = [], []
  for requirement in _requirements():
    name = requirement.name.lower().replace("_", "-")
    if name not in PINNED:
      missing.append(name)
    elif not requirement.specifier.contains(Version(PINNED[name]), prereleases=True):
      outside.append(f"{name}=={PINNED[name]} ({requirement.specifier})")
  assert not missing, f"requirements.txt names packages constraints.txt does not pin: {missing}"
  assert not outside, f"pins outside requirements.txt's bounds: {outside}"
  assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"} <= set(PINNED)


def test_install_commands_use_the_constraints():
  readme = open(os.path.join(REPO, "README.md")).read()
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  installs = re.findall(r"pip install [^&\n]*", readme + ci)
  assert len(installs) >= 3, installs  # the two quick-start commands and CI's
  for install in installs:
    if "-r requirements.txt" in install:
      assert "-c constraints.txt" in install, install


def test_pinned_versions_reads_exact_pins_only(tmp_path):
  file = tmp_path / "constraints.txt"
  file.write_text("# comment\nJax==0.1.2\nml_collections==1.0  # note\nloose>=1\n\n")
  assert pinned_versions(str(file)) == {"jax": "0.1.2", "ml-collections": "1.0"}


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("garbled\n", ""),
])
def test_transparent_hugepage_mode(tmp_path, text, mode):
  file = tmp_path / "enabled"
  file.write_text(text)
  assert transparent_hugepage_mode(str(file)) == mode
  assert transparent_hugepage_mode(str(tmp_path / "absent")) == ""
