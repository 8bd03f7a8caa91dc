"""The model: `flow` (the functional API `Flow` and `build_flow`), `backbones` (Glow's and
DenseFlow's multi-scale flows behind one interface, `backbones.base.Backbone`: `Flow` is how
everything else reaches them), `bijectors` and `splits` (Glow's layers, the EIW Shuffle),
`memory` (activation memory of a chain of steps), `kernels` (per-platform forms of the
convolutions), `explore` (looking inside a trained flow), `shapes` and `validation`
(`config.model`). Never imports the training side."""
