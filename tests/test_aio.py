"""aflush / aclose / async with, under asyncio and trio: the event loop keeps serving other
tasks during the wait, deadlines are honoured, and a cancelled wait leaves the logger
consistent."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from sinks_for_tests import JournaledListSink, ListSink
from steplog import Logger, LoggerClosedError, Options, State

pytestmark = [pytest.mark.timeout(60), pytest.mark.parametrize("backend", ["asyncio", "trio"])]

FAST = Options(drain_interval_s=0.005)
TICK_S = 0.005


class Ticker:
    """A task that ticks every TICK_S and records the longest gap between two ticks."""

    def __init__(self) -> None:
        self.ticks = 0
        self.longest_gap_s = 0.0
        self.running = True

    async def run(self) -> None:
        last = time.monotonic()
        while self.running:
            await anyio.sleep(TICK_S)
            now = time.monotonic()
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now
            self.ticks += 1


async def while_ticking(wait: Callable[[], Awaitable[Any]]) -> tuple[Any, Ticker, float]:
    """Run ``wait()`` beside a ticker; its result, the ticker, and how long it took."""
    ticker = Ticker()
    out: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(TICK_S * 2)
        start = time.monotonic()
        out.append(await wait())
        took = time.monotonic() - start
        ticker.running = False
    return out[0], ticker, took


def test_aflush_waits_for_delivery_while_the_loop_keeps_ticking(backend: str) -> None:
    sink = ListSink(delay_s=0.3, max_batch=100)
    logger = Logger(sinks=[sink], options=FAST)

    async def main() -> None:
        for i in range(250):
            logger.log_scalar("x", float(i), i)
        result, ticker, took = await while_ticking(lambda: logger.aflush(30))
        assert result and result.pending == 0
        assert len(sink.records) == 250
        assert took >= 0.3
        # A blocking wait would stop the ticker for the whole flush (>= 0.9 s here).
        assert ticker.longest_gap_s < 0.4, ticker.longest_gap_s
        assert ticker.ticks >= took / TICK_S * 0.2

    anyio.run(main, backend=backend)
    assert logger.close(10)


def test_aflush_of_a_journaled_logger_records_the_journal_cursor(backend: str,
                                                                 tmp_path: Any) -> None:
    sink = JournaledListSink()
    logger = Logger(sinks=[sink], options=Options(drain_interval_s=0.005, runs_dir=str(tmp_path)))
    journal = logger._life.pipeline.run_journal  # type: ignore[union-attr]
    assert journal is not None

    async def main() -> None:
        for i in range(100):  # two flushes: the lanes record their cursor at most once a second
            logger.log_scalar("x", float(i), i)
            if i in (49, 99):
                assert await logger.aflush(10)

    anyio.run(main, backend=backend)
    frames = journal.journal
    assert frames.cursor(frames.consumers[0]) == frames.last_seq  # written by aflush
    assert logger.close(10)


def test_aflush_returns_falsy_at_its_deadline(backend: str) -> None:
    gate = threading.Event()
    sink = ListSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)

    async def main() -> None:
        logger.log_scalar("x", 1.0, 0)
        result, ticker, took = await while_ticking(lambda: logger.aflush(0.6))
        assert not result and result.pending == 1
        assert 0.6 <= took < 1.5
        assert ticker.longest_gap_s < 0.4, ticker.longest_gap_s  # blocked: >= 0.6 s

    anyio.run(main, backend=backend)
    gate.set()
    assert logger.close(10)


def test_a_cancelled_aflush_leaves_the_logger_usable_and_nothing_waiting(backend: str) -> None:
    gate = threading.Event()
    sink = ListSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)

    async def main() -> None:
        logger.log_scalar("x", 1.0, 0)
        for _ in range(20):
            with anyio.move_on_after(0.02) as scope:
                await logger.aflush(30)
            assert scope.cancelled_caught
        assert logger.state is State.OPEN
        assert logger._life.closed.subscribers == 0
        logger.log_scalar("x", 2.0, 1)
        gate.set()
        result = await logger.aflush(10)
        assert result and result.pending == 0

    anyio.run(main, backend=backend)
    assert [r.value for r in sink.records] == [1.0, 2.0]  # type: ignore[union-attr]
    assert logger.close(10)


def test_aclose_ends_the_run_while_the_loop_keeps_ticking(backend: str) -> None:
    sink = ListSink(delay_s=0.6)
    logger = Logger(sinks=[sink], options=FAST)

    async def main() -> None:
        logged = time.monotonic()
        logger.log_scalar("x", 1.0, 0)
        result, ticker, took = await while_ticking(lambda: logger.aclose(30))
        assert result and result.delivered == 1
        # The write may start before the close does: the close waited for most of it, and
        # returned only after it ended.
        assert took >= 0.3 and time.monotonic() - logged >= 0.6
        assert ticker.longest_gap_s < 0.4, ticker.longest_gap_s  # blocked: >= 0.6 s
        assert logger.state is State.CLOSED
        assert await logger.aclose(1) is result  # the first result, again

    anyio.run(main, backend=backend)
    assert sink.closed_with == "FINISHED"
    with pytest.raises(LoggerClosedError):
        logger.log_scalar("x", 2.0, 1)


def test_aclose_cancelled_mid_wait_closes_in_the_background(backend: str) -> None:
    gate = threading.Event()
    sink = ListSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)

    async def main() -> None:
        logger.log_scalar("x", 1.0, 0)
        with anyio.move_on_after(0.1) as scope:
            await logger.aclose(30, status="FAILED")
        assert scope.cancelled_caught
        assert logger.state is State.CLOSING  # the close goes on; logging already refused
        with pytest.raises(LoggerClosedError):
            logger.log_scalar("x", 2.0, 1)

    anyio.run(main, backend=backend)
    gate.set()
    result = logger.close(10)  # returns the background close's result
    assert result and result.delivered == 1
    assert logger.state is State.CLOSED
    assert sink.closed_with == "FAILED"
    assert logger.close(1) is result


def test_aclose_returns_timed_out_at_its_deadline(backend: str) -> None:
    gate = threading.Event()
    sink = ListSink(release=gate)
    logger = Logger(sinks=[sink], options=FAST)

    async def main() -> None:
        logger.log_scalar("x", 1.0, 0)
        result, ticker, took = await while_ticking(lambda: logger.aclose(0.6))
        assert not result and result.timed_out and result.undelivered == 1
        assert 0.6 <= took < 1.5
        assert ticker.longest_gap_s < 0.4, ticker.longest_gap_s  # blocked: >= 0.6 s

    anyio.run(main, backend=backend)
    gate.set()
    deadline = time.monotonic() + 10
    while sink.closed_with is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.closed_with == "FINISHED"  # the sink's run still ended once its call returned


def test_async_with_closes_the_logger_and_records_a_failure(backend: str) -> None:
    ok_sink, failing_sink = ListSink(), ListSink()

    async def main() -> None:
        async with Logger(sinks=[ok_sink], options=FAST) as logger:
            logger.log_scalar("x", 1.0, 0)
        assert logger.state is State.CLOSED
        with pytest.raises(RuntimeError, match="boom"):
            async with Logger(sinks=[failing_sink], options=FAST) as other:
                other.log_scalar("x", 1.0, 0)
                raise RuntimeError("boom")

    anyio.run(main, backend=backend)
    assert ok_sink.closed_with == "FINISHED" and len(ok_sink.records) == 1
    assert failing_sink.closed_with == "FAILED" and len(failing_sink.records) == 1


def test_async_with_cancelled_by_an_expired_cancel_scope_still_closes_and_ends_killed(
    backend: str,
) -> None:
    sink = ListSink()
    after: list[State] = []

    async def main() -> None:
        with anyio.move_on_after(0.2):
            async with Logger(sinks=[sink], options=FAST) as logger:
                logger.log_scalar("x", 1.0, 0)
                await anyio.sleep(30)
        after.append(logger.state)

    anyio.run(main, backend=backend)
    assert after == [State.CLOSED]  # the exit waited for the close, as a `with` block does
    assert sink.closed_with == "KILLED" and len(sink.records) == 1


def test_async_with_left_by_a_task_groups_sys_exit_0_ends_the_run_finished(backend: str) -> None:
    sink = ListSink()

    async def stop() -> None:
        raise SystemExit(0)

    async def main() -> None:
        async with Logger(sinks=[sink], options=FAST) as logger:
            logger.log_scalar("x", 1.0, 0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop)

    with pytest.raises(BaseException) as raised:  # SystemExit, or a group holding it
        anyio.run(main, backend=backend)
    assert "SystemExit" in repr(raised.value)
    assert sink.closed_with == "FINISHED" and len(sink.records) == 1


def test_a_rank_that_does_not_log_answers_the_async_calls_at_once(
    backend: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
                        "STEPLOG_RANKS": "zero"}.items():
        monkeypatch.setenv(name, value)
    from steplog.loggers import FileLogger

    async def main() -> None:
        async with FileLogger(tmp_path / "run") as logger:
            assert logger.state is State.INERT
            logger.log_scalar("x", 1.0, 0)
            flushed = await logger.aflush(1)
            assert flushed and flushed.inactive
        closed = await logger.aclose(1)
        assert closed and closed.inactive

    anyio.run(main, backend=backend)
    assert not (tmp_path / "run").exists()


def test_an_aclose_that_gave_up_on_another_close_returns_that_close_result_once_it_ended(
    backend: str,
) -> None:
    logger = Logger(sinks=[ListSink(delay_s=1.0)], options=FAST)
    logger.log_scalar("x", 1.0, 0)
    closed: list[Any] = []
    other = threading.Thread(target=lambda: closed.append(logger.close(10)))
    other.start()
    time.sleep(0.1)  # the other close holds the logger's close

    async def main() -> None:
        first = await logger.aclose(0.3)
        assert not first and first.timed_out
        other.join(10)
        again = await logger.aclose(5)
        assert again and again is closed[0]

    anyio.run(main, backend=backend)


def test_a_longer_aclose_beside_a_shorter_one_waits_for_the_real_close(backend: str) -> None:
    logger = Logger(sinks=[ListSink(delay_s=1.0)], options=FAST)
    logger.log_scalar("x", 1.0, 0)
    other = threading.Thread(target=logger.close, args=(10,))
    other.start()
    time.sleep(0.1)  # the other close holds the logger's close for about a second
    results: dict[str, Any] = {}

    async def close_within(name: str, seconds: float) -> None:
        results[name] = await logger.aclose(seconds)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(close_within, "short", 0.3)
            await anyio.sleep(0.05)
            tg.start_soon(close_within, "long", 5.0)

    anyio.run(main, backend=backend)
    other.join(10)
    assert not results["short"] and results["short"].timed_out
    assert results["long"] and results["long"].delivered == 1


def test_aclose_in_a_forked_child_returns_at_once(backend: str) -> None:
    import os

    gate = threading.Event()
    logger = Logger(sinks=[ListSink(release=gate)], options=FAST)
    logger.log_scalar("x", 1.0, 0)

    async def cut_short() -> None:
        with anyio.move_on_after(0.1):
            await logger.aclose(30)  # the close goes on in the background

    anyio.run(cut_short, backend=backend)
    pid = os.fork()
    if pid == 0:  # the child's copy of the logger logs nothing and closes at once
        code = 1
        try:
            start = time.monotonic()
            result = anyio.run(logger.aclose, 5, backend=backend)
            code = 0 if result and time.monotonic() - start < 1.0 else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    done, status = 0, 0
    while not done and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if not done:  # stuck: fail instead of hanging
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    gate.set()
    assert logger.close(10)
    assert done and os.waitstatus_to_exitcode(status) == 0
