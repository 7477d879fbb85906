"""Micro-batching for the patch service: requests that arrive together share one generator call.

`MicroBatcher.submit(item)` queues an item; a background task takes everything queued within
`max_wait_ms` of the oldest waiting item (at most `max_batch`), runs the batch function once in a
worker thread so the event loop keeps reading requests meanwhile, and hands each submitter its own
result or its own exception. Torch-free: the batch function is whatever the caller gives.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from device_runtime.errors import MntoolError

Item = TypeVar("Item")
Result = TypeVar("Result")


class Overloaded(MntoolError):
    """More requests are waiting than the service is configured to queue."""


class BatchTimeout(MntoolError):
    """An item's result was not ready within its timeout."""


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 64  # items per generator call; 1 turns batching off
    max_wait_ms: float = 2.0  # how long the oldest item may wait for others to join its batch
    max_queue: int = 1024  # waiting items beyond this are refused at once (load shedding)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise MntoolError(f"batching needs max_batch >= 1, max_queue >= 1, max_wait_ms >= 0 (got {self})")


class MicroBatcher(Generic[Item, Result]):
    """Run `batch_fn(items) -> [result or exception, one per item]` over items submitted together.

    `on_batch(size, seconds)` is called after each batch (metrics). Use inside a running event
    loop: `await start()`, then `await submit(item)` from request handlers, `await stop()`.
    """

    def __init__(
        self,
        batch_fn: Callable[[list[Item]], Sequence[Result | BaseException]],
        config: BatchConfig = BatchConfig(),
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.batch_fn = batch_fn
        self.config = config
        self.on_batch = on_batch
        self._pending: deque[tuple[Item, asyncio.Future, float]] = deque()
        self._work = asyncio.Event()  # something is pending
        self._full = asyncio.Event()  # a whole batch is pending
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mntool-batch")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for _, future, _ in self._pending:
            future.cancel()
        self._pending.clear()

    async def submit(self, item: Item, timeout: float | None = None) -> Result:
        """The result of `item` once its batch has run; raises its exception, Overloaded, or
        BatchTimeout after `timeout` seconds (its batch then skips it, or ignores its result)."""
        if len(self._pending) >= self.config.max_queue:
            raise Overloaded(f"{len(self._pending)} requests are already waiting; retry shortly")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        # A timer, not asyncio.wait_for: no extra task per request on the hot path.
        timer = loop.call_later(timeout, _expire, future, timeout) if timeout is not None else None
        self._pending.append((item, future, time.perf_counter()))
        self._work.set()
        if len(self._pending) >= self.config.max_batch:
            self._full.set()
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.batch_fn, [item for item, _ in batch])
            except Exception as err:  # the whole batch failed: every submitter sees why
                results = [err] * len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - started)
            for (_, future), result in zip(batch, results):
                if future.done():  # its request timed out or went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _collect(self) -> list[tuple[Item, asyncio.Future]]:
        """Wait until the oldest pending item has waited max_wait_ms or a batch is full, then take
        up to max_batch items that are still wanted."""
        oldest = self._pending[0][2] if self._pending else time.perf_counter()
        remaining = oldest + self.config.max_wait_ms / 1000 - time.perf_counter()
        if remaining > 0 and len(self._pending) < self.config.max_batch:
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        batch = []
        while self._pending and len(batch) < self.config.max_batch:
            item, future, _ = self._pending.popleft()
            if not future.done():
                batch.append((item, future))
        if not self._pending:
            self._work.clear()
            self._full.clear()
        elif len(self._pending) < self.config.max_batch:
            self._full.clear()
        return batch


def _expire(future: asyncio.Future, timeout: float) -> None:
    if not future.done():
        future.set_exception(BatchTimeout(f"no result within {timeout} s"))
