"""How the model runs behind the API, with or without Ray: requests gathered into batches, errors kept to
the request that caused them, and generations stopped between denoising steps once nobody waits for them.

- :class:`Batcher` gathers concurrent requests (one batch runs at a time, in a worker thread). Dispatch is
  adaptive: a request that finds the model idle after a lone request (or after a quiet spell) starts at
  once, so a lone client never waits out a batch window; after a batch of n > 1 the next one waits for n
  requests, since clients that were served together come back together, up to ``window_s`` after the
  batch ended (up to 4 windows when the batch ran long: see :meth:`Batcher.hold_s`); requests that arrive
  while a batch runs form the next one.
- :class:`ModelRunner` runs a batch: requests with equal options as one ``colorize_batch`` call. A call
  that fails is retried one request at a time, so a request that breaks the model fails alone; each
  result is ``{"image": array}`` or ``{"error": message, "status": 422 | 500}``. A caller that stops
  waiting (its coroutine is cancelled: a client that disconnected) marks its request cancelled; a group
  whose requests are all cancelled stops before its next denoising step (:class:`model.generate.Cancelled`),
  a group with some still wanted runs to the end for them, and cancelled requests still queued never run.
- :class:`LocalBackend` is the API's backend without Ray (``bench/serve.py``'s ``http`` mode, the tests,
  ``python -m serve.http_server``); ``serve/app.py`` puts the same runner and batcher in its replicas.

Nothing here imports Ray; torch is imported by the model only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve.api import ColorizeRequest, ModelInfo
from serve.errors import ApiError

log = logging.getLogger("colorize_xl.serve")

INVALID = 422  # the model refused the request's combination (a ValueError): the client's to fix
FAILED = 500  # anything else: ours; the client gets a generic message, the log gets the traceback
FAILED_MESSAGE = "the model failed on this request"


@dataclass(eq=False)
class Pending:
    """One request waiting for, or in, a batch. ``cancelled`` is set on the event loop when the caller stops
    waiting, and read by the worker thread between denoising steps (a plain bool: no lock needed)."""

    request: ColorizeRequest
    future: asyncio.Future | None = None
    cancelled: bool = False


def raise_for_error(result: dict) -> np.ndarray:
    """A runner's result → the image, or the exception the API turns into the right status."""
    if "error" not in result:
        return result["image"]
    if result.get("status") == INVALID:
        raise ValueError(result["error"])
    raise ApiError(FAILED, FAILED_MESSAGE)


# ------------------------------------------------------------------------------------------ running
def model_thread() -> ThreadPoolExecutor:
    """The one thread a served model computes on, loading included. Each thread that runs torch on CPU
    gets its own OpenMP team; a model loaded on one thread and run on others keeps two teams that thrash
    (measured: the tiny preset takes 0.25 s instead of 0.09 s a request on 2 cores)."""
    return ThreadPoolExecutor(1, thread_name_prefix="colorize-model")


class ModelRunner:
    """Runs batches of :class:`Pending` requests on one :class:`model.colorizer.Colorizer` (in the calling
    thread); counts what it did in :attr:`stats`."""

    def __init__(self, model):
        self.model = model
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {
            "batches": 0,  # batches run
            "calls": 0,  # colorize_batch calls (a group, or one request of a group being retried alone)
            "requests": 0,  # requests that got a result (image or error)
            "steps": 0,  # denoising steps run, summed over calls
            "cancelled_runs": 0,  # calls stopped early because nobody waited for them
            "cancelled_steps": 0,  # denoising steps those calls had run when they stopped
            "skipped": 0,  # requests cancelled before they ran
            "isolated": 0,  # failed groups retried one request at a time
            "failed": 0,  # requests answered with a 500 entry
            "busy_ms": 0,  # wall time spent running batches (over a stretch of load: how idle the model was)
        }

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self.stats[name] += amount

    def run(self, batch: list[Pending]) -> list[dict | None]:
        """One result per request (``None`` for a request nobody waits for any more)."""
        started = time.perf_counter()
        self._count(batches=1)
        groups: dict[Any, list[int]] = defaultdict(list)
        for index, pending in enumerate(batch):
            groups[pending.request.options].append(index)
        results: list[dict | None] = [None] * len(batch)
        try:
            for indices in groups.values():
                for index, result in zip(indices, self._run_group([batch[i] for i in indices])):
                    results[index] = result
        finally:
            self._count(busy_ms=round((time.perf_counter() - started) * 1000))
        return results

    def _run_group(self, members: list[Pending]) -> list[dict | None]:
        wanted = [m for m in members if not m.cancelled]
        self._count(skipped=len(members) - len(wanted))
        if not wanted:
            return [None] * len(members)
        from model.generate import Cancelled

        try:
            images = self._colorize(wanted)
        except Cancelled:
            outcome: dict[int, dict | None] = {}
        except Exception as err:
            if len(wanted) == 1:
                outcome = {id(wanted[0]): self._error(err)}
            else:  # one request may have broken the call: retry each alone, so only it fails
                self._count(isolated=1)
                outcome = {id(m): self._run_group([m])[0] for m in wanted}
        else:
            outcome = {id(m): {"image": np.asarray(image)} for m, image in zip(wanted, images)}
            self._count(requests=len(wanted))
        return [outcome.get(id(m)) for m in members]

    def _colorize(self, members: list[Pending]) -> list:
        from model.generate import Cancelled

        requests = [m.request for m in members]
        options = requests[0].options
        backgrounds = [r.background_reference for r in requests]
        self._count(calls=1)
        try:
            images = self.model.colorize_batch(
                [r.sketch for r in requests], [r.reference for r in requests], options,
                seeds=[r.seed for r in requests],
                background_references=backgrounds if any(b is not None for b in backgrounds) else None,
                should_stop=lambda: all(m.cancelled for m in members))
        except Cancelled as stopped:
            self._count(steps=stopped.steps, cancelled_runs=1, cancelled_steps=stopped.steps)
            log.info("stopped a generation of %d request(s) after %d of %d steps: nobody waits for it",
                     len(members), stopped.steps, options.steps)
            raise
        self._count(steps=options.steps)
        return images

    def _error(self, err: Exception) -> dict:
        if isinstance(err, ValueError):
            self._count(requests=1)
            return {"error": str(err), "status": INVALID}
        log.error("colorize failed", exc_info=err)
        self._count(requests=1, failed=1)
        return {"error": FAILED_MESSAGE, "status": FAILED}


