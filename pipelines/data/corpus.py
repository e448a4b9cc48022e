"""Corpus inputs: listing them into shards, and reading one shard's bytes.

Two kinds of corpus, on any filesystem fsspec knows (local paths, ``file://``, ``s3://``, ``gs://``, ...):

* a folder tree of image files, found recursively, extensions matched case-insensitively;
* Parquet files holding image bytes in one column and an id or path in another (the layout of
  web-scale image datasets), read row group by row group so a shard never loads a whole file.

Inputs are listed once into a *plan* (a list of shards of consecutive inputs, in a stable sorted order)
that the job stores beside its output: reruns and resumed runs work from the same plan, so shard k means
the same inputs forever.
"""

from __future__ import annotations

import bisect
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.retries import DEFAULT_RETRIES, RetryPolicy, TransientFailure, call_with_retries

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")
ID_COLUMN_CANDIDATES = ("id", "key", "path", "filename", "file_name", "name", "url")


@dataclass(frozen=True)
class InputItem:
    """One input: ``source`` names it in outputs and error rows; ``path`` is the file's URL; ``row`` is
    its row in a Parquet file (-1 for an image file)."""

    source: str
    path: str
    row: int = -1


@dataclass(frozen=True)
class Listing:
    items: list[InputItem]
    ignored: int  # files that are neither images (by extension) nor Parquet, reported but not inputs
    kind: str  # "folder" or "parquet"


def _protocol_path(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_inputs(uri: str, *, image_column: str = "image", id_column: str | None = None,
                kind: str = "auto") -> Listing:
    """All inputs under ``uri`` (a folder, a Parquet file, or a folder of Parquet files)."""
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {uri}")
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if kind == "auto":
        kind = "parquet" if parquet and not images else "folder"
    if kind == "folder":
        items = [InputItem(source=_relative(root, f), path=_protocol_path(fs, f)) for f in images]
        return Listing(items, ignored=len(files) - len(images), kind="folder")
    if kind != "parquet":
        raise ValueError(f"input kind must be 'auto', 'folder' or 'parquet', got {kind!r}")
    if not parquet:
        raise ValueError(f"no .parquet files under {uri}")
    items = []
    for path in parquet:
        items.extend(_parquet_items(fs, path, root, image_column, id_column))
    return Listing(items, ignored=len(files) - len(parquet), kind="parquet")


def _relative(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def _parquet_items(fs, path: str, root: str, image_column: str, id_column: str | None) -> list[InputItem]:
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if image_column not in names:
            raise ValueError(f"{path}: no image column {image_column!r}; columns are {names}")
        column = id_column or next((c for c in ID_COLUMN_CANDIDATES if c in names), None)
        if id_column and id_column not in names:
            raise ValueError(f"{path}: no id column {id_column!r}; columns are {names}")
        if column:
            ids = [str(v) for v in parquet.read(columns=[column]).column(0).to_pylist()]
        else:
            ids = [f"{_relative(root, path)}#{i}" for i in range(parquet.metadata.num_rows)]
    url = _protocol_path(fs, path)
    return [InputItem(source=source, path=url, row=i) for i, source in enumerate(ids)]


def plan_shards(items: list[InputItem], shard_size: int) -> list[list[InputItem]]:
    """Consecutive chunks of ``shard_size``; a shard never spans two Parquet files, so it reads one."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    shards: list[list[InputItem]] = []
    for item in items:
        current = shards[-1] if shards else None
        if current is None or len(current) >= shard_size or (item.row >= 0 and current[0].path != item.path):
            shards.append([item])
        else:
            current.append(item)
    return shards


def plan_table(shards: list[list[InputItem]]) -> pa.Table:
    rows = [(k, i, it.source, it.path, it.row) for k, shard in enumerate(shards) for i, it in enumerate(shard)]
    names = ("shard", "ordinal", "source", "path", "row")
    columns = list(zip(*rows)) if rows else [[] for _ in names]
    types = (pa.int32(), pa.int32(), pa.string(), pa.string(), pa.int64())
    return pa.table({n: pa.array(c, type=t) for n, c, t in zip(names, columns, types)})


def shards_from_plan(table: pa.Table) -> list[list[InputItem]]:
    shards: dict[int, list[InputItem]] = {}
    for row in table.sort_by([("shard", "ascending"), ("ordinal", "ascending")]).to_pylist():
        shards.setdefault(row["shard"], []).append(InputItem(row["source"], row["path"], row["row"]))
    return [shards[k] for k in sorted(shards)]


def read_shard_bytes(items: list[InputItem], image_column: str = "image",
                     retry: RetryPolicy = DEFAULT_RETRIES) -> list[bytes | Exception]:
    """The raw bytes of each input, or the exception that prevented reading it (kept per item: a missing
    or damaged file is that input's error). A temporary failure (a 503, a reset connection, a timeout) is
    retried under ``retry``; when the retries run out it raises :class:`TransientFailure` for the whole
    shard, since the input itself may be fine."""
    return list(iter_shard_bytes(items, image_column, retry))


def iter_shard_bytes(items: list[InputItem], image_column: str = "image",
                     retry: RetryPolicy = DEFAULT_RETRIES) -> Iterator[bytes | Exception]:
    """:func:`read_shard_bytes` one input at a time, so a shard's image files are never all in memory at
    once (the rows of a Parquet input are read per file up front, as its row groups hold them)."""
    rows = [it for it in items if it.row >= 0]
    results_by_row = _read_parquet_rows(rows, image_column, retry) if rows else {}
    for item in items:
        if item.row >= 0:
            yield results_by_row.pop((item.path, item.row))
            continue
        try:
            result = call_with_retries(partial(_read_file, item.path), retry, f"reading {item.path}")
        except TransientFailure:
            raise
        except Exception as err:  # noqa: BLE001 - one unreadable file must not stop its shard
            result = err
        yield result


def _read_file(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def _read_parquet_rows(items: list[InputItem], image_column: str, retry: RetryPolicy) -> dict:
    out: dict = {}
    by_file: dict[str, list[int]] = {}
    for it in items:
        by_file.setdefault(it.path, []).append(it.row)
    for path, wanted in by_file.items():
        try:
            out.update(call_with_retries(partial(_parquet_rows, path, wanted, image_column), retry, f"reading {path}"))
        except TransientFailure:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged Parquet file fails its rows, not the job
            for row in wanted:
                out[(path, row)] = err
    return out


def _parquet_rows(path: str, wanted: list[int], image_column: str) -> dict:
    out = {}
    with fsspec.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        group_of = {row: bisect.bisect_right(starts, row) - 1 for row in wanted}
        groups = sorted(set(group_of.values()))
        values = parquet.read_row_groups(groups, columns=[image_column]).column(0)
        position = {g: sum(sizes[h] for h in groups if h < g) for g in groups}
        for row in wanted:
            g = group_of[row]
            value = values[position[g] + row - starts[g]].as_py()
            out[(path, row)] = value if value is not None else b""
    return out
