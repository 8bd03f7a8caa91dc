"""`python -m eiw_flow_jax.convert`: the authors' PyTorch checkpoint into a workdir
(`eiw_flow_jax.commands.convert`)."""

import runpy

if __name__ == "__main__":
  # Runs the command's module as __main__, so that absl's --help lists its flags and usage.
  runpy.run_module("eiw_flow_jax.commands.convert", run_name="__main__", alter_sys=True)
