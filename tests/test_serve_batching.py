"""MicroBatcher: items submitted together share one batch call, batches respect max_batch, each
submitter gets its own result or exception, and timeouts, overload and stop are clean."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mntool.serve.batching import BatchConfig, BatchTimeout, MicroBatcher, Overloaded


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """A batch function that records its batches; item "boom" fails alone, "all" fails the batch."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list] = []
        self.gate = gate

    def __call__(self, items: list) -> list:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        if "all" in items:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {i}") if i == "boom" else i * 10 for i in items]


async def _submit_all(batcher: MicroBatcher, items: list, timeout: float | None = None) -> list:
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(i, timeout) for i in items), return_exceptions=True)
    finally:
        await batcher.stop()


def test_items_submitted_together_share_one_call():
    fn = Recorder()
    results = run(_submit_all(MicroBatcher(fn, BatchConfig(max_batch=64, max_wait_ms=50)), list(range(10))))
    assert results == [i * 10 for i in range(10)]
    assert fn.batches == [list(range(10))]


def test_batches_never_exceed_max_batch_and_keep_order():
    fn = Recorder()
    results = run(_submit_all(MicroBatcher(fn, BatchConfig(max_batch=4, max_wait_ms=50)), list(range(10))))
    assert results == [i * 10 for i in range(10)]
    assert [len(b) for b in fn.batches] == [4, 4, 2]
    assert sum(fn.batches, []) == list(range(10))


def test_max_batch_one_is_unbatched():
    fn = Recorder()
    run(_submit_all(MicroBatcher(fn, BatchConfig(max_batch=1, max_wait_ms=50)), [1, 2, 3]))
    assert fn.batches == [[1], [2], [3]]


def test_each_submitter_gets_its_own_exception():
    fn = Recorder()
    results = run(_submit_all(MicroBatcher(fn, BatchConfig(max_wait_ms=50)), [1, "boom", 3]))
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad boom"


def test_a_failing_batch_fails_every_member_and_the_batcher_goes_on():
    fn = Recorder()

    async def scenario():
        batcher = MicroBatcher(fn, BatchConfig(max_wait_ms=50))
        await batcher.start()
        try:
            first = await asyncio.gather(batcher.submit(1), batcher.submit("all"), return_exceptions=True)
            second = await batcher.submit(2)
        finally:
            await batcher.stop()
        return first, second

    first, second = run(scenario())
    assert all(isinstance(r, RuntimeError) for r in first) and second == 20


def test_on_batch_reports_sizes():
    sizes = []
    run(
        _submit_all(
            MicroBatcher(Recorder(), BatchConfig(max_batch=3, max_wait_ms=50), lambda n, s: sizes.append(n)),
            list(range(7)),
        )
    )
    assert sizes == [3, 3, 1]


def test_timeout_and_overload():
    gate = threading.Event()  # holds the first batch inside the batch function
    fn = Recorder(gate)

    async def scenario():
        batcher = MicroBatcher(fn, BatchConfig(max_batch=1, max_wait_ms=0, max_queue=2))
        await batcher.start()
        try:
            slow = asyncio.ensure_future(batcher.submit("held", timeout=0.2))
            await asyncio.sleep(0.05)  # "held" is now running; the next two wait in the queue
            waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
            await asyncio.sleep(0)
            with pytest.raises(Overloaded):
                await batcher.submit(3)
            with pytest.raises(BatchTimeout):
                await slow
            gate.set()
            return await asyncio.gather(*waiting)
        finally:
            gate.set()
            await batcher.stop()

    assert run(scenario()) == [10, 20]
    assert fn.batches == [["held"], [1], [2]]


def test_timed_out_items_are_skipped_before_their_batch_runs():
    gate = threading.Event()
    fn = Recorder(gate)

    async def scenario():
        batcher = MicroBatcher(fn, BatchConfig(max_batch=8, max_wait_ms=0))
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit("first"))
            await asyncio.sleep(0.05)
            late = [asyncio.ensure_future(batcher.submit(i, timeout=0.05)) for i in (1, 2)]
            kept = asyncio.ensure_future(batcher.submit(3))
            await asyncio.sleep(0.2)  # 1 and 2 expire while "first" holds the batch function
            gate.set()
            return await first, await asyncio.gather(*late, return_exceptions=True), await kept
        finally:
            gate.set()
            await batcher.stop()

    first, late, kept = run(scenario())
    assert first == "first" * 10 and kept == 30
    assert all(isinstance(r, BatchTimeout) for r in late)
    assert fn.batches == [["first"], [3]]


def test_bad_config_is_refused():
    from device_runtime.errors import MntoolError

    for bad in (dict(max_batch=0), dict(max_queue=0), dict(max_wait_ms=-1)):
        with pytest.raises(MntoolError):
            BatchConfig(**bad)
