"""`python -m eiw_flow_jax.table`: runs' results against published bits/dim
(`eiw_flow_jax.commands.table`)."""

if __name__ == "__main__":
  from eiw_flow_jax.commands import table

  table.cli()
