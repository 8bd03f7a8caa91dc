"""Training: `train_step` (the jitted step), `train_loop` (the loop over a workdir), `train_state`,
`optimizer`, `sharding` (mesh and shardings), `prefetch`, `evaluate` (test bits/dim,
results.json), `sample_grids`, `reporting` (progress bar, TensorBoard), `resume` (coming back to
a workdir), `run_config` (validating a run's config) and `inference` (`eiw_flow_jax.load`)."""
