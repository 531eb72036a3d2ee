"""A server loop thread: one selector (epoll), one waker, one timer heap, and the connections it owns.

The engine runs a few of these (:data:`securechat.server.engine.DEFAULT_LOOPS`); each accepted
connection is given to one of them for life. Everything that touches a connection's socket (its
``ssl.SSLSocket`` above all: OpenSSL's ``SSL`` object must never be used by two threads) runs on
that loop's thread and nowhere else. Other threads never touch a socket; they hand the loop work
through three thread-safe doors, each a FIFO drained by the loop thread:

- :meth:`Loop.call_soon_threadsafe` runs a function on the loop (a worker's completion, a timer
  armed from elsewhere, an abort);
- :meth:`Loop.fanout` hands one encoded room line and the loop's members of that room: the loop
  queues the same bytes on each member's outbox. A line said in a room therefore costs one queue
  entry and at most one wake-up per loop that has members, not one per member;
- :meth:`Loop.deliver` runs a connection's ``write`` or ``close`` with its arguments: what
  ``Transport.send``/``close`` do when called off the loop.

Fan-outs and deliveries share one queue, so what one thread sends to a connection keeps its order,
and a room's lines keep the room's order, whichever threads they come from. A send made *on* the
loop first drains that queue (:meth:`Loop.flush_deliveries`), so it cannot overtake a line queued
before it either.

Timers (handshake, login and close deadlines, the rooms' grace periods) are entries in one heap per
loop, not threads: ``call_later`` from any thread, ``Timer.cancel`` from any thread (lazily removed).
"""

from __future__ import annotations

import collections
import heapq
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from securechat.wire.conn import Waker, batched_wakeups, wake_soon

log = logging.getLogger("securechat.server")

READ = select.POLLIN
WRITE = select.POLLOUT
ERROR = select.POLLERR | select.POLLHUP | select.POLLNVAL

# Cancelled timers are left in the heap (cancelling is a flag, safe from any thread); past this many
# entries the loop sweeps them out, so a churn of cancelled deadlines cannot grow it for long.
TIMER_SWEEP = 4096

# Posted calls run per turn before the loop looks at its sockets again: a thread posting without
# pause cannot starve the loop's own connections.
CALLS_PER_TURN = 1024

Targets = tuple[tuple[str, Callable[[bytes], object]], ...]


class Readable(Protocol):
    """A connection that has more to read than one turn took (TLS ``pending()`` included)."""

    def _read_more(self) -> None: ...


class Writable(Protocol):
    """A connection with bytes queued, to be written at the end of the turn (coalesced)."""

    def _flush(self) -> None: ...


