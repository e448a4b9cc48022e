"""Per-sample evaluation results on disk as they arrive, so a long evaluation resumes where it stopped.

At 50K pairs an evaluation runs for hours (5.7 h on 8 GPUs); keeping results only in memory until the end
loses all of them to one preemption. :class:`ResultStore` appends the per-sample scores and FID features to
Parquet parts under one folder (``part-00000.parquet``, ...), a part every ``part_size`` results, each
written to a temporary name and renamed, so a part is either whole or absent. A rerun with the same plan
reads the indices already there, evaluates only the rest, and the report is computed from the parts.

The folder belongs to one plan: ``plan.json`` holds a fingerprint of everything that changes a number
(settings, the drawn samples, the model's weight files); a rerun with another plan is refused rather than
mixing results of two evaluations.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCALAR_COLUMNS = {"index": pa.int64(), "row_id": pa.string(), "reference_id": pa.string(),
                  "sketch_variant": pa.int64(), "width": pa.int64(), "height": pa.int64(),
                  "psnr": pa.float64(), "ms_ssim": pa.float64(), "clip_cosine": pa.float64()}
FEATURE_COLUMNS = ("fid_real", "fid_fake")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def model_stamp(model_folder: str | Path) -> list[tuple[str, int, int]]:
    """(relative path, bytes, mtime ns) of a model folder's weight files: a retrained model at the same
    path gets another stamp. The folder's ``eval/`` (where reports go by default) is left out."""
    folder = Path(model_folder)
    stamp = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] != "eval" and path.suffix.lower() in WEIGHT_SUFFIXES and path.is_file():
            info = path.stat()
            stamp.append((relative.as_posix(), info.st_size, info.st_mtime_ns))
    return stamp


def fingerprint(identity: dict) -> str:
    """SHA-256 of ``identity`` (JSON-serializable) in a canonical form."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def results_table(results: list[dict]) -> pa.Table:
    """Per-sample results (protocol's dicts, FID features as (D,) arrays) → one Arrow table."""
    columns = {name: pa.array([r[name] for r in results], kind) for name, kind in SCALAR_COLUMNS.items()}
    for name in FEATURE_COLUMNS:
        features = np.stack([np.asarray(r[name], np.float32) for r in results])
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1])
    return pa.table(columns)


def results_from_table(table: pa.Table) -> list[dict]:
    """The inverse of :func:`results_table`."""
    rows = table.select(list(SCALAR_COLUMNS)).to_pylist()
    for name in FEATURE_COLUMNS:
        column = table.column(name).combine_chunks()
        features = column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1)
        for row, feature in zip(rows, features):
            row[name] = feature.astype(np.float32)
    return rows


class ResultStore:
    """An append-only folder of result parts for one plan (see the module docstring)."""

    def __init__(self, folder: str | Path, plan_fingerprint: str, part_size: int = 256):
        if part_size < 1:
            raise ValueError(f"part_size must be positive, got {part_size}")
        self.folder = Path(folder)
        self.part_size = part_size
        self.pending: list[dict] = []
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / "plan.json"
        if marker.is_file():
            found = json.loads(marker.read_text())["fingerprint"]
            if found != plan_fingerprint:
                raise ValueError(f"{self.folder} holds results of another evaluation plan (fingerprint {found[:12]}, "
                                 f"this one {plan_fingerprint[:12]}: other settings, samples or model weights); "
                                 f"use another output folder or delete that one to start over")
        else:
            marker.write_text(json.dumps({"fingerprint": plan_fingerprint}))
        self.next_part = 1 + max((int(p.stem.split("-")[1]) for p in self.parts()), default=-1)

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def done(self) -> set[int]:
        """Plan indices with a result on disk."""
        return {i for p in self.parts() for i in pq.read_table(p, columns=["index"]).column("index").to_pylist()}

    def add(self, result: dict) -> None:
        """Keep ``result``; a part is written once ``part_size`` results are waiting."""
        self.pending.append(result)
        if len(self.pending) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        """Write what is waiting as the next part (atomically: temporary name, then rename)."""
        if not self.pending:
            return
        path = self.folder / f"part-{self.next_part:05d}.parquet"
        temporary = path.with_name(f".{path.name}.tmp")
        pq.write_table(results_table(self.pending), temporary)
        os.replace(temporary, path)
        self.next_part += 1
        self.pending = []

    def read(self) -> list[dict]:
        """Every result on disk (a sample evaluated twice, by a run killed after writing, appears twice)."""
        return [r for p in self.parts() for r in results_from_table(pq.read_table(p))]
