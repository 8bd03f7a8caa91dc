"""bench/step_time.py, the script that times the real train step on a chip, at toy size on CPU:
it builds and runs the step as `main` does and writes what it measured."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO


def test_the_step_is_timed_on_this_machines_devices(env, tmp_path):
  path = tmp_path / "step.json"
  result = subprocess.run(
      [sys.executable, "bench/step_time.py", "--config=configs/digits.py",
       "--config.model.steps_per_level=1", "--config.model.hidden_channels=8",
       "--config.init_batch_size=8", "--per_device_batch=4", "--warmup=1", "--steps=2",
       "--rounds=2", f"--json={path}"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(path.read_text())
  assert (figures["platform"], figures["devices"], figures["global_batch"]) == ("cpu", 1, 4)
  assert len(figures["step_seconds"]) == 2 and all(s > 0 for s in figures["step_seconds"])
  assert figures["finite"] and figures["memory"] == "store"
  lines = result.stdout.splitlines()
  assert lines[0] == "1 x cpu (cpu), 4 images per device, memory=store, dtype=auto"
  assert re.fullmatch(r"measured step: [\d.]+ ms \(min of 2 rounds of 2 steps\), median [\d.]+ "
                      r"ms; \d+ images/s, \d+ per device", lines[1])
