"""Interleaved timing in separate processes, shared by the benchmarks in bench/.

Each variant runs in its own worker process (its own environment, XLA flags, allocator, thread
pools), warms up, prints one JSON "ready" line, then answers commands on stdin: `steps N` times
N calls of its step function back to back, `quit` ends it; extra commands can be served too.
The parent starts the workers one after the other (compiles do not overlap), then asks each for
one step (or a few back to back) in turn, round after round, so that load from elsewhere on the
machine hits all variants alike.

No flags here: the scripts that import this module define their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_environ(malloc_mode: str | None = None) -> dict[str, str]:
  """This process's environment with the repository on PYTHONPATH and the command line's
  OpenBLAS thread count (`eiw_flow_jax.host.threads`, unless set already); with `malloc_mode`
  ("1": the command line's default, "reuse", "0"), also the glibc malloc tunables that mode of
  `eiw_flow_jax.host.malloc` gives the command line."""
  from eiw_flow_jax.host import threads as host_threads  # noqa: PLC0415 - imports nothing heavy

  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env = host_threads.blas_thread_environ(env)
  if malloc_mode is not None:
    from eiw_flow_jax.host import malloc as host_malloc  # noqa: PLC0415 - only where asked for

    env = {**env, host_malloc.MODE_VARIABLE: malloc_mode}
    env = host_malloc.malloc_environ(env) or env
  return env


def serve(name: str, run: Callable[[], None], info: dict,
          commands: dict[str, Callable[[], dict]] | None = None) -> None:
  """Worker side: print the ready line (with `info`), then answer commands until `quit`."""
  commands = commands or {}
  print(json.dumps({"ready": name, **info}), flush=True)
  for line in sys.stdin:
    command = line.strip()
    word, _, count = command.partition(" ")
    if word == "steps" and count.isdigit() and int(count) > 0:
      seconds = []
      for _ in range(int(count)):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
      print(json.dumps({"seconds": seconds}), flush=True)
    elif command in commands:
      print(json.dumps(commands[command]()), flush=True)
    elif command == "quit":
      break
    else:
      print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


class InterleavedWorkers:
  """Parent side: worker processes started one after the other, then timed in rounds."""

  def __init__(self):
    self.procs: dict[str, subprocess.Popen] = {}
    self.infos: dict[str, dict] = {}  # each worker's ready line, plus its "startup_s"

  def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
            cwd: str | None = None) -> dict:
    """Runs `python *args` and waits for its ready line; returns it."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
    while True:
      line = proc.stdout.readline()
      if not line:
        raise RuntimeError(f"worker {name} exited during start-up (rc {proc.wait()})")
      if line.startswith("{"):
        self.infos[name] = {**json.loads(line), "startup_s": time.perf_counter() - start}
        break
    self.procs[name] = proc
    return self.infos[name]

  def ask(self, name: str, command: str) -> dict:
    self.procs[name].stdin.write(command + "\n")
    self.procs[name].stdin.flush()
    answer = json.loads(self.procs[name].stdout.readline())
    if "error" in answer:
      raise RuntimeError(f"worker {name}: {answer['error']}")
    return answer

  def time_steps(self, rounds: int, pause_s: float = 0.0,
                 steps_per_turn: int = 1) -> dict[str, list[float]]:
    """Seconds of each worker's steps, `rounds` interleaved rounds, `pause_s` idle before each
    turn (so that the previous worker's spinning threads are asleep).

    With `steps_per_turn` S > 1 a turn is S steps back to back (the training loop's pattern), and
    only the last S - 1 of each turn are kept: the first follows the pause and the other
    workers' turns, which is what one step per turn measures instead."""
    if steps_per_turn < 1:
      raise ValueError(f"steps_per_turn must be at least 1, got {steps_per_turn}.")
    times = {name: [] for name in self.procs}
    for _ in range(rounds):
      for name in self.procs:
        time.sleep(pause_s)
        seconds = self.ask(name, f"steps {steps_per_turn}")["seconds"]
        times[name].extend(seconds[1:] if steps_per_turn > 1 else seconds)
    return times

  @staticmethod
  def describe(rounds: int, steps_per_turn: int, per: str = "worker") -> str:
    """How `time_steps` timed, for a benchmark's header line."""
    left_out = " (the first of each turn left out)" if steps_per_turn > 1 else ""
    return f"{rounds} interleaved rounds of {steps_per_turn} step(s) per {per}{left_out}"

  def close(self) -> None:
    for proc in self.procs.values():
      proc.stdin.write("quit\n")
      proc.stdin.flush()
      proc.wait()
