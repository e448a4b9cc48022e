"""What the preprocess job asks of its storage (issue 18, points 4 and 8), before and after, in one run.

* ``resubmit``: what a resubmission of a dataset that is 90% done costs before any shard is processed: the
  corpus listing, the plan, and finding the finished shards, at the start and (before) again at the end.
  ``before`` is the code as it was (``list_inputs`` then the plan; ``fs.glob`` of the markers and one read
  per marker, twice); ``after`` is today's (the plan's listing; one listing of ``markers/`` and the index;
  the end of a run writes the index once); ``after_killed`` is today's after a killed run that left 10% of
  the markers outside the index (read in parallel).
* ``shard_write``: the requests and seconds of writing one shard's three files, the marker last: write then
  rename everywhere (before), against a direct write to an object store (after).

The stores are real fsspec filesystems, subclassed only to count and delay requests: fsspec's in-memory
store stands in for an object store (each listing, HEAD, GET, PUT, COPY and DELETE counted as a request and
delayed by ``--latency-ms``; a listing pages by 1,000 keys as S3's does), and the local disk is measured as
it is (no delay). A request made inside another counted one (a copy's HEAD) counts once, as the outer one.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from pipelines.data.corpus import list_inputs, shards_from_plan
from pipelines.data.layout import (MARKERS, PLAN_FILE, completed_shards, load_or_create_plan, shard_file,
                                   write_marker_index)
from pipelines.data.shards import DATA, ERRORS, PreprocessConfig, encoded_schema, write_shard
from pipelines.data.writes import write_whole

LIST_PAGE = 1000  # keys per listing request (S3's ListObjectsV2, GCS's default page)
# Methods of each store that one request answers (the object store's: LIST, HEAD, GET, PUT, COPY, DELETE).
REQUESTS = {"memory": ("ls", "find", "info", "_open", "cat_file", "cp_file", "_rm"),
            "local": ("ls", "find", "info", "_open", "cat_file", "mv", "rm_file")}


def counting_filesystem(base, protocol: str, requests: tuple[str, ...]):
    """A subclass of ``base`` (a real fsspec filesystem) registered as ``protocol`` that counts each request
    in ``cls.counts`` and sleeps ``cls.latency`` seconds per request (per listing page)."""
    busy = threading.local()

    def counted(name):
        inner = getattr(base, name)

        def method(self, *args, **kwargs):
            if getattr(busy, "on", False):  # inside another request
                return inner(self, *args, **kwargs)
            busy.on = True
            try:
                result = inner(self, *args, **kwargs)
            finally:
                busy.on = False
            pages = max(1, math.ceil(len(result) / LIST_PAGE)) if name in ("ls", "find") else 1
            type(self).counts[name] += pages
            if type(self).latency:
                time.sleep(type(self).latency * pages)
            return result
        return method

    def strip(cls, path):
        return base._strip_protocol.__func__(cls, path.removeprefix(f"{protocol}://"))

    attrs = {name: counted(name) for name in requests}
    attrs.update(protocol=protocol, counts=Counter(), latency=0.0, _strip_protocol=classmethod(strip))
    if issubclass(base, MemoryFileSystem):
        attrs.update(store={}, pseudo_dirs=[""])  # its own keys, apart from the default in-memory store
    cls = type(f"Counting{base.__name__}", (base,), attrs)
    fsspec.register_implementation(protocol, cls, clobber=True)
    return cls


# ----------------------------------------------------------------------------------- the code before
def before_completed_shards(output: str) -> dict[int, dict]:
    """``completed_shards`` before issue 18.4: a glob of the markers, then one read per marker, serially."""
    fs, root = fsspec.core.url_to_fs(output)
    if not fs.exists(f"{root}/{MARKERS}"):
        return {}
    done = {}
    for path in fs.glob(f"{root}/{MARKERS}/shard-*.json"):
        with fs.open(path, "rb") as f:
            marker = json.loads(f.read())
        done[int(marker["shard"])] = marker
    return done


def before_resubmit(corpus: str, output: str) -> int:
    """A resubmission before issue 18.4: the corpus listed again (to count new inputs), the plan read, the
    markers read at the start and again at the end of the run. Returns the number of finished shards."""
    listing = list_inputs(corpus)
    fs, root = fsspec.core.url_to_fs(output)
    if fs.exists(f"{root}/{PLAN_FILE}"):
        with fs.open(f"{root}/{PLAN_FILE}", "rb") as f:
            shards = shards_from_plan(pq.read_table(f))
        planned = {(it.path, it.row) for shard in shards for it in shard}
        assert not [it for it in listing.items if (it.path, it.row) not in planned]
    before_completed_shards(output)  # the start: which shards are left
    return len(before_completed_shards(output))  # the end: the manifest's counts


def before_write_bytes(fs, path: str, data: bytes) -> None:
    """``shards._write_bytes`` before issue 18.8: a temporary file, then a rename, on every filesystem."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(f"{path}.tmp", "wb") as f:
        f.write(data)
    fs.mv(f"{path}.tmp", path)


# ------------------------------------------------------------------------------------------ the runs
def _marker(shard: int) -> bytes:
    """A marker as write_shard writes it (7 data columns' bytes and 3 buckets: the size of a real one)."""
    return json.dumps({"shard": shard, "inputs": 512, "rows": 510, "errors": 2, "write_seconds": 1.5,
                       "bytes": {c: 1_000_000 + shard for c in ("image", "sketches", "latents", "tagger_tokens",
                                                                "clip_tokens", "sketch_mask", "reference_mask")},
                       "buckets": {"1024x1024": 300, "832x1216": 150, "1216x832": 60}}, indent=1).encode()


