"""`python -m eiw_flow_jax.aot`: the ahead-of-time check (`eiw_flow_jax.commands.aot`)."""

import os
import runpy

# The command compiles for a topology and never runs on local devices: JAX's CPU backend, so that
# it neither probes nor takes the chips of the machine it runs on (a TPU VM may be training on
# them). Set before JAX is imported, which reads it then.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs the command's module as __main__, so that absl's --help lists its flags and usage.
runpy.run_module("eiw_flow_jax.commands.aot", run_name="__main__", alter_sys=True)
