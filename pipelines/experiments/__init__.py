"""Experiments over whole training runs: the paper's ablation ladder (``ablation.py``, ``jobs/ablate.py``) and
side-by-side comparison of MLflow runs (``compare.py``, ``jobs/compare.py``)."""
