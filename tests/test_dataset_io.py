"""The preprocess job's dealings with storage (issue 18, points 4 and 8), on real fsspec filesystems: the
in-memory store standing in for an object store, subclassed only to count the requests, and the local disk.

* a resubmission reuses the plan's listing (no listing call), ``relist`` picks up a new input as a new
  shard and counts a vanished one, another ``--input`` is refused;
* finished shards come from one listing of ``markers/`` plus the index, not a request per shard; markers the
  index lacks (a killed run's) are read, a deleted marker is dropped;
* an object store gets each file in one write, no rename or copy; a local disk gets a temporary file and a
  rename; a write killed before the marker never makes a shard look done.
"""

from __future__ import annotations

import json
from collections import Counter

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from pipelines.data.layout import (MARKER_INDEX_FILE, completed_shards, done_shards, load_or_create_plan,
                                   read_marker_index)
from pipelines.data.shards import PreprocessConfig, encoded_schema, write_shard
from pipelines.data.writes import writes_whole_objects

COUNTED = ("ls", "find", "glob", "info", "cat_file", "_open", "pipe_file", "mv", "cp_file", "copy", "rm", "_rm")


class CountingMemoryFileSystem(MemoryFileSystem):
    """fsspec's in-memory store with its own keys, counting each call a remote store would answer with a
    request (listings, reads, writes, copies, deletes)."""

    protocol = "countmem"
    store: dict = {}
    pseudo_dirs = [""]
    calls: Counter = Counter()
    writes: list = []  # paths written, in order

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("countmem://"))

    def pipe_file(self, path, value, **kwargs):
        self.writes.append(self._strip_protocol(path))
        return super().pipe_file(path, value, **kwargs)


def _counting(name):
    inner = getattr(CountingMemoryFileSystem, name)  # the store's own method (pipe_file: the one above)

    def method(self, *args, **kwargs):
        CountingMemoryFileSystem.calls[name] += 1
        return inner(self, *args, **kwargs)
    return method


for _name in COUNTED:
    setattr(CountingMemoryFileSystem, _name, _counting(_name))
fsspec.register_implementation("countmem", CountingMemoryFileSystem, clobber=True)


@pytest.fixture
def store(request):
    """A fresh folder of the counting store, with its counts reset."""
    CountingMemoryFileSystem.store.clear()
    CountingMemoryFileSystem.pseudo_dirs[:] = [""]
    CountingMemoryFileSystem.calls.clear()
    CountingMemoryFileSystem.writes.clear()
    return CountingMemoryFileSystem(), "countmem://run"


CFG = PreprocessConfig(preset="tiny", shard_size=2)


def error_shard(shard: int, inputs: int) -> pa.Table:
    """An encoded shard whose inputs all failed (what write_shard receives; no encoder needed)."""
    rows = [{"ordinal": i, "source": f"s{shard}-{i}", "error": "unreadable: test", "error_stage": "read",
             "shard": shard} for i in range(inputs)]
    return pa.Table.from_pylist(rows, schema=encoded_schema())


def test_a_resubmission_reuses_the_plans_listing_and_a_relist_appends_what_is_new(store):
    fs, root = store
    for i in range(5):
        fs.pipe(f"/run/corpus/img_{i}.png", b"x")
    fs.pipe("/run/corpus/notes.txt", b"x")
    first = load_or_create_plan(f"{root}/corpus", f"{root}/out", CFG)
    assert first.relisted and [len(s) for s in first.shards] == [2, 2, 1] and first.ignored == 1
    assert CountingMemoryFileSystem.calls["find"] == 1

    fs.pipe("/run/corpus/img_5.png", b"x")
    CountingMemoryFileSystem.calls.clear()
    again = load_or_create_plan(f"{root}/corpus/", f"{root}/out", CFG)  # another spelling of the same input
    assert CountingMemoryFileSystem.calls["find"] == CountingMemoryFileSystem.calls["ls"] == 0
    assert again.shards == first.shards and not again.relisted and again.ignored == 1
    assert again.listed_at == first.listed_at and again.listing_kind == "folder"

    fs.rm("/run/corpus/img_0.png")
    relisted = load_or_create_plan(f"{root}/corpus", f"{root}/out", CFG, relist=True)
    assert CountingMemoryFileSystem.calls["find"] == 1
    assert relisted.shards[:3] == first.shards  # finished shards keep their inputs
    assert [it.source for it in relisted.shards[3]] == ["img_5.png"]
    assert relisted.new_inputs == 1 and relisted.missing_inputs == 1
    assert load_or_create_plan(f"{root}/corpus", f"{root}/out", CFG).shards == relisted.shards  # stored

    with pytest.raises(ValueError, match="planned from countmem:///run/corpus.*--input countmem:///run/corpus"):
        load_or_create_plan(f"{root}/other", f"{root}/out", CFG)


