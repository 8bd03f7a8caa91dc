"""The tree is `ruff check` clean (the project's lint gate runs with the tests)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
  if shutil.which("ruff") is None and not Path(sys.executable).with_name("ruff").exists():
    pytest.fail("ruff is not installed: it is listed in requirements.txt")
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr
