"""Process settings made before JAX loads: `platform` (will the step run on the CPU?), `malloc`
(glibc malloc tunables), `threads` (OpenBLAS threads), `process` (what a command does first).
Nothing here imports JAX."""
