"""The paper's Table 1 protocol and the spatial-entanglement measures (``jobs/evaluate.py``).

- ``protocol.py``: plan (rows, references, deformations), colorize, measure, report;
- ``metrics.py``: PSNR, MS-SSIM, FID and CLIP-score extractors (torchmetrics);
- ``deform.py``: the seeded reference deformation; ``inception.py``: the FID Inception network;
- ``entanglement.py``: Gram distance and line agreement between aligned and misaligned references
  (degenerate pairs left out, NaN with a reason when none is left);
- ``results.py``: per-sample results written as Parquet parts as they arrive, so a rerun resumes;
- ``ray_runner.py``: the same batches over Ray Data actors; ``mlflow_report.py``: the evaluation run in MLflow.
"""
