"""Whole-file writes: a reader finds a file complete or not at all, whatever the filesystem.

How that is achieved depends on what a single write guarantees:

* an object store (S3, GCS, Azure Blob, fsspec's in-memory store) makes an object visible only when its
  upload completes: a PUT, or the last call of a multipart upload. A writer killed halfway leaves no object
  (at most an unfinished multipart upload, which a bucket lifecycle rule aborts). So the bytes go straight
  to their final name: one request, no copy. Write-then-rename there cost a PUT, a server-side copy of every
  byte (S3 has no rename) and a delete: 17 calls per shard and a second pass over the 9–14 TB dataset.
* a POSIX-like filesystem (local disks, NFS, anything not known to be an object store) shows a file while it
  is being written, so a killed writer could leave a truncated file under the final name. There the bytes go
  to ``<path>.tmp`` first and a rename, atomic on POSIX, gives them their name.

Either way the marker of a shard is written after its data, so a shard whose files are partial or missing is
never taken for done (:mod:`pipelines.data.layout`).
"""

from __future__ import annotations

import posixpath

# fsspec protocols whose single-object write becomes visible only once complete (s3fs, gcsfs, adlfs, and the
# in-memory store, which commits a file's bytes when it is closed). Unknown filesystems get the safe path.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "memory"})
TEMPORARY_SUFFIX = ".tmp"


def _protocols(fs) -> set[str]:
    """The protocols of ``fs``'s class and of the classes it derives from (a subclass of an object store's
    filesystem, e.g. one that counts or throttles requests, writes as that store does)."""
    found = set()
    for cls in type(fs).__mro__:
        protocol = cls.__dict__.get("protocol")
        if protocol:
            found.update([protocol] if isinstance(protocol, str) else protocol)
    return found


def writes_whole_objects(fs) -> bool:
    """Whether one write of ``fs`` is all-or-nothing, so no temporary file and rename are needed."""
    return bool(_protocols(fs) & OBJECT_STORE_PROTOCOLS)


def write_whole(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (an fsspec path of ``fs``) so that no reader ever sees part of it: a
    single upload on an object store, a temporary file then a rename elsewhere."""
    if writes_whole_objects(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temporary = path + TEMPORARY_SUFFIX
    with fs.open(temporary, "wb") as f:
        f.write(data)
    fs.mv(temporary, path)
