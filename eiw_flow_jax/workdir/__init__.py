"""The run's workdir: `checkpointing` (Orbax checkpoints and their restore), `digests` (their
integrity), `background_errors` (Orbax's background tracebacks, off the console),
`workdir_lock`, `storage` (local or gs:// paths, one-line storage errors), `stop_signals`
(SIGTERM / Ctrl-C) and `divergence`."""
