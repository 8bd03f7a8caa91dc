"""What a command-line entry point does first, before JAX is imported.

Where an accelerator plugin is installed without its device, JAX is told to use the CPU, so it
does not probe for the missing chips (`platform.skip_absent_accelerators`). Where the step runs
on the CPU (`platform.runs_on_cpu`), the process re-executes itself with
glibc malloc tunables for XLA:CPU's buffers (`malloc`) and limits OpenBLAS to one thread under
XLA's LAPACK calls (`threads`). Both happen before JAX is imported, so the re-executed process
imports it once, not twice. On a TPU or GPU host both are left alone.
"""

from __future__ import annotations

import sys

from eiw_flow_jax.host import malloc, platform, threads


def prepare_command_process() -> None:
  """Host settings for a command that runs the step here; call it before importing JAX."""
  platform.skip_absent_accelerators()
  if not platform.runs_on_cpu():
    return
  try:
    malloc.reexec_with_malloc_tunables()
  except ValueError as e:  # a bad EIW_FLOW_JAX_HOST_MALLOC
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  threads.limit_blas_threads()
