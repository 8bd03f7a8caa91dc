"""`python -m eiw_flow_jax.prepare`: a dataset as TFDS array_record shards
(`eiw_flow_jax.commands.prepare`)."""

if __name__ == "__main__":
  from eiw_flow_jax.commands import prepare

  prepare.cli()
