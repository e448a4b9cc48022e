"""Batch colorization: many (sketch, reference) pairs → PNGs, an index and an errors table.

- :mod:`pipelines.inference.pairs`: the inputs (a CSV/Parquet manifest, or a folder of sketches with one
  reference) → pairs with their settings, and the plan of units;
- :mod:`pipelines.inference.layout`: the output tree (config, plan, markers, index, errors, manifest);
- :mod:`pipelines.inference.stages`: the three stages as plain functions (prepare, colorize, write) and
  all three in one process;
- :mod:`pipelines.inference.ray_stream`: the same stages as a Ray Data stream (``jobs/colorize_batch.py``).
"""
