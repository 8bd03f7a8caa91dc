"""The README's API tour runs as written, and its first section gives the two commands."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

README = (Path(REPO) / "README.md").read_text()


def test_quick_start_has_the_main_job_and_the_test_command():
  quick_start = README.split("\n## ")[1]
  commands = re.findall(r"```bash\n(.*?)\n```", quick_start, re.S)
  assert len(commands) == 2
  assert "eiw_flow_jax.main --config=configs/digits.py" in commands[0]
  assert commands[1].endswith("python -m pytest -q")
  ci = (Path(REPO) / ".ci" / "run").read_text()
  assert commands[1] in ci


def test_api_tour_runs(env):
  (tour,) = [block for block in re.findall(r"```python\n(.*?)```", README, re.S)
             if "build_flow" in block]
  result = subprocess.run(
      [sys.executable, "-c", tour], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
