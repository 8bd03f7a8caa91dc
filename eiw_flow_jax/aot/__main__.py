"""`python -m eiw_flow_jax.aot`: the ahead-of-time check (`eiw_flow_jax.commands.aot`)."""

import os

# The command compiles for a topology and never runs on local devices: JAX's CPU backend, so that
# it neither probes nor takes the chips of the machine it runs on (a TPU VM may be training on
# them). Set before JAX is imported, which reads it then.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from eiw_flow_jax.commands import aot  # noqa: E402

aot.cli()
