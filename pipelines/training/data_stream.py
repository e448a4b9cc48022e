"""The training rows as an endless stream with a position, so that a restart continues the epoch instead of
replaying its head.

Every epoch reads the dataset's shard files in an order shuffled from the run seed and the epoch
(:func:`epoch_order`); the files still to read in an epoch are dealt to the workers in turn, and each worker
reads its files in that order and draws rows from a small shuffle buffer. The stream records which rows
it has handed to training (:class:`DataPosition`: per epoch, the shards read to the end and the row
ordinals taken from the others); the loop gathers the workers' positions into every checkpoint, and a
resumed run, at any worker count, reads only what that epoch has not given yet.

Why not Ray Data's ``FileShuffleConfig``: its order is reseeded by an execution counter that a restart
resets and the trainer cannot see, so no checkpoint can say where in that order training stood. Ray Data
still does the reading and the decoding (one ``read_parquet`` → ``map_batches(decode_rows)`` per worker and
epoch, in order, with prefetch); the order and the position are plain data here, testable without Ray.

Rows handed to training but still waiting in the bucket buffers at a checkpoint count as seen: at most
``buckets × (batch_size − 1)`` rows per worker leave the epoch unseen after a restart.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

POSITION_COLUMNS = ["shard", "ordinal"]  # how a row is recognised: its shard file and its place in it


def epoch_order(shards: int, seed: int, epoch: int) -> list[int]:
    """The shard numbers ``0 .. shards-1`` in the order epoch ``epoch`` of a run seeded ``seed`` reads them."""
    order = list(range(shards))
    random.Random(f"colorize-files/{seed}/{epoch}").shuffle(order)
    return order


@dataclass
class EpochProgress:
    """What one epoch has given to training: shards read to their end, and the rows taken from the others."""

    done: set[int] = field(default_factory=set)
    seen: dict[int, set[int]] = field(default_factory=dict)  # shard → ordinals handed out (shards not done)

    def rows_seen(self) -> int:
        return sum(len(ordinals) for ordinals in self.seen.values())


@dataclass
class DataPosition:
    """Where a run stands in its data: the first epoch not finished, and the progress of that epoch and of
    any later one a fast worker has begun. Independent of the worker count."""

    epoch: int = 0
    epochs: dict[int, EpochProgress] = field(default_factory=dict)

    def progress(self, epoch: int) -> EpochProgress:
        return self.epochs.setdefault(epoch, EpochProgress())

    def to_state(self) -> dict:
        """Plain lists and ints, for a checkpoint's client state."""
        return {"epoch": self.epoch,
                "epochs": {str(e): {"done": sorted(p.done), "seen": {str(s): sorted(o) for s, o in p.seen.items()}}
                           for e, p in sorted(self.epochs.items())}}

    @classmethod
    def from_state(cls, state: dict | None) -> DataPosition:
        if not state:
            return cls()
        epochs = {int(e): EpochProgress(set(p["done"]), {int(s): set(o) for s, o in p["seen"].items()})
                  for e, p in state["epochs"].items()}
        return cls(int(state["epoch"]), epochs)

    @classmethod
    def merge(cls, positions: list[DataPosition], shards: int) -> DataPosition:
        """The workers' positions as one: per epoch, the union of what each worker has handed out; epochs
        whose every shard is done are dropped and the position moves past them."""
        merged = cls(min(p.epoch for p in positions))
        for position in positions:
            for epoch, progress in position.epochs.items():
                into = merged.progress(epoch)
                into.done |= progress.done
                for shard, ordinals in progress.seen.items():
                    into.seen.setdefault(shard, set()).update(ordinals)
        for progress in merged.epochs.values():
            progress.seen = {s: o for s, o in progress.seen.items() if s not in progress.done}
        while merged.epoch in merged.epochs and len(merged.epochs[merged.epoch].done) >= shards:
            merged.epoch += 1
        merged.forget_before(merged.epoch)
        return merged

    def forget_before(self, epoch: int) -> None:
        """Drop the epochs before ``epoch`` (finished by every worker together)."""
        self.epoch = max(self.epoch, epoch)
        self.epochs = {e: p for e, p in self.epochs.items() if e >= self.epoch}


