"""`python -m eiw_flow_jax.main`: train, evaluate or sample (`eiw_flow_jax.commands.main`)."""

if __name__ == "__main__":
  from eiw_flow_jax.host.process import prepare_command_process

  prepare_command_process()  # before JAX is imported

  from eiw_flow_jax.commands import main

  main.cli()
