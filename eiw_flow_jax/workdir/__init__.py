"""The run's workdir: `checkpointing` (Orbax checkpoints and their restore), `digests` (their
integrity), `background_errors` (background threads' tracebacks, off the console),
`workdir_lock`, `storage` (local or gs:// paths, one-line storage errors), `stop_signals`
(SIGTERM / Ctrl-C), `config_history` (config changes made on resume) and `divergence`."""
