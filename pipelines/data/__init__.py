"""Corpus → preprocessed Parquet dataset → training batches.

- ``corpus.py``: list a folder or Parquet corpus on any fsspec filesystem and plan it into shards;
- ``layout.py``: the dataset on disk, the one owner of its contract (folders, shard names, columns, schema
  version, markers, manifest, plan);
- ``shards.py``: the three preprocess stages as plain functions (prepare, encode, write);
- ``ray_stream.py``: those stages as one Ray Data stream (``jobs/preprocess.py``);
- ``tensor_cells.py``: tensors stored as Parquet binary cells;
- ``neural_lines.py``: the learned line extractors (the weight-free ones live in :mod:`model.line_art`; the
  foreground masks in :mod:`model.masks`, :mod:`model.segmenter` and :mod:`model.birefnet`, since inference
  uses them too);
- ``synthetic.py``: the synthetic illustration corpus of the demo and the tests;
- ``batches.py``: dataset rows → single-bucket :class:`model.objective.TrainingBatch` es.
"""
