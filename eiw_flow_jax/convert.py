"""`python -m eiw_flow_jax.convert`: the authors' PyTorch checkpoint into a workdir
(`eiw_flow_jax.commands.convert`)."""

if __name__ == "__main__":
  from eiw_flow_jax.commands import convert

  convert.cli()