class Timer:
    """A call at a ``time.monotonic()`` instant on one loop; :meth:`cancel` from any thread."""

    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run (if it has not run yet). A flag: safe from any thread, idempotent."""
        self.cancelled = True
        self.args = ()  # let go of what it would have been called with

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class _Poller:
    """epoll where there is one (Linux), else poll(): register, modify, unregister, poll(seconds)."""

    def __init__(self) -> None:
        epoll = getattr(select, "epoll", None)
        self._epoll = epoll() if epoll is not None else None
        self._poll = select.poll() if self._epoll is None else None
        target: Any = self._epoll if self._epoll is not None else self._poll
        self.register = target.register
        self.modify = target.modify
        self.unregister = target.unregister

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        if self._epoll is not None:
            return self._epoll.poll(-1 if timeout is None else timeout)
        assert self._poll is not None  # pragma: no cover - non-Linux
        return self._poll.poll(None if timeout is None else timeout * 1000)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


class Loop:
    """One loop thread and what it owns. Start with :meth:`start`, end with :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._poller = _Poller()
        self._waker = Waker()
        self._poller.register(self._waker.fileno(), READ)
        self._callbacks: dict[int, Callable[[int], None]] = {}  # fd -> what to call with its events
        self._calls: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = collections.deque()
        self._deliveries: collections.deque[tuple[Any, ...]] = collections.deque()
        self._ready: list[Readable] = []
        self._dirty: list[Writable] = []
        self._timers: list[Timer] = []
        self._pushed = 0  # timers pushed since the last sweep
        self._wake_pending = False
        self._stopping = False
        self._ident: int | None = None
        self.connections = 0  # connections this loop owns (where the engine puts the next one)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """End the loop thread (what it still owns is closed without a word) and wait for it."""
        self._stopping = True
        self._waker.wake()
        if self._thread.is_alive() and threading.get_ident() != self._ident:
            self._thread.join(timeout)

    def in_thread(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return threading.get_ident() == self._ident

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread, after what was posted before it."""
        self._calls.append((fn, args))
        self._nudge()

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Timer:
        """Run ``fn(*args)`` on the loop thread in ``delay`` seconds; from any thread."""
        timer = Timer(time.monotonic() + delay, fn, args)
        if self.in_thread():
            self._push(timer)
        else:
            self.call_soon_threadsafe(self._push, timer)
        return timer

    def fanout(self, data: bytes, targets: Targets, exclude: str | None) -> None:
        """Queue ``data`` on every ``(nick, write)`` of ``targets`` except ``exclude``'s (any thread).

        ``write`` must be a loop-thread-only function of a connection this loop owns.
        """
        self._deliveries.append((_fan, data, targets, exclude))
        self._nudge()

    def deliver(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop in delivery order (with fan-outs): a connection's write or close."""
        self._deliveries.append((fn, *args))
        self._nudge()

    def _nudge(self) -> None:
        if threading.get_ident() == self._ident:
            return  # the loop drains its queues before it sleeps again
        if not self._wake_pending:
            self._wake_pending = True
            wake_soon(self._waker)  # at the end of the poster's batch, if it is in one (another loop's turn)

    # -- the loop thread ---------------------------------------------------------------------

    def register(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        self._poller.register(fd, events)
        self._callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._poller.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (KeyError, OSError, ValueError):  # already closed
                pass

    def ready(self, source: Readable) -> None:
        """``source`` has more to read: visit it again next turn without sleeping."""
        self._ready.append(source)

    def dirty(self, source: Writable) -> None:
        """``source`` has bytes queued: flush it at the end of this turn."""
        self._dirty.append(source)

    def flush_deliveries(self) -> None:
        """Run every fan-out and delivery queued so far (loop thread)."""
        queue = self._deliveries
        while queue:
            item = queue.popleft()
            try:
                item[0](*item[1:])
            except Exception:  # one connection's trouble must not lose the others' lines
                log.exception("delivering on %s failed", self.name)

    def _push(self, timer: Timer) -> None:
        heapq.heappush(self._timers, timer)
        self._pushed += 1
        if self._pushed >= TIMER_SWEEP and len(self._timers) >= TIMER_SWEEP:
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._pushed = 0

    def _timeout(self) -> float | None:
        if self._calls or self._deliveries or self._ready or self._dirty or self._stopping:
            return 0
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        if not timers:
            return None
        return max(0.0, timers[0].when - time.monotonic())

    def _run(self) -> None:
        self._ident = threading.get_ident()
        poll = self._poller.poll
        waker_fd = self._waker.fileno()
        callbacks = self._callbacks
        try:
            while not self._stopping:
                events = poll(self._timeout())
                with batched_wakeups():  # one wake-up per other loop per turn, however many lines
                    for fd, mask in events:
                        if fd == waker_fd:
                            # Consumed, then the flag down: a post after this point writes again; one
                            # before it is in the queues, drained below. (The other order loses a
                            # wake-up whose write the read swallowed.)
                            self._waker.clear()
                            self._wake_pending = False
                            continue
                        callback = callbacks.get(fd)
                        if callback is not None:
                            _guarded(callback, mask)
                    if self._ready:
                        ready, self._ready = self._ready, []
                        for reader in ready:
                            _guarded(reader._read_more)
                    self._run_calls()
                    self.flush_deliveries()
                    self._run_timers()
                    self.flush_deliveries()
                    if self._dirty:
                        dirty, self._dirty = self._dirty, []
                        for writer in dirty:
                            _guarded(writer._flush)
        except BaseException:  # pragma: no cover - a bug in the loop itself: say so loudly
            log.exception("loop %s stopped", self.name)
            raise
        finally:
            self._shut()

    def _run_calls(self) -> None:
        calls = self._calls
        for _ in range(min(len(calls), CALLS_PER_TURN)):
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("a call on %s failed", self.name)

    def _run_timers(self) -> None:
        timers = self._timers
        if not timers:
            return
        now = time.monotonic()
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            fn, args = timer.fn, timer.args
            timer.cancel()  # ran: a later cancel() is a no-op, and the arguments are let go
            try:
                fn(*args)
            except Exception:
                log.exception("a timer on %s failed", self.name)

    def _shut(self) -> None:
        """The loop is ending: close what it still owns (each owner's ``_abandon``), then itself."""
        for fd, callback in list(self._callbacks.items()):
            owner = getattr(callback, "__self__", None)
            abandon = getattr(owner, "_abandon", None)
            if abandon is not None:
                try:
                    abandon()
                except Exception:
                    log.exception("closing a connection of %s failed", self.name)
            self.unregister(fd)
        self._calls.clear()
        self._deliveries.clear()
        self._timers.clear()
        self._poller.close()
        self._waker.close()


def _guarded(fn: Callable[..., object], *args: Any) -> None:
    """A connection's own bug ends nothing but what it breaks: never the loop and its other connections."""
    try:
        fn(*args)
    except Exception:
        log.exception("unexpected error in a connection's loop step")


def _fan(data: bytes, targets: Targets, exclude: str | None) -> None:
    """One room line to this loop's members of the room (the loop thread)."""
    if exclude is None:
        for _, write in targets:
            write(data)
    else:
        for nick, write in targets:
            if nick != exclude:
                write(data)
