"""The batch job's output tree: the one place that spells out its paths, names and columns.

    <out>/
      config.json               what decides the pictures (model, input, default settings, seed, unit size);
                                a rerun must match it
      plan.parquet              every pair: unit, ordinal, pair_id, row, sketch, reference, background, seed,
                                settings, invalid — fixed at the first run
      images/<pair_id>.png      one per colorized pair (written before its unit's marker)
      markers/unit-000000.json  written last for a unit: its index rows and error rows (rows + errors = inputs)
      index.parquet             every finished pair (INDEX_COLUMNS), rebuilt from the markers at the end of a run
      errors.parquet            every failed pair (ERROR_COLUMNS), likewise
      manifest.json             counts, errors by stage, seconds

A unit counts as done when its marker exists. Every file is written under a temporary name and renamed,
and a unit's marker only after all of its PNGs, so a job killed at any moment resumes without duplicates
(a unit without its marker is colorized again: same seeds, same pictures) and a rerun of a finished job
colorizes and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.inference.pairs import Pair, plan_table, plan_units, protocol_path, units_from_plan

CONFIG_FILE, PLAN_FILE, MANIFEST_FILE = "config.json", "plan.parquet", "manifest.json"
INDEX_FILE, ERRORS_FILE = "index.parquet", "errors.parquet"
IMAGES, MARKERS = "images", "markers"
LAYOUT_VERSION = 1
INDEX_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("sketch", pa.string()), ("reference", pa.string()), ("background", pa.string()),
    ("seed", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("parameters", pa.string()),  # JSON: the resolved options (steps, guidance, sampler, ...) and line extractor
    ("output", pa.string()),  # the PNG's path (with its protocol off the local filesystem)
    ("seconds", pa.float64()),  # this pair's share of its colorize call (the call's time / its pairs)
    ("batch", pa.int32()),  # pairs in that call
    ("unit", pa.int32()), ("row", pa.int64()),
])
ERROR_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("input", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
    ("unit", pa.int32()), ("row", pa.int64()),
])
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)
ERROR_COLUMNS = tuple(ERROR_SCHEMA.names)
STAGES = ("input", "read", "decode", "prepare", "options", "colorize", "write")  # an error row's ``stage``


@dataclass(frozen=True)
class BatchConfig:
    """What decides the pictures; stored in ``config.json`` and checked on every rerun."""

    model: str  # model folder
    manifest: str | None = None  # CSV/Parquet manifest, or:
    sketches: str | None = None  # a folder of sketches ...
    reference: str | None = None  # ... with one reference for all
    background: str | None = None  # ... and optionally one background picture for all
    defaults: dict = field(default_factory=dict)  # parsed settings (pairs.parse_settings) every pair starts from
    seed: int = 0  # the seed of pairs without their own
    unit_size: int = 64  # pairs per unit (the unit of work, of resumption and of a marker)

    def __post_init__(self):
        if (self.manifest is None) == (self.sketches is None):
            raise ValueError("give a manifest, or a folder of sketches with a reference, not both")
        if self.sketches is not None and not self.reference:
            raise ValueError("a folder of sketches needs --reference (one reference for all)")
        if self.manifest is not None and (self.reference or self.background):
            raise ValueError("with a manifest, references and backgrounds are its columns, not flags")
        if self.unit_size < 1:
            raise ValueError(f"unit size must be at least 1, got {self.unit_size}")

    def to_json(self) -> dict:
        return asdict(self)

    def pairs(self) -> list[Pair]:
        from pipelines.inference.pairs import pairs_from_folder, pairs_from_manifest

        if self.manifest is not None:
            return pairs_from_manifest(self.manifest, self.defaults, self.seed)
        return pairs_from_folder(self.sketches, self.reference, self.background, self.defaults, self.seed)


@dataclass
class BatchPlan:
    units: list[list[Pair]]
    new_pairs: int  # pairs in the input that are not in the stored plan (added after the first run)

    @property
    def inputs(self) -> int:
        return sum(len(u) for u in self.units)


def fs_root(output: str):
    return fsspec.core.url_to_fs(output)


def unit_name(unit: int) -> str:
    return f"unit-{unit:06d}"


def marker_path(root: str, unit: int) -> str:
    return f"{root}/{MARKERS}/{unit_name(unit)}.json"


def image_path(root: str, pair_id: str) -> str:
    return f"{root}/{IMAGES}/{pair_id}.png"


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write then rename: a killed writer never leaves a half file under the final name."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    with fs.open(temporary, "wb") as f:
        f.write(data)
    fs.mv(temporary, path)


def model_digest(model: str) -> str:
    """SHA-256 of the model folder's manifest (its format and config), to tell another model apart."""
    fs, root = fs_root(model)
    path = f"{root}/config.json"
    if not fs.exists(path):
        raise FileNotFoundError(f"{model} is not a colorize-xl model folder: {path} is missing")
    with fs.open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_config(output: str, cfg: BatchConfig) -> None:
    """The first run stores the config; a rerun must bring the same one (mixing would mix pictures)."""
    fs, root = fs_root(output)
    wanted = {"layout_version": LAYOUT_VERSION, **cfg.to_json(), "model_digest": model_digest(cfg.model)}
    path = f"{root}/{CONFIG_FILE}"
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            existing = json.loads(f.read())
        if existing != wanted:
            changed = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
            raise ValueError(f"{output} was made with other settings ({', '.join(changed)} differ); use a new --out "
                             "or the original settings")
        return
    fs.makedirs(root, exist_ok=True)
    write_bytes(fs, path, json.dumps(wanted, indent=2, sort_keys=True).encode())


