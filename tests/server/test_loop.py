"""The loop threads' own machinery: posting from other threads, timers, fan-out order, the worker pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from securechat.server.loop import Loop
from securechat.server.workers import Workers
from securechat.wire.conn import batched_wakeups


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop("test-loop")
    loop.start()
    yield loop
    loop.stop()


def test_posts_from_many_threads_never_lose_a_wake_up(loop: Loop) -> None:
    """Each poster waits for its own call: one lost wake-up stalls it (and, once the loop sleeps with
    its flag up, every poster after it). The loop's own turns post too, batched, as fan-outs do."""
    other = Loop("test-other")
    other.start()
    rounds = 3000
    stalled: list[str] = []

    def poster(name: str, batched: bool) -> None:
        done = threading.Event()
        for i in range(rounds):
            done.clear()
            if batched:
                with batched_wakeups():  # a wake deferred to the end of a batch, as in a loop's turn
                    loop.call_soon_threadsafe(done.set)
            else:
                loop.call_soon_threadsafe(done.set)
            if not done.wait(2):
                stalled.append(f"{name} round {i}")
                return

    def from_other_loop() -> None:  # a loop's turn posting to another loop (batched by the turn)
        done = threading.Event()
        for i in range(rounds):
            done.clear()
            other.call_soon_threadsafe(loop.call_soon_threadsafe, done.set)
            if not done.wait(2):
                stalled.append(f"other loop round {i}")
                return

    threads = [threading.Thread(target=poster, args=(f"p{i}", i % 2 == 1)) for i in range(4)]
    threads.append(threading.Thread(target=from_other_loop))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        other.stop()
    assert not stalled, stalled


def test_timers_run_in_order_and_cancelled_ones_never(loop: Loop) -> None:
    ran: list[str] = []
    done = threading.Event()
    loop.call_later(0.05, ran.append, "b")
    cancelled = loop.call_later(0.02, ran.append, "never")
    loop.call_later(0.01, ran.append, "a")
    loop.call_later(0.08, done.set)
    cancelled.cancel()
    assert done.wait(2)
    assert ran == ["a", "b"]


def test_fanouts_and_deliveries_keep_one_order_per_connection(loop: Loop) -> None:
    """What two threads hand one loop for one connection arrives in the order each handed it, and a
    fan-out skips only the excluded nick."""
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    targets = (("a", got["a"].append), ("b", got["b"].append))

    def hand(tag: bytes) -> None:
        for i in range(2000):
            if i % 2:
                loop.fanout(tag + b"%d" % i, targets, "b")
            else:
                loop.deliver(got["b"].append, tag + b"%d" % i)

    threads = [threading.Thread(target=hand, args=(tag,)) for tag in (b"x", b"y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    done = threading.Event()
    loop.deliver(done.set)
    assert done.wait(5)
    for tag in (b"x", b"y"):
        mine_a = [int(m[1:]) for m in got["a"] if m.startswith(tag)]
        mine_b = [int(m[1:]) for m in got["b"] if m.startswith(tag)]
        assert mine_a == list(range(1, 2000, 2))  # every fan-out, in order
        assert mine_b == list(range(0, 2000, 2))  # b excluded from the fan-outs, its deliveries in order


def test_worker_results_come_back_on_the_loop_that_asked(loop: Loop) -> None:
    workers = Workers(2)
    workers.start()
    seen: list[tuple[object, object, bool]] = []
    done = threading.Event()

    def record(result: object, error: BaseException | None) -> None:
        seen.append((result, type(error).__name__ if error else None, loop.in_thread()))
        if len(seen) == 2:
            done.set()

    try:
        workers.submit(loop, lambda: time.sleep(0.05) or "slept", (), record)
        workers.submit(loop, lambda: 1 / 0, (), record)
        assert done.wait(5)
    finally:
        workers.close()
    assert sorted(seen, key=str) == sorted([("slept", None, True), (None, "ZeroDivisionError", True)], key=str)
    late: list[object] = []
    late_done = threading.Event()
    workers.submit(loop, lambda: "never runs", (), lambda r, e: (late.append(type(e).__name__), late_done.set()))
    assert late_done.wait(5) and late == ["RuntimeError"]  # closed: the caller still hears back
