"""The applications built on :mod:`model`, one subpackage per stage of the system, named after what it produces.

- :mod:`pipelines.data`: corpus → Parquet dataset (listing, shards, sketches, masks, tokens, latents) and
  the training batches read back from it (``jobs/preprocess.py``, ``jobs/make_corpus.py``);
- :mod:`pipelines.training`: Ray Train + DeepSpeed ZeRO-2 stages, the loop, MLflow tracking
  (``jobs/train.py``);
- :mod:`pipelines.evaluation`: the paper's Table 1 protocol and the entanglement measures
  (``jobs/evaluate.py``);
- :mod:`pipelines.experiments`: the ablation ladder and side-by-side run comparison (``jobs/ablate.py``,
  ``jobs/compare.py``).

Imports point one way: ``model`` ← ``data`` ← ``training`` ← ``evaluation`` ← ``experiments``
(``tests/test_layout.py`` enforces it). Nothing here imports ``jobs`` or ``serve``.
"""
