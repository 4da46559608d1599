"""Dynamic batching: requests that share a batch key are sampled together, in one worker thread.

The event loop only submits jobs and awaits their futures; sampling runs in the batcher's own
thread (ONNX Runtime releases the GIL), so health checks and metrics answer during a long batch.

A batch starts when the worker is free and either ``max_batch`` jobs of the oldest job's key are
waiting or no job of that key has arrived for ``max_wait_ms`` (counted from the later of the last
arrival and the end of the previous batch; at most ``max_batch * max_wait_ms`` in all). While a
batch runs, new jobs accumulate and form the next one. Counting from the previous batch's end, and
restarting at each arrival, lets the clients it just answered come back and join (their answers
leave one after another): counted from the oldest arrival alone, closed-loop clients settled into
alternating batches (7 + 1, or 4 + 8 on a loaded CPU, at 8 clients and batch 8). Jobs of other keys wait their turn in arrival order (the oldest job always
chooses the next key, so no key starves). At most ``max_queue`` jobs wait (:class:`QueueFullError`
beyond), plus at most ``max_batch`` being sampled: memory is bounded whatever the load.

A cancelled job (client gone, timed out) leaves the queue at once, or, once sampling, is reported
to the runtime through the ``cancelled(i)`` callback that it polls between steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Hashable
from typing import Any

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queue holds ``max_queue`` jobs; ``retry_after`` is a guess, in seconds, of when to retry."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class BatcherStoppedError(Exception):
    """The batcher no longer accepts jobs (the service is shutting down)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request on its way through the batcher.

    Attributes:
        request: The runtime's request object.
        key: Its batch key (equal keys share a U-Net batch).
        arrived: ``time.monotonic()`` at submission.
        future: Resolves to the waveform, ``None`` if the job was cancelled, or the runtime's exception.
        cancelled: Set by :meth:`DynamicBatcher.cancel`; polled by the runtime between steps.
        batch_size: Size of the batch the job was sampled in (0 until it starts).
        started: ``time.monotonic()`` when its batch started (``None`` until then).
    """

    request: Any
    key: Hashable
    arrived: float
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    batch_size: int = 0
    started: float | None = None


class DynamicBatcher:
    """Groups jobs by batch key and runs ``runtime.generate`` on each group in a worker thread.

    Args:
        runtime: Object with ``batch_key(request)`` and ``generate(requests, cancelled)``.
        max_batch: Most jobs per batch.
        max_wait_ms: How long a batch waits for the next job of its key (restarted by each arrival).
        max_queue: Most jobs waiting (not yet sampling).
        metrics: Optional :class:`~adm_export.serving.metrics.ServingMetrics`.
    """

    def __init__(self, runtime, max_batch: int, max_wait_ms: float, max_queue: int, metrics=None):
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._batch_seconds_ema: float | None = None
        self._free_since = 0.0  # monotonic time the last batch ended

    # -- state --------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Jobs waiting for a batch."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Jobs being sampled (cancelled ones included until their batch ends)."""
        return len(self._running)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing being sampled."""
        with self._cond:
            return not self._queue and not self._running

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by one batch (at least 1), for ``Retry-After``."""
        per_batch = self._batch_seconds_ema or 1.0
        return max(1, math.ceil(per_batch * (1 + len(self._queue) / self.max_batch)))

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="adm-serve-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, finish what is queued and running, and end the worker thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(self, request) -> Job:
        """Queue a request; raises :class:`QueueFullError` or :class:`BatcherStoppedError`."""
        key = self.runtime.batch_key(request)
        with self._cond:
            if not self._accepting:
                raise BatcherStoppedError("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(self.retry_after())
            job = Job(request=request, key=key, arrived=time.monotonic())
            self._queue.append(job)
            self._gauges()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str = "client") -> None:
        """Drop a job: out of the queue now, or out of its running batch at the runtime's next step."""
        with self._cond:
            if job.cancelled or job.future.done():
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                job.future.set_result(None)
                self._gauges()
                self._cond.notify_all()
        if self.metrics is not None:
            self.metrics.cancelled.labels(reason=reason).inc()
        logger.info("request cancelled (%s)", reason)

    def cancel_all(self, reason: str = "shutdown") -> None:
        """Drop every queued and running job (a forced stop)."""
        with self._cond:
            jobs = list(self._queue) + list(self._running)
        for job in jobs:
            self.cancel(job, reason)

    # -- worker -------------------------------------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.in_flight.set(len(self._running))

    def _next_batch(self) -> list[Job] | None:
        """Wait for and take the next batch (``None``: stopped and nothing left)."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return None
                head = self._queue[0]
                batch = [j for j in self._queue if j.key == head.key][: self.max_batch]
                anchor = max(head.arrived, self._free_since)
                last = max(anchor, max(j.arrived for j in batch))
                remaining = min(last + self.max_wait, anchor + self.max_wait * self.max_batch) - time.monotonic()
                if len(batch) >= self.max_batch or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)  # more jobs, a cancel, or the wait is over: look again
            for j in batch:
                self._queue.remove(j)
            now = time.monotonic()
            for j in batch:
                j.started, j.batch_size = now, len(batch)
            self._running = batch
            self._gauges()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
            for j in batch:
                self.metrics.queue_wait.observe(j.started - j.arrived)
        t0 = time.monotonic()
        try:
            waves = self.runtime.generate([j.request for j in batch], cancelled=lambda i: batch[i].cancelled)
            if len(waves) != len(batch):
                raise RuntimeError(f"runtime returned {len(waves)} clips for a batch of {len(batch)}")
        except BaseException as exc:  # every waiting client gets the failure
            logger.exception("batch of %d failed", len(batch))
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(exc)
            waves = None
        else:
            for j, w in zip(batch, waves):
                if not j.future.done():
                    j.future.set_result(None if j.cancelled else w)
        seconds = time.monotonic() - t0
        self._batch_seconds_ema = seconds if self._batch_seconds_ema is None else (
            0.7 * self._batch_seconds_ema + 0.3 * seconds)
        with self._cond:
            self._running = []
            self._free_since = time.monotonic()
            self._gauges()
            self._cond.notify_all()
        if self.metrics is not None:
            self.metrics.batch_seconds.observe(seconds)
            if waves is not None:
                self.metrics.clips_done(sum(1 for j, w in zip(batch, waves) if w is not None and not j.cancelled))
        logger.debug("batch of %d in %.3f s", len(batch), seconds)