def _measure(cls, fn) -> tuple[float, dict]:
    cls.counts.clear()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started, dict(cls.counts)


def _make_corpus(cls, base: str, keys: int) -> None:
    fs = cls()
    if issubclass(cls, MemoryFileSystem):
        for i in range(keys):
            fs.pipe_file(f"{base}/corpus/{i // 1000:03d}/img_{i:07d}.png", b"")
        return
    for folder in range(math.ceil(keys / 1000)):
        path = f"{base}/corpus/{folder:03d}"
        fs.makedirs(path, exist_ok=True)
        for i in range(folder * 1000, min(keys, folder * 1000 + 1000)):
            open(f"{path}/img_{i:07d}.png", "wb").close()


def bench_resubmit(args, emit, store: str, cls, base: str) -> None:
    corpus, output = f"{cls.protocol}://{base}/corpus", f"{cls.protocol}://{base}/out"
    cfg = PreprocessConfig(preset="tiny", shard_size=args.keys_per_shard)
    fs, root = fsspec.core.url_to_fs(output)
    _make_corpus(cls, base, args.keys)
    latency = args.latency_ms / 1000 if store == "memory" else 0.0
    cls.latency = latency
    seconds, counts = _measure(cls, lambda: load_or_create_plan(corpus, output, cfg))
    shards = len(load_or_create_plan(corpus, output, cfg).shards)
    record = {"bench": "resubmit", "store": store, "latency_ms": latency * 1000, "corpus_keys": args.keys,
              "shards": shards}
    emit({**record, "variant": "first_run_listing", "seconds": round(seconds, 3), "requests": counts,
          "requests_total": sum(counts.values())})
    cls.latency = 0.0
    finished = int(shards * 0.9)
    for k in range(finished):
        write_whole(fs, shard_file(root, MARKERS, k), _marker(k))
    completed_shards(output, keep_index=True)  # the index, as the run that wrote these shards left it
    cls.latency = latency
    runs = {
        "before": lambda: before_resubmit(corpus, output),
        "after": lambda: (load_or_create_plan(corpus, output, cfg),
                          write_marker_index(output, completed_shards(output, keep_index=True))),
    }
    for variant, fn in runs.items():
        seconds, counts = _measure(cls, fn)
        emit({**record, "variant": variant, "finished_shards": finished, "seconds": round(seconds, 3),
              "requests": counts, "requests_total": sum(counts.values())})
    cls.latency = 0.0
    for k in range(finished, shards):  # a killed run wrote the last 10% of the markers, not the index
        write_whole(fs, shard_file(root, MARKERS, k), _marker(k))
    cls.latency = latency
    seconds, counts = _measure(cls, runs["after"])
    emit({**record, "variant": "after_killed", "finished_shards": shards, "unindexed_markers": shards - finished,
          "seconds": round(seconds, 3), "requests": counts, "requests_total": sum(counts.values())})
    cls.latency = 0.0


def bench_shard_write(args, emit, store: str, cls, base: str) -> None:
    output = f"{cls.protocol}://{base}/write"
    fs, root = fsspec.core.url_to_fs(output)
    if issubclass(cls, MemoryFileSystem):  # the in-memory store scans all its keys per HEAD: start it empty
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
    rows = [{"ordinal": i, "source": f"s{i}", "error": "unreadable: bench", "error_stage": "read", "shard": 0}
            for i in range(args.keys_per_shard)]
    table = pa.Table.from_pylist(rows, schema=encoded_schema())
    write_shard(output, 0, table, len(rows))  # the real files, whose bytes both variants write
    payloads = [fs.cat_file(shard_file(root, folder, 0)) for folder in (DATA, ERRORS, MARKERS)]
    latency = args.latency_ms / 1000 if store == "memory" else 0.0
    cls.latency = latency
    n = 50

    def write_all(write, variant):
        for k in range(n):
            for folder, data in zip((DATA, ERRORS, MARKERS), payloads):  # the marker last, as write_shard
                write(fs, shard_file(f"{root}/{variant}", folder, k), data)

    seconds, counts = _measure(cls, lambda: write_all(write_whole, "after"))
    before_seconds, before_counts = _measure(cls, lambda: write_all(before_write_bytes, "before"))
    record = {"bench": "shard_write", "store": store, "latency_ms": latency * 1000, "shards_written": n,
              "bytes_per_shard": sum(map(len, payloads))}
    for variant, secs, counted, copied in (("before", before_seconds, before_counts, sum(map(len, payloads))),
                                           ("after", seconds, counts, 0)):
        emit({**record, "variant": variant, "requests_per_shard": {k: v / n for k, v in sorted(counted.items())},
              "requests_per_shard_total": sum(counted.values()) / n, "seconds_per_shard": round(secs / n, 5),
              "copied_bytes_per_shard": copied if store == "memory" else 0})
    cls.latency = 0.0


def bench_storage(args, emit) -> None:
    for store in args.stores.split(","):
        if store == "memory":
            cls, base, scratch = counting_filesystem(MemoryFileSystem, "benchmem", REQUESTS["memory"]), "/bench", None
        elif store == "local":
            scratch = tempfile.mkdtemp(prefix="bench-storage-")
            cls, base = counting_filesystem(LocalFileSystem, "benchlocal", REQUESTS["local"]), scratch
        else:
            raise ValueError(f"unknown store {store!r}: memory or local")
        try:
            bench_resubmit(args, emit, store, cls, base)
            bench_shard_write(args, emit, store, cls, base)
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
