"""The preprocessed dataset on disk: the one place that spells out its layout, names and columns.

    <output>/
      config.json                  the PreprocessConfig the shards were made with (a rerun must match it)
      plan.parquet                 shard, ordinal, source, path, row — fixed at the first run
      data/shard-00000.parquet     one row per usable input (columns: DATA_COLUMNS)
      errors/shard-00000.parquet   one row per rejected input (columns: ERROR_COLUMNS)
      markers/shard-00000.json     written last: the shard is done (inputs, rows, errors, bytes per column)
      manifest.json                config, counts, bucket histogram, bytes per image per column

A shard counts as done when its marker exists; everything else is redone on the next run, so a job
killed at any moment resumes without duplicates, and a rerun of a finished dataset writes nothing.
Writers (:mod:`pipelines.data.shards`), readers (training, evaluation, the demo) and tests take every path,
name and column from here, so a change to the format is a change to this file.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.corpus import InputItem, Listing, list_inputs, plan_shards, plan_table, shards_from_plan

if TYPE_CHECKING:
    from pipelines.data.shards import PreprocessConfig

# 2: the reference tokens are the published model's (WD tagger on BGR, both encoders on the stretched
#    reference) and a dataset of version 1 holds tokens of the white-padded RGB reference. Tokens of the two
#    kinds must never meet in one training run, so readers refuse any other version.
# 3: stage 2 as published: the reference view is the whole source stretched to the crop's size (no longer
#    letterboxed), the reference mask is stored dilated and binarised, and the stage-2 columns are the
#    background picture's (that reference with its foreground whitened): background_latents and
#    background_{tagger,clip}_tokens (``--latent-views target,background``) and the crop fractions;
#    ``reference_latents`` (the letterboxed reference with a zeroed foreground) is gone.
SCHEMA_VERSION = 3
SCHEMA_KEY = "schema_version"
# Why each older version is refused (what changed since).
SCHEMA_CHANGES = {
    1: "the cached reference tokens changed with the published model's encoder inputs",
    2: "stage 2 now reads the background picture (background_latents, background tokens, crop) instead of "
       "reference_latents, and the reference view is the stretched source instead of the letterboxed one",
}
DATA_COLUMNS = ("id", "source", "shard", "ordinal", "width", "height", "source_width", "source_height", "image",
                "sketches", "sketch_extractors", "sketch_mask", "reference_mask", "crop", "tagger_tokens",
                "tagger_tokens_shape", "clip_tokens", "clip_tokens_shape", "latents", "latents_shape",
                "background_latents", "background_tagger_tokens", "background_clip_tokens", "tags", "tensor_dtype")
ERROR_COLUMNS = ("source", "id", "shard", "ordinal", "error_stage", "error")
DATA, ERRORS, MARKERS = "data", "errors", "markers"  # the three per-shard folders
PLAN_FILE, CONFIG_FILE, MANIFEST_FILE = "plan.parquet", "config.json", "manifest.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_file(root: str, folder: str, shard: int) -> str:
    """``<root>/<folder>/shard-NNNNN.parquet`` (``.json`` under ``markers/``)."""
    return f"{root}/{folder}/{shard_name(shard)}.{'json' if folder == MARKERS else 'parquet'}"


@dataclass
class DatasetPlan:
    shards: list[list[InputItem]]
    listing_kind: str
    ignored: int
    new_inputs: int  # inputs that appeared after the plan was made (not part of this dataset)


def _fs(output: str):
    return fsspec.core.url_to_fs(output)


def load_or_create_plan(input_uri: str, output: str, cfg: PreprocessConfig, kind: str = "auto",
                        id_column: str | None = None) -> DatasetPlan:
    fs, root = _fs(output)
    listing: Listing = list_inputs(input_uri, image_column=cfg.image_column, id_column=id_column, kind=kind)
    plan_path = f"{root}/{PLAN_FILE}"
    if fs.exists(plan_path):
        with fs.open(plan_path, "rb") as f:
            shards = shards_from_plan(pq.read_table(f))
        planned = {(it.path, it.row) for shard in shards for it in shard}
        new = sum(1 for it in listing.items if (it.path, it.row) not in planned)
        return DatasetPlan(shards, listing.kind, listing.ignored, new)
    shards = plan_shards(listing.items, cfg.shard_size)
    fs.makedirs(root, exist_ok=True)
    sink = io.BytesIO()
    pq.write_table(plan_table(shards), sink)
    with fs.open(plan_path, "wb") as f:
        f.write(sink.getvalue())
    return DatasetPlan(shards, listing.kind, listing.ignored, 0)


def check_config(output: str, cfg: PreprocessConfig) -> None:
    """A rerun must use the settings the existing shards were made with; mixing would corrupt the set."""
    fs, root = _fs(output)
    path = f"{root}/{CONFIG_FILE}"
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            existing = json.loads(f.read())
        _require_schema(output, existing.pop(SCHEMA_KEY, 1))
        if existing != cfg.to_json():
            changed = sorted(k for k in set(existing) | set(cfg.to_json()) if existing.get(k) != cfg.to_json().get(k))
            raise ValueError(f"{output} was made with other settings ({', '.join(changed)} differ); "
                             f"use a new --out or the original settings")
    else:
        fs.makedirs(root, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(json.dumps({SCHEMA_KEY: SCHEMA_VERSION, **cfg.to_json()}, indent=2).encode())


def _require_schema(dataset: str, version) -> None:
    if version != SCHEMA_VERSION:
        why = SCHEMA_CHANGES.get(version, f"this code does not know version {version}")
        raise ValueError(f"{dataset} is a dataset of schema version {version}; this code reads and writes version "
                         f"{SCHEMA_VERSION} ({why}). Preprocess the corpus again into a new --out (with "
                         "--latent-views target,background for stage 2); versions are never mixed")


def check_schema(dataset: str) -> None:
    """Refuse a dataset written by another schema version (its manifest or, while in progress, its config)."""
    fs, root = _fs(dataset)
    for name in (MANIFEST_FILE, CONFIG_FILE):
        path = f"{root}/{name}"
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                _require_schema(dataset, json.loads(f.read()).get(SCHEMA_KEY, 1))
            return


def read_marker(output: str, shard: int) -> dict | None:
    fs, root = _fs(output)
    path = shard_file(root, MARKERS, shard)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def completed_shards(output: str) -> dict[int, dict]:
    fs, root = _fs(output)
    if not fs.exists(f"{root}/{MARKERS}"):
        return {}
    done = {}
    for path in fs.glob(f"{root}/{MARKERS}/shard-*.json"):
        with fs.open(path, "rb") as f:
            marker = json.loads(f.read())
        done[int(marker["shard"])] = marker
    return done


def write_manifest(output: str, cfg: PreprocessConfig, plan: DatasetPlan, markers: dict[int, dict]) -> dict:
    """Summarize all shards; rewritten only when its content changes (so a no-op rerun writes nothing)."""
    fs, root = _fs(output)
    rows = sum(m["rows"] for m in markers.values())
    column_bytes = Counter()
    for marker in markers.values():
        column_bytes.update(marker["bytes"])
    manifest = {
        SCHEMA_KEY: SCHEMA_VERSION,
        "config": cfg.to_json(),
        "inputs": sum(len(s) for s in plan.shards),
        "shards": len(plan.shards),
        "shards_done": len(markers),
        "complete": len(markers) == len(plan.shards),
        "rows": rows,
        "errors": sum(m["errors"] for m in markers.values()),
        "bytes_per_image": {c: round(b / rows) for c, b in sorted(column_bytes.items())} if rows else {},
        "buckets": dict(sorted(sum((Counter(m["buckets"]) for m in markers.values()), Counter()).items())),
    }
    path = f"{root}/{MANIFEST_FILE}"
    encoded = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            if f.read() == encoded:
                return manifest
    with fs.open(path, "wb") as f:
        f.write(encoded)
    return manifest


def read_shard(output: str, shard: int, columns: list[str] | None = None, errors: bool = False) -> pa.Table:
    fs, root = _fs(output)
    with fs.open(shard_file(root, ERRORS if errors else DATA, shard), "rb") as f:
        return pq.read_table(f, columns=columns)


def read_all(output: str, columns: list[str] | None = None, errors: bool = False) -> pa.Table:
    """Every finished shard concatenated in shard order (small datasets, tests, evaluation sets)."""
    check_schema(output)
    tables = [read_shard(output, s, columns, errors) for s in sorted(completed_shards(output))]
    return pa.concat_tables(tables) if tables else pa.table({})


def _shard_files(dataset: str) -> tuple[object, list[str]]:
    check_schema(dataset)
    fs, root = _fs(dataset)
    shards = sorted(completed_shards(dataset))
    if not shards:
        raise FileNotFoundError(f"{dataset} has no finished shards ({MARKERS}/): is it a jobs/preprocess.py output?")
    return fs, [shard_file(root, DATA, s) for s in shards]


def shard_paths(dataset: str) -> list[str]:
    """The finished shards' Parquet files, with the dataset's protocol (for Ray Data's ``read_parquet``)."""
    fs, files = _shard_files(dataset)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return files if protocol in ("file", "local") else [f"{protocol}://{f}" for f in files]


def read_rows(dataset: str, ids: list[str] | None, columns: list[str]) -> pa.Table:
    """Rows of the finished shards (only those whose ``id`` is in ``ids``, when given), streamed so a
    large dataset never sits in memory whole."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    fs, files = _shard_files(dataset)
    data = pds.dataset(files, format="parquet", filesystem=fs)
    row_filter = None if ids is None else pc.field("id").isin(pa.array(sorted(set(ids)), pa.string()))
    return data.to_table(columns=columns, filter=row_filter)


def read_manifest(dataset: str) -> dict | None:
    """The dataset's ``manifest.json``, or None when there is none yet."""
    fs, root = _fs(dataset)
    path = f"{root}/{MANIFEST_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def finished_manifest(dataset: str) -> dict:
    """The manifest of a dataset every shard of which is done; anything else is a clear error."""
    manifest = read_manifest(dataset)
    if manifest is None:
        raise FileNotFoundError(f"{dataset} has no {MANIFEST_FILE}: is it a jobs/preprocess.py output?")
    _require_schema(dataset, manifest.get(SCHEMA_KEY, 1))
    if not manifest.get("complete"):
        raise ValueError(f"{dataset} is not a finished dataset ({manifest.get('shards_done')}/{manifest.get('shards')} "
                         "shards): finish jobs/preprocess.py first")
    return manifest
