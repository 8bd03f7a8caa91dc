"""`python -m eiw_flow_jax.prepare`: a dataset as TFDS array_record shards
(`eiw_flow_jax.commands.prepare`)."""

import runpy

if __name__ == "__main__":
  # Runs the command's module as __main__, so that absl's --help lists its flags and usage.
  runpy.run_module("eiw_flow_jax.commands.prepare", run_name="__main__", alter_sys=True)
