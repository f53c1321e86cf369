"""Dynamic batching of session calls, with a bounded queue and online cost estimates.

Greedy: an idle batcher runs a lone request at once (on the event loop when the call is predicted
to be tiny, where a thread hop would cost more than the inference). Requests that arrive while a
call is running queue up and go together in the next call, up to `max_batch` rows; under
concurrent load the worker also waits up to `max_delay_s` for stragglers to fill the batch.
A full queue raises `Overloaded` rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.core.errors import Overloaded, ShuttingDown

RunFn = Callable[[np.ndarray], np.ndarray]


class CostModel:
    """Exponentially weighted least squares of call time against batch rows: t ~ a + b * rows.

    Old observations fade with `decay` per update, so the estimate follows load and hardware.
    """

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + rows
        self._y = d * self._y + seconds
        self._xx = d * self._xx + rows * rows
        self._xy = d * self._xy + rows * seconds

    def predict(self, rows: int) -> float:
        """Predicted seconds for one call of `rows` rows (0 before any observation)."""
        if self._w == 0.0:
            return 0.0
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var <= 1e-12:  # one batch size seen so far: scale the mean per row
            return my * rows / mx if mx > 0 else my
        slope = max(0.0, (self._xy / self._w - mx * my) / var)
        base = max(0.0, my - slope * mx)
        return base + slope * rows


class Ewma:
    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.value = 0.0

    def update(self, x: float) -> None:
        self.value += self.alpha * (x - self.value)


@dataclass(slots=True)
class Timing:
    """Where one request's time went inside the batcher (seconds)."""

    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_rows: int = 0


@dataclass(slots=True)
class _Item:
    x: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, Timing]]
    enqueued: float = field(default_factory=time.perf_counter)


BatchHook = Callable[[int, float, list[float]], None]


class DynamicBatcher:
    """Coalesces concurrent `submit(x[n, L, C])` calls into few `run(X[N, L, C])` calls."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        inline_max_s: float,
        executor: Executor | None,
        on_batch: BatchHook | None = None,
        load_hint: Callable[[], int] | None = None,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.inline_max_s = inline_max_s
        self._executor = executor
        self._on_batch = on_batch
        self._load_hint = load_hint or (lambda: 0)
        self.cost = CostModel()
        self.wait = Ewma()
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._running_rows = 0
        self._busy = False
        self._closed = False
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    @property
    def queue_len(self) -> int:
        return len(self._queue)

    def predicted_latency_s(self, rows: int) -> float:
        """Queue wait + compute a request of `rows` rows would see if submitted now."""
        backlog = 0.0
        if self._busy:
            backlog = self.cost.predict(self._running_rows) / 2 + self.cost.predict(
                self._queued_rows
            )
        return max(self.wait.value, backlog) + self.cost.predict(rows)

    def retry_after_s(self) -> int:
        per_call = self.cost.predict(self.max_batch)
        calls = max(1, self._queued_rows // self.max_batch)
        return max(1, math.ceil(per_call * calls))

    def timed_run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        y = self._run(x)
        return y, time.perf_counter() - t0

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, Timing]:
        if self._closed:
            raise ShuttingDown("model is being unloaded")
        rows = x.shape[0]
        if (
            not self._busy
            and self._load_hint() <= 1
            and self.cost.predict(rows) <= self.inline_max_s
        ):
            y, dt = self.timed_run(x)
            self._record(rows, dt, [0.0])
            return y, Timing(0.0, dt, rows)
        if len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"batch queue full ({self.max_queue} requests)", retry_after_s=self.retry_after_s()
            )
        future: asyncio.Future[tuple[np.ndarray, Timing]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append(_Item(x, future))
        self._queued_rows += rows
        self._busy = True
        self._arrived.set()
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="batcher")
        return await future

    def _record(self, rows: int, seconds: float, waits: list[float]) -> None:
        self.cost.observe(rows, seconds)
        for w in waits:
            self.wait.update(w)
        if self._on_batch is not None:
            self._on_batch(rows, seconds, waits)

    def _take(self) -> list[_Item]:
        items = [self._queue.popleft()]
        rows = items[0].x.shape[0]
        shape = items[0].x.shape[1:]
        while self._queue:
            nxt = self._queue[0]
            if rows + nxt.x.shape[0] > self.max_batch or nxt.x.shape[1:] != shape:
                break
            items.append(self._queue.popleft())
            rows += nxt.x.shape[0]
        self._queued_rows -= rows
        return items

    async def _gather_stragglers(self) -> None:
        """Under concurrent load, give requests already in flight a moment to join the batch."""
        deadline = time.perf_counter() + self.max_delay_s
        while self._queued_rows < self.max_batch and self._load_hint() > len(self._queue):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._busy = False
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # One loop turn lets requests whose bytes already arrived reach the queue.
            await asyncio.sleep(0)
            if self.max_delay_s > 0:
                await self._gather_stragglers()
            items = self._take()
            batch = items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
            rows = batch.shape[0]
            started = time.perf_counter()
            waits = [started - i.enqueued for i in items]
            self._running_rows = rows
            try:
                if self._executor is None or self.cost.predict(rows) <= self.inline_max_s:
                    y, dt = self.timed_run(batch)
                else:
                    y, dt = await loop.run_in_executor(self._executor, self.timed_run, batch)
            except Exception as exc:  # the session failed: every waiter gets the error
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._running_rows = 0
            self._record(rows, dt, waits)
            offset = 0
            for item, wait in zip(items, waits, strict=True):
                n = item.x.shape[0]
                if not item.future.done():
                    item.future.set_result((y[offset : offset + n], Timing(wait, dt, rows)))
                offset += n

    async def close(self) -> None:
        """Refuse new work, let queued work finish, stop the worker."""
        self._closed = True
        while self._queue or self._running_rows:
            await asyncio.sleep(0.005)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
