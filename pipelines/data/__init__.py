"""Corpus → preprocessed Parquet dataset → training batches.

- ``corpus.py``: list a folder or Parquet corpus on any fsspec filesystem and plan it into shards;
- ``layout.py``: the dataset on disk, the one owner of its contract (folders, shard names, columns, schema
  version, markers, manifest, plan);
- ``shards.py``: the three preprocess stages as plain functions (prepare, encode, write);
- ``ray_stream.py``: those stages as one Ray Data stream (``jobs/preprocess.py``);
- ``tensor_cells.py``: tensors stored as Parquet binary cells;
- ``neural_lines.py``, ``segmenter.py``, ``birefnet.py``: the learned line extractors and the learned
  foreground masks (ISNet, and BiRefNet, the architecture of RMBG-2.0; the weight-free ones live in
  :mod:`model.line_art` and :mod:`model.masks`);
- ``synthetic.py``: the synthetic illustration corpus of the demo and the tests;
- ``batches.py``: dataset rows → single-bucket :class:`model.objective.TrainingBatch` es.
"""
