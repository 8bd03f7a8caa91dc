"""Host threads: OpenBLAS, under XLA:CPU's LAPACK calls, runs on the calling thread only.

On CPU, jaxlib computes LU factorisations and triangular solves (DenseFlow's 1x1 convolutions
take `slogdet` of their weight every step; Glow's `inverse_method="solve"`) by LAPACK custom
calls into scipy's OpenBLAS, which by default starts a worker thread per core. Those workers
compete with XLA's own thread pool for the same cores, and the LU calls inside a DenseFlow step
take many times their time alone; with `OPENBLAS_NUM_THREADS=1` they drop out of the profile and
the step is faster (measured: docs/performance.md, "Host settings").

OpenBLAS reads the variable once, when it is loaded, so the command line sets it before it
imports JAX (`limit_blas_threads`); a value the user set is left as it is. In a notebook, set
`OPENBLAS_NUM_THREADS=1` before importing JAX, or start the kernel with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

BLAS_THREADS_VARIABLE = "OPENBLAS_NUM_THREADS"


def blas_thread_environ(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` with `OPENBLAS_NUM_THREADS=1` added, unless it sets that variable already."""
  return {BLAS_THREADS_VARIABLE: "1", **environ}


def limit_blas_threads(environ: MutableMapping[str, str] | None = None) -> bool:
  """Sets `OPENBLAS_NUM_THREADS=1` in `environ` (default: this process's) unless it is set.

  Returns whether it was set here. Call it before JAX (and numpy's or scipy's OpenBLAS) loads.
  """
  environ = os.environ if environ is None else environ
  if BLAS_THREADS_VARIABLE in environ:
    return False
  environ[BLAS_THREADS_VARIABLE] = "1"
  return True