class DataStream:
    """One worker's rows, epoch after epoch, from ``position`` on.

    ``read(shards, epoch)`` yields the rows of those shard files in that order (each row a dict with at
    least the :data:`POSITION_COLUMNS`) for epoch ``epoch``; the loop passes :func:`ray_data_reader`. Rows leave through a shuffle buffer of
    ``shuffle_buffer`` rows drawn with a seeded generator, and :attr:`position` follows them out."""

    def __init__(self, read: Callable[[list[int], int], Iterator[dict]], *, shards: int, seed: int, rank: int = 0,
                 world: int = 1, position: DataPosition | None = None, shuffle_buffer: int = 256):
        if shards < world:
            raise ValueError(f"{shards} shard files cannot feed {world} workers: every worker reads whole files; "
                             "preprocess with a smaller --shard-size or train with fewer workers")
        self.read, self.shards, self.seed, self.rank, self.world = read, shards, seed, rank, world
        self.position = position or DataPosition()
        self.shuffle_buffer = shuffle_buffer

    def files(self, epoch: int) -> list[int]:
        """This worker's shards of ``epoch``: those not done yet, dealt in turn to the workers."""
        done = self.position.progress(epoch).done
        return [s for s in epoch_order(self.shards, self.seed, epoch) if s not in done][self.rank::self.world]

    def __iter__(self) -> Iterator[dict]:
        epoch = self.position.epoch
        while True:
            yield from self.epoch_rows(epoch)
            epoch += 1

    def epoch_rows(self, epoch: int) -> Iterator[dict]:
        """Epoch ``epoch``'s rows for this worker, minus those the position says were handed out already."""
        progress = self.position.progress(epoch)
        files = self.files(epoch)
        skip = {s: set(progress.seen.get(s, ())) for s in files}
        place = {shard: i for i, shard in enumerate(files)}
        rng = random.Random(f"colorize-rows/{self.seed}/{epoch}/{self.rank}")
        buffer: list[dict] = []
        waiting: Counter[int] = Counter()  # rows of each shard in the buffer
        read_to = 0  # files[:read_to] have been read to their end

        def finish_reading(upto: int) -> None:
            nonlocal read_to
            for shard in files[read_to:upto]:
                if not waiting[shard]:
                    self._done(progress, shard)
            read_to = max(read_to, upto)

        def hand_out() -> dict:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            row = buffer.pop()
            shard = int(row["shard"])
            waiting[shard] -= 1
            progress.seen.setdefault(shard, set()).add(int(row["ordinal"]))
            if not waiting[shard] and place[shard] < read_to:
                self._done(progress, shard)
            return row

        for row in self.read(files, epoch) if files else ():
            shard, ordinal = int(row["shard"]), int(row["ordinal"])
            if shard not in place or place[shard] < read_to:
                raise RuntimeError(f"shard {shard} arrived out of the reading order {files}: the reader must "
                                   "yield the files in the order given")
            finish_reading(place[shard])
            if ordinal in skip[shard]:
                continue
            buffer.append(row)
            waiting[shard] += 1
            if len(buffer) > self.shuffle_buffer:
                yield hand_out()
        finish_reading(len(files))
        while buffer:
            yield hand_out()

    @staticmethod
    def _done(progress: EpochProgress, shard: int) -> None:
        progress.done.add(shard)
        progress.seen.pop(shard, None)


def shard_path(dataset: str, shard: int) -> str:
    """A shard's data file under a preprocess output folder (local path or URI)."""
    from pipelines.data.layout import DATA, shard_name

    return f"{dataset.rstrip('/')}/{DATA}/{shard_name(shard)}.parquet"


def ray_data_reader(dataset: str, columns: list[str], batch_size: int = 16, prefetch_batches: int = 4,
                    decode=None) -> Callable[[list[int], int], Iterator[dict]]:
    """``read(shards, epoch)`` for :class:`DataStream`: Ray Data reads the files in the given order
    (``preserve_order``) and yields row dicts of ``columns`` plus the position columns, ``prefetch_batches``
    batches of ``batch_size`` rows ahead of the caller.

    With ``decode`` (:class:`pipelines.data.batches.DecodeSettings`) the rows are decoded inside Ray Data
    by a ``map_batches`` stage (:func:`pipelines.data.batches.decode_rows`, CPU tasks), so the rows that
    arrive hold ready tensors and decoding overlaps training; without it they arrive as stored."""

    def read(shards: list[int], epoch: int) -> Iterator[dict]:
        import ray.data

        from pipelines.data.batches import decode_rows, rows_of

        wanted = list(dict.fromkeys([*columns, *POSITION_COLUMNS]))
        dataset_ = ray.data.read_parquet([shard_path(dataset, s) for s in shards], columns=wanted)
        dataset_.context.execution_options.preserve_order = True
        if decode is not None:
            dataset_ = dataset_.map_batches(decode_rows, batch_size=batch_size, batch_format="numpy",
                                            fn_kwargs={"settings": decode, "epoch": epoch})
        yield from rows_of(dataset_.iter_batches(batch_size=batch_size, batch_format="numpy",
                                                 prefetch_batches=prefetch_batches))

    return read
