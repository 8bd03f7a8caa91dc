"""The run's configuration: `schema` (every field, its default and its allowed values), `checks`
(field checks and `ConfigError`) and `recipes` (the published training recipes that the files in
`configs/` build on). Imports nothing else of the package."""
