"""The preprocessed dataset on disk: the one place that spells out its layout, names and columns.

    <output>/
      config.json                  the PreprocessConfig the shards were made with (a rerun must match it)
      plan.parquet                 shard, ordinal, source, path, row, and the corpus listing's facts in its
                                   metadata — made at the first run, reused by every later one (no re-list)
      data/shard-00000.parquet     one row per usable input (columns: DATA_COLUMNS)
      errors/shard-00000.parquet   one row per rejected input (columns: ERROR_COLUMNS)
      markers/shard-00000.json     written last: the shard is done (inputs, rows, errors, bytes per column)
      markers.parquet              every marker's content in one file (shard, marker JSON): a cache of markers/
      manifest.json                config, counts, bucket histogram, bytes per image per column

A shard counts as done when its marker exists; everything else is redone on the next run, so a job
killed at any moment resumes without duplicates, and a rerun of a finished dataset writes nothing.
Which markers exist is one listing of ``markers/`` (a LIST request per 1,000 shards on S3, never a request per
shard); their content comes from ``markers.parquet``, and only markers it does not hold yet (those of a killed
run) are read one by one, in parallel. The listing always wins: an index entry whose marker is gone is dropped.
Writers (:mod:`pipelines.data.shards`), readers (training, evaluation, the demo) and tests take every path,
name and column from here, so a change to the format is a change to this file.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.corpus import InputItem, list_inputs, plan_shards, plan_table, shards_from_plan
from pipelines.data.writes import write_whole

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
MARKER_INDEX_FILE = "markers.parquet"
LISTING_KEY = b"colorize_xl.listing"  # plan.parquet's metadata: where and when the corpus was listed
MARKER_NAME = re.compile(r"shard-(\d+)\.json")  # a finished marker (not its ``.tmp``)
MARKER_READ_THREADS = 32  # markers read at once when the index lacks them: requests wait on the network


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_file(root: str, folder: str, shard: int) -> str:
    """``<root>/<folder>/shard-NNNNN.parquet`` (``.json`` under ``markers/``)."""
    return f"{root}/{folder}/{shard_name(shard)}.{'json' if folder == MARKERS else 'parquet'}"


@dataclass
class DatasetPlan:
    shards: list[list[InputItem]]
    listing_kind: str
    ignored: int  # non-image files the listing skipped
    listed_at: str = ""  # when the corpus was listed (UTC, ISO 8601); "" for plans older than this field
    relisted: bool = False  # whether this run listed the corpus (the first run, or --relist)
    new_inputs: int = 0  # inputs a re-list found that the plan lacked: appended as new shards
    missing_inputs: int = 0  # planned inputs a re-list no longer found (unfinished shards record them as errors)


def _fs(output: str):
    return fsspec.core.url_to_fs(output)


def _input_url(input_uri: str) -> str:
    """``input_uri`` normalised (protocol kept, relative local paths made absolute, no trailing slash), so
    that two spellings of one corpus compare equal."""
    fs, path = fsspec.core.url_to_fs(input_uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path.rstrip("/") if protocol in ("file", "local") else f"{protocol}://{path.rstrip('/')}"


def _read_table(fs, path: str) -> pa.Table | None:
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    except FileNotFoundError:
        return None


def _write_plan(fs, path: str, shards: list[list[InputItem]], listing: dict) -> None:
    table = plan_table(shards).replace_schema_metadata({LISTING_KEY: json.dumps(listing).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_whole(fs, path, sink.getvalue())


def load_or_create_plan(input_uri: str, output: str, cfg: PreprocessConfig, kind: str = "auto",
                        id_column: str | None = None, relist: bool = False) -> DatasetPlan:
    """The dataset's plan: made from a listing of the corpus at the first run, read back (one request) at
    every later one, so a resubmission never lists the corpus again (6M keys on S3: 6,000 serial LIST pages,
    10–15 minutes with the GPUs idle).

    ``relist`` lists the corpus anyway and compares: inputs the plan lacks are appended as new shards after
    the existing ones (shard k keeps its inputs forever, so finished shards stay valid); planned inputs that
    are gone are counted, and an unfinished shard records them as unreadable. A plan made from another
    ``input_uri`` is refused: it would silently read the old corpus."""
    fs, root = _fs(output)
    plan_path = f"{root}/{PLAN_FILE}"
    table = _read_table(fs, plan_path)
    source = _input_url(input_uri)
    if table is not None:
        stored = json.loads((table.schema.metadata or {}).get(LISTING_KEY, b"{}"))
        if stored.get("input", source) != source:
            raise ValueError(f"{output} was planned from {stored['input']}, not {source}: resubmit with "
                             f"--input {stored['input']}, or preprocess {source} into a new --out")
        shards = shards_from_plan(table)
        kind_found = stored.get("kind") or ("parquet" if shards and shards[0][0].row >= 0 else "folder")
        plan = DatasetPlan(shards, kind_found, stored.get("ignored", 0), stored.get("listed_at", ""))
        if not relist:
            return plan
    listing = list_inputs(input_uri, image_column=cfg.image_column, id_column=id_column, kind=kind)
    facts = {"input": source, "kind": listing.kind, "ignored": listing.ignored, "inputs": len(listing.items),
             "listed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if table is None:
        shards = plan_shards(listing.items, cfg.shard_size)
        _write_plan(fs, plan_path, shards, facts)
        return DatasetPlan(shards, listing.kind, listing.ignored, facts["listed_at"], relisted=True)
    planned = {(it.path, it.row) for shard in plan.shards for it in shard}
    found = {(it.path, it.row) for it in listing.items}
    new = [it for it in listing.items if (it.path, it.row) not in planned]
    shards = plan.shards + plan_shards(new, cfg.shard_size)
    _write_plan(fs, plan_path, shards, {**facts, "inputs": sum(len(s) for s in shards)})
    return DatasetPlan(shards, listing.kind, listing.ignored, facts["listed_at"], relisted=True,
                       new_inputs=len(new), missing_inputs=len(planned - found))


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
        write_whole(fs, path, json.dumps({SCHEMA_KEY: SCHEMA_VERSION, **cfg.to_json()}, indent=2).encode())


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


def done_shards(output: str) -> list[int]:
    """The shards whose marker exists, from one listing of ``markers/`` (on S3 one LIST request per 1,000
    markers; each marker's own HEAD or GET, serially, took 8–16 minutes at 11,719 shards)."""
    fs, root = _fs(output)
    folder = f"{root}/{MARKERS}"
    fs.invalidate_cache(folder)  # s3fs and gcsfs cache listings: another job may have added markers
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    found = (MARKER_NAME.fullmatch(posixpath.basename(name.rstrip("/"))) for name in names)
    return sorted(int(match.group(1)) for match in found if match)


def read_marker_index(output: str) -> dict[int, dict]:
    """``markers.parquet`` as {shard: marker} ({} when there is none yet)."""
    fs, root = _fs(output)
    table = _read_table(fs, f"{root}/{MARKER_INDEX_FILE}")
    if table is None:
        return {}
    shards, markers = table.column("shard").to_pylist(), table.column("marker").to_pylist()
    return {int(k): json.loads(m) for k, m in zip(shards, markers)}


def write_marker_index(output: str, markers: dict[int, dict]) -> None:
    """Every marker in one file, so that the next run reads one object instead of one per shard."""
    fs, root = _fs(output)
    shards = sorted(markers)
    table = pa.table({"shard": pa.array(shards, pa.int32()),
                      "marker": pa.array([json.dumps(markers[k], sort_keys=True) for k in shards], pa.string())})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_whole(fs, f"{root}/{MARKER_INDEX_FILE}", sink.getvalue())


def _read_markers(fs, root: str, shards: list[int]) -> dict[int, dict]:
    """The markers of ``shards``, :data:`MARKER_READ_THREADS` requests at a time (each waits on the network)."""
    if not shards:
        return {}
    with ThreadPoolExecutor(min(MARKER_READ_THREADS, len(shards))) as pool:
        contents = pool.map(lambda k: fs.cat_file(shard_file(root, MARKERS, k)), shards)
        return {k: json.loads(data) for k, data in zip(shards, contents)}


def completed_shards(output: str, *, keep_index: bool = False) -> dict[int, dict]:
    """{shard: marker} of every finished shard: one listing of ``markers/``, the index for their content, and
    parallel reads of the markers the index lacks. ``keep_index`` (the preprocess job) rewrites the index when
    it did not match the markers found, so a run after a killed one reads it whole again."""
    fs, root = _fs(output)
    shards = done_shards(output)
    index = read_marker_index(output)
    markers = {k: index[k] for k in shards if k in index}
    markers.update(_read_markers(fs, root, [k for k in shards if k not in index]))
    if keep_index and markers.keys() != index.keys():
        write_marker_index(output, markers)
    return markers


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
    write_whole(fs, path, encoded)
    return manifest


def read_shard(output: str, shard: int, columns: list[str] | None = None, errors: bool = False) -> pa.Table:
    fs, root = _fs(output)
    with fs.open(shard_file(root, ERRORS if errors else DATA, shard), "rb") as f:
        return pq.read_table(f, columns=columns)


def read_all(output: str, columns: list[str] | None = None, errors: bool = False) -> pa.Table:
    """Every finished shard concatenated in shard order (small datasets, tests, evaluation sets)."""
    check_schema(output)
    tables = [read_shard(output, s, columns, errors) for s in done_shards(output)]
    return pa.concat_tables(tables) if tables else pa.table({})


def _shard_files(dataset: str) -> tuple[object, list[str]]:
    check_schema(dataset)
    fs, root = _fs(dataset)
    shards = done_shards(dataset)
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