def load_or_create_plan(output: str, cfg: BatchConfig,
                        list_pairs: Callable[[], list[Pair]] | None = None) -> BatchPlan:
    """The stored plan (pairs new in the input are counted, not added), or a new one from the input."""
    fs, root = fs_root(output)
    pairs = (list_pairs or cfg.pairs)()
    path = f"{root}/{PLAN_FILE}"
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            units = units_from_plan(pq.read_table(f))
        planned = {p.pair_id for unit in units for p in unit}
        return BatchPlan(units, sum(1 for p in pairs if p.pair_id not in planned))
    units = plan_units(pairs, cfg.unit_size)
    sink = io.BytesIO()
    pq.write_table(plan_table(units), sink)
    write_bytes(fs, path, sink.getvalue())
    return BatchPlan(units, 0)


def finished_units(output: str) -> set[int]:
    """Units whose marker exists (from the names only: nothing is read)."""
    fs, root = fs_root(output)
    if not fs.exists(f"{root}/{MARKERS}"):
        return set()
    return {int(posixpath.basename(p)[len("unit-"):-len(".json")])
            for p in fs.glob(f"{root}/{MARKERS}/unit-*.json")}


def read_markers(output: str) -> dict[int, dict]:
    fs, root = fs_root(output)
    paths = [marker_path(root, k) for k in sorted(finished_units(output))]
    contents = fs.cat(paths) if paths else {}  # a list: fetched concurrently on object stores
    markers = {}
    for data in contents.values():
        marker = json.loads(data)
        markers[int(marker["unit"])] = marker
    return markers


def finalize(output: str, plan: BatchPlan) -> dict:
    """``index.parquet``, ``errors.parquet`` and ``manifest.json`` from the markers; nothing is written when
    the manifest (which carries a digest of the markers) is unchanged, so a no-op rerun writes nothing."""
    fs, root = fs_root(output)
    markers = read_markers(output)
    rows = [r for k in sorted(markers) for r in markers[k]["rows"]]
    errors = [e for k in sorted(markers) for e in markers[k]["errors"]]
    digest = hashlib.sha256(json.dumps([markers[k] for k in sorted(markers)], sort_keys=True).encode()).hexdigest()
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "inputs": plan.inputs,
        "units": len(plan.units),
        "units_done": len(markers),
        "complete": len(markers) == len(plan.units),
        "rows": len(rows),
        "errors": len(errors),
        "errors_by_stage": dict(sorted(Counter(e["stage"] for e in errors).items())),
        "colorize_seconds": round(sum(r["seconds"] for r in rows), 3),
        "sizes": dict(sorted(Counter(f"{r['width']}x{r['height']}" for r in rows).items())),
        "markers_digest": digest,
    }
    encoded = json.dumps(manifest, indent=2, sort_keys=True).encode()
    path = f"{root}/{MANIFEST_FILE}"
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            if f.read() == encoded:
                return manifest
    for name, table in ((INDEX_FILE, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)),
                        (ERRORS_FILE, pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))):
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        write_bytes(fs, f"{root}/{name}", sink.getvalue())
    write_bytes(fs, path, encoded)
    return manifest


def read_index(output: str) -> pa.Table:
    fs, root = fs_root(output)
    with fs.open(f"{root}/{INDEX_FILE}", "rb") as f:
        return pq.read_table(f)


def read_errors(output: str) -> pa.Table:
    fs, root = fs_root(output)
    with fs.open(f"{root}/{ERRORS_FILE}", "rb") as f:
        return pq.read_table(f)


def output_uri(fs, path: str) -> str:
    return protocol_path(fs, path)