# ------------------------------------------------------------------------------------------ batching
class Batcher:
    """Gathers requests for ``run_batch`` (a blocking callable: list of :class:`Pending` → one result or
    ``None`` each), which runs in a worker thread, one batch at a time; see the module docstring for when
    a batch starts. Use from one event loop at a time."""

    def __init__(self, run_batch: Callable[[list[Pending]], list[dict | None]], max_batch_size: int = 4,
                 window_s: float = 0.05, executor: ThreadPoolExecutor | None = None):
        if max_batch_size < 1 or window_s < 0:
            raise ValueError("max_batch_size must be at least 1 and window_s at least 0")
        self.run_batch = run_batch
        self.executor = executor or model_thread()
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self._queue: deque[Pending] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._last_size = 0  # requests in the last batch, plus those queued when it ended
        self._last_end = float("-inf")  # when it ended (loop time)
        self._last_run = 0.0  # how long it ran (s)

    @property
    def queued(self) -> int:
        return sum(not p.cancelled for p in self._queue)

    async def submit(self, request: ColorizeRequest) -> dict:
        """The runner's result for ``request``; cancelling the caller marks the request cancelled."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new loop (tests): queue state belongs to one loop
            self._loop, self._arrived, self._worker, self._queue = loop, asyncio.Event(), None, deque()
        pending = Pending(request, loop.create_future())

        def _done(future: asyncio.Future) -> None:
            if future.cancelled():
                pending.cancelled = True

        pending.future.add_done_callback(_done)
        self._queue.append(pending)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.cancelled = True
            raise

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(loop)
            started = loop.time()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, batch)
            except Exception:  # the runner's own bug: nobody may hang on it
                log.exception("a batch failed as a whole")
                results = [{"error": FAILED_MESSAGE, "status": FAILED}] * len(batch)
            # the clients known to be active: this batch's, and those that queued while it ran
            self._last_size, self._last_end = len(batch) + self.queued, loop.time()
            self._last_run = self._last_end - started
            for pending, result in zip(batch, results):
                if pending.future.done():
                    continue
                if result is None:  # not run because cancelled; a caller still waiting must not hang
                    result = {"error": FAILED_MESSAGE, "status": FAILED}
                pending.future.set_result(result)

    def hold_s(self) -> float:
        """How long after a batch of n > 1 ends the next one may wait for n: ``window_s``, or up to four times
        that when the batch ran long (its clients need a round trip through the HTTP front to come back,
        which on a busy host takes longer than a short window)."""
        return max(self.window_s, min(4 * self.window_s, self._last_run / 2))

    def _take_live(self) -> None:
        while self._queue and self._queue[0].cancelled:
            self._queue.popleft()
        if any(p.cancelled for p in self._queue):
            self._queue = deque(p for p in self._queue if not p.cancelled)

    async def _collect(self, loop) -> list[Pending]:
        while True:
            self._take_live()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            hold = self.hold_s()
            recently_busy = loop.time() - self._last_end <= hold
            expected = min(self.max_batch_size, self._last_size) if recently_busy else 1
            deadline = self._last_end + hold
            while len(self._queue) < expected and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                finally:
                    self._take_live()
            if self._queue:  # else all were cancelled while we waited
                return [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]


# ---------------------------------------------------------------------------------------- no Ray
class LocalBackend:
    """The API's backend without Ray: one model in this process, batches in a worker thread.

    ``max_batch_size=1`` runs one generation at a time. A cancelled ``colorize`` call (the API cancels it
    when its client disconnects) stops its generation between denoising steps."""

    def __init__(self, model, info: ModelInfo, max_batch_size: int = 4, batch_wait_timeout_s: float = 0.05,
                 executor: ThreadPoolExecutor | None = None):
        self.runner = ModelRunner(model)
        self.batcher = Batcher(self.runner.run, max_batch_size, batch_wait_timeout_s, executor)
        self._info = info

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu", dtype: str = "float32", **kwargs) -> "LocalBackend":
        import torch

        from model.colorizer import Colorizer, read_config

        executor = model_thread()
        model = executor.submit(Colorizer.from_pretrained, folder, device=device, dtype=getattr(torch, dtype)).result()
        info = ModelInfo.from_config(read_config(folder), plugin=(Path(folder) / "plugin").is_dir())
        return cls(model, info, executor=executor, **kwargs)

    def info(self) -> ModelInfo:
        return self._info

    def stats(self) -> dict:
        return {**self.runner.stats, "queued": self.batcher.queued}

    async def colorize(self, request: ColorizeRequest) -> np.ndarray:
        return raise_for_error(await self.batcher.submit(request))
