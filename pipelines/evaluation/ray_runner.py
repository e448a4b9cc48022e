"""The evaluation's batches over Ray Data actors: a runner for :func:`pipelines.evaluation.protocol.evaluate`.

Each actor holds one :class:`BatchEvaluator` (the model and the metric networks, one GPU with ``gpu``)
and colors and measures the planned rows it is sent; only planned rows travel to the actors. The driver
receives the per-sample results as they stream out (so :func:`pipelines.evaluation.protocol.evaluate` writes
them as they come) and computes the aggregates (FID needs every feature).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from pipelines.data.layout import shard_paths
from pipelines.evaluation.protocol import ROW_COLUMNS, BatchEvaluator, EvaluationConfig, EvaluationPlan, SampleSpec


class EvaluationActor:
    """A Ray Data actor: one :class:`BatchEvaluator` (model + metric networks) serving many batches."""

    def __init__(self, model_folder: str, config: EvaluationConfig, specs: list[dict], sizes: dict,
                 min_side: int, references_ref: list):
        self.specs = {s["row_id"]: SampleSpec.from_json(s) for s in specs}
        self.sizes = {k: tuple(v) for k, v in sizes.items()}
        self.evaluator = BatchEvaluator(model_folder, config, min_side, ray.get(references_ref[0]))

    def __call__(self, batch):
        rows = [r for r in batch.to_pylist() if r["id"] in self.specs]
        results = self.evaluator(rows, [self.specs[r["id"]] for r in rows], self.sizes) if rows else []
        return {
            "index": np.array([r["index"] for r in results], np.int64),
            "psnr": np.array([r["psnr"] for r in results], np.float64),
            "ms_ssim": np.array([r["ms_ssim"] for r in results], np.float64),
            "clip_cosine": np.array([r["clip_cosine"] for r in results], np.float64),
            "fid_real": np.stack([r["fid_real"] for r in results]) if results else np.zeros((0, 1), np.float32),
            "fid_fake": np.stack([r["fid_fake"] for r in results]) if results else np.zeros((0, 1), np.float32),
            "meta": np.array([json.dumps({k: r[k] for k in ("row_id", "reference_id", "sketch_variant", "width",
                                                            "height")}) for r in results], dtype=str),
        }


def ray_runner(workers: int, gpu: bool, cpus_per_worker: float):
    """A runner for :func:`pipelines.evaluation.protocol.evaluate` that spreads the batches over
    ``workers`` Ray Data actors; Ray must already be initialized."""

    def run(model_folder: str, dataset: str, config: EvaluationConfig, plan: EvaluationPlan,
            references: dict[str, bytes]) -> Iterator[dict]:
        planned = pa.array(sorted({s.row_id for s in plan.specs}), pa.string())
        rows = ray.data.read_parquet(shard_paths(dataset), columns=ROW_COLUMNS)
        rows = rows.map_batches(lambda batch: batch.filter(pc.is_in(batch["id"], value_set=planned)),
                                batch_format="pyarrow")  # only planned rows travel on to the actors
        results = rows.map_batches(
            EvaluationActor, batch_format="pyarrow", batch_size=config.batch_size,
            fn_constructor_kwargs=dict(model_folder=model_folder, config=config,
                                       specs=[s.to_json() for s in plan.specs], sizes=plan.sizes,
                                       min_side=plan.min_side, references_ref=[ray.put(references)]),
            compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if gpu else 0, num_cpus=cpus_per_worker)
        for row in tqdm(results.iter_rows(), total=len(plan.specs), desc="evaluate", unit="sample",
                        dynamic_ncols=True, mininterval=2.0):
            yield {"index": int(row["index"]), "psnr": float(row["psnr"]), "ms_ssim": float(row["ms_ssim"]),
                   "clip_cosine": float(row["clip_cosine"]), "fid_real": np.asarray(row["fid_real"]),
                   "fid_fake": np.asarray(row["fid_fake"]), **json.loads(row["meta"])}

    return run
