"""The command lines: `main` (train, eval, sample), `aot` (ahead-of-time compile for a topology),
`convert` (the authors' PyTorch checkpoints), `table` (results against published numbers) and
`prepare` (datasets as array_record). Each runs as `python -m eiw_flow_jax.<name>`."""
