"""Datasets: `registry` (the names `config.dataset.name` accepts), `sources` (opening a split),
`builders` and `idx` (offline TFDS builders: digits, MNIST idx files), `preprocess` (crops and
resizes), `catalog` (preparing catalog datasets as array_record) and `pipeline` (the grain input
pipeline: train iterator, eval batches)."""