def test_finished_shards_come_from_one_listing_and_the_index(store):
    fs, root = store
    output = f"{root}/out"
    for k in range(40):
        write_shard(output, k, error_shard(k, 1), 1)
    CountingMemoryFileSystem.calls.clear()
    markers = completed_shards(output, keep_index=True)
    assert sorted(markers) == list(range(40)) and markers[7]["errors"] == 1
    assert CountingMemoryFileSystem.calls["ls"] == 1 and CountingMemoryFileSystem.calls["cat_file"] == 40
    assert read_marker_index(output) == markers  # no index yet: every marker read (in parallel), then indexed

    CountingMemoryFileSystem.calls.clear()
    assert completed_shards(output, keep_index=True) == markers
    assert CountingMemoryFileSystem.calls["ls"] == 1 and CountingMemoryFileSystem.calls["cat_file"] == 0
    assert CountingMemoryFileSystem.calls["pipe_file"] == 0  # the index was current: nothing written

    # a killed run left two markers the index lacks, and a user removed shard 3's marker to have it redone
    write_shard(output, 40, error_shard(40, 2), 2)
    write_shard(output, 41, error_shard(41, 1), 1)
    fs.rm("/run/out/markers/shard-00003.json")
    CountingMemoryFileSystem.calls.clear()
    after = completed_shards(output, keep_index=True)
    assert sorted(after) == [k for k in range(42) if k != 3] and after[40]["inputs"] == 2
    assert CountingMemoryFileSystem.calls["cat_file"] == 2
    assert sorted(read_marker_index(output)) == sorted(after)
    assert done_shards(output) == sorted(after)


def test_an_object_store_gets_each_file_in_one_write_and_the_marker_last(store):
    fs, root = store
    assert writes_whole_objects(fs) and not writes_whole_objects(LocalFileSystem())
    CountingMemoryFileSystem.calls.clear()
    write_shard(f"{root}/out", 2, error_shard(2, 3), 3)
    assert CountingMemoryFileSystem.writes == ["/run/out/data/shard-00002.parquet",
                                               "/run/out/errors/shard-00002.parquet",
                                               "/run/out/markers/shard-00002.json"]
    assert sum(CountingMemoryFileSystem.calls[c] for c in ("mv", "cp_file", "copy", "rm", "_rm")) == 0
    assert not [p for p in fs.store if p.endswith(".tmp")]


class FailingMarkerMemoryFileSystem(CountingMemoryFileSystem):
    """The counting store whose marker writes fail for good, as when a job is killed between a shard's data
    and its marker."""

    protocol = "failmarker"

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(path.removeprefix("failmarker://"))

    def pipe_file(self, path, value, **kwargs):
        if "/markers/" in path:
            raise PermissionError(13, "killed", path)
        return super().pipe_file(path, value, **kwargs)


fsspec.register_implementation("failmarker", FailingMarkerMemoryFileSystem, clobber=True)


class NoRenameLocalFileSystem(LocalFileSystem):
    """The local disk, killed at its first rename: what a crash halfway through a write leaves."""

    def mv(self, *args, **kwargs):
        raise PermissionError(13, "killed before the rename")


def test_a_write_killed_before_its_marker_leaves_the_shard_to_be_redone(store, tmp_path):
    with pytest.raises(PermissionError):
        write_shard("failmarker://run/out", 0, error_shard(0, 1), 1)
    assert "/run/out/data/shard-00000.parquet" in CountingMemoryFileSystem.store
    assert done_shards("failmarker://run/out") == [] and completed_shards("failmarker://run/out") == {}
    write_shard("countmem://run/out", 0, error_shard(0, 1), 1)  # the next run, the same keys
    assert done_shards("countmem://run/out") == [0]

    local = tmp_path / "out"
    write_shard(str(local), 0, error_shard(0, 1), 1)
    assert sorted(p.name for p in local.rglob("*") if p.is_file()) == [
        "shard-00000.json", "shard-00000.parquet", "shard-00000.parquet"]
    from pipelines.data import writes

    with pytest.raises(PermissionError):
        writes.write_whole(NoRenameLocalFileSystem(), str(local / "markers" / "shard-00001.json"), b"{}")
    assert (local / "markers" / "shard-00001.json.tmp").exists()  # a killed write never has the final name
    assert done_shards(str(local)) == [0] and list(completed_shards(str(local))) == [0]
    assert not (local / MARKER_INDEX_FILE).exists()
    assert json.loads((local / "markers" / "shard-00000.json").read_text())["errors"] == 1
