"""The engine's worker pool: blocking work (SQLite, Redis, certificate checks and signing) off the loops.

A loop thread must never wait: while it waits, every connection it owns waits. What may block is
handed to a small bounded pool of threads (:data:`WORKERS`), and its result comes back as a call on
the loop that asked for it (:meth:`Workers.submit`), in the order of the loop's other posted calls.
A worker never touches a socket: it only computes, stores, and hands bytes to connections through
their thread-safe ``send``/``close``.

The threads are started with the pool, not on demand (as ``concurrent.futures`` would): the server's
thread count is fixed from its start, so a test (or an operator) can tell a leak from a warm-up.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("securechat.server")

# Threads for blocking work. It is I/O (SQLite, Redis round trips) or short CPU work that releases
# the GIL (a signature), and each connection has at most one job in flight, so a few threads keep up
# with a LAN's logins and /history pages; more would only compete with the loops for the GIL.
WORKERS = 4

Done = Callable[[Any, BaseException | None], None]


class Poster(Protocol):
    """Where a job's completion is delivered: a loop (``call_soon_threadsafe``)."""

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None: ...


class Workers:
    """A fixed pool of threads for blocking work, with completions delivered on a loop."""

    def __init__(self, size: int = WORKERS) -> None:
        self.size = size
        # Unbounded, but what waits is bounded elsewhere: a connection has one job in flight at most.
        self._jobs: queue.SimpleQueue[tuple[Poster, Callable[..., Any], tuple[Any, ...], Done | None] | None] = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0  # jobs submitted whose completion has not run yet (see drain)
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"securechat-worker-{i}", daemon=True)
                         for i in range(size)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, loop: Poster, fn: Callable[..., Any], args: tuple[Any, ...], done: Done | None) -> None:
        """Run ``fn(*args)`` on a worker, then ``done(result, error)`` on ``loop`` (from any thread).

        ``error`` is the exception ``fn`` raised, or None. Without ``done``, an error is logged.
        After :meth:`close`, ``done`` is called at once (on ``loop``) with a RuntimeError.
        """
        with self._lock:
            if not self._closed:
                self._unfinished += 1
                self._jobs.put((loop, fn, args, done))
                return
        if done is not None:
            loop.call_soon_threadsafe(done, None, RuntimeError("the server is stopping"))

    def drain(self, timeout: float) -> bool:
        """Wait until every job submitted, and every job its completion submitted in turn, is done.

        A job counts until its completion has run on its loop, so a chain of jobs (a session's next
        command, its departure) never looks finished half-way. False if ``timeout`` passed first.
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def _finished(self, done: Done | None, result: Any, error: BaseException | None) -> None:
        try:
            if done is not None:
                done(result, error)
        finally:
            with self._idle:
                self._unfinished -= 1
                if not self._unfinished:
                    self._idle.notify_all()

    def close(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Refuse new jobs, let the threads finish those queued (waiting up to ``timeout`` with ``wait``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                if thread.is_alive() and thread is not threading.current_thread():
                    thread.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, fn, args, done = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to done, which decides
                result, error = None, exc
            if error is not None and done is None:
                log.error("background work failed", exc_info=error)
            if done is not None:
                loop.call_soon_threadsafe(self._finished, done, result, error)
            else:
                self._finished(None, result, error)
            del job, loop, fn, args, done, result, error  # hold nothing while waiting for the next
