"""The README's Python blocks run as written, in order, anywhere; its quick start gives the main
job, the test command and how to look at the run."""

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

README = (Path(REPO) / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
# A block that needs a trained run names its workdir: eiw_flow_jax.load("<workdir>").
NAMED_RUN = re.compile(r'eiw_flow_jax\.load\("([^"]+)"\)')


def test_quick_start_has_the_main_job_the_test_command_and_tensorboard():
  quick_start = README.split("\n## ")[1]
  commands = re.findall(r"```bash\n(.*?)\n```", quick_start, re.S)
  assert len(commands) == 3
  assert "eiw_flow_jax.main --config=configs/digits.py --workdir=workdirs/digits" in commands[0]
  assert commands[1].endswith("python -m pytest -q")
  ci = (Path(REPO) / ".ci" / "run").read_text()
  assert commands[1] in ci
  assert '-e ".[tensorboard]" -c constraints.txt' in commands[2]
  assert commands[2].endswith("tensorboard --logdir workdirs")
  setup = configparser.ConfigParser()
  setup.read(Path(REPO) / "setup.cfg")
  assert "tensorboard" in setup["options.extras_require"]


# Runs each block in one namespace, so that a later block may use what an earlier one defined,
# and names the block that failed.
_DRIVER = """
import json, sys
namespace = {"__name__": "__main__"}
for index, block in enumerate(json.loads(sys.argv[1]), 1):
  exec(compile(block, f"README.md python block {index}", "exec"), namespace)
  print(f"block {index} ran", flush=True)
"""


def test_python_blocks_run_in_order_in_an_empty_folder(tmp_path, trained, env):
  """Verbatim, in the README's order, in one fresh interpreter whose working folder is empty but
  for the runs the blocks name (the quick start's workdirs/digits: a copy of the session's tiny
  run), with the package importable as an installed one is: the repository root is not on the
  path, so its `configs` folder does not import."""
  assert len(PYTHON_BLOCKS) >= 2  # the API tour, exploring a trained flow
  assert any("build_flow" in block for block in PYTHON_BLOCKS)
  folder = tmp_path / "empty"
  folder.mkdir()
  runs = sorted({name for block in PYTHON_BLOCKS for name in NAMED_RUN.findall(block)})
  assert runs == ["workdirs/digits"]
  for name in runs:
    shutil.copytree(trained[1], folder / name)
  site = tmp_path / "site"  # the package alone, as pip installs it
  site.mkdir()
  (site / "eiw_flow_jax").symlink_to(Path(REPO) / "eiw_flow_jax")
  result = subprocess.run(
      [sys.executable, "-c", _DRIVER, json.dumps(PYTHON_BLOCKS)], cwd=folder,
      env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"block {len(PYTHON_BLOCKS)} ran" in result.stdout
