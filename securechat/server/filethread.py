"""A file connection driven by a thread of its own, offering a handler the engine's transport interface.

Stands in for :class:`securechat.server.transport.Transport` until the loop engine runs file
connections: the thread alone touches the socket (one owner per SSL object), runs the handler's
callbacks one at a time, and does "offloaded" disk work itself, in order, handing each result back as
a later callback, never from inside the call that asked for it.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from securechat.wire.conn import RECV_SIZE, close_gracefully, describe_error

# The handler's flow-control marks (as the engine's transport has them).
HIGH_WATER = 512 * 1024
LOW_WATER = 64 * 1024


class _Timer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ThreadTransport:
    """One file connection, one thread (see the module docstring)."""

    high_water = HIGH_WATER
    low_water = LOW_WATER

    def __init__(self, sock: ssl.SSLSocket, peer: tuple[Any, ...], handler: Any, admission: Any = None) -> None:
        self.sock = sock
        self.peer = peer
        self.handler = handler
        self.admission = admission
        self._out: list[bytes] = []
        self._posted: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, _Timer, Callable[..., object], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._paused = False
        self._writes_paused = False
        self._closing: tuple[bytes, str] | None = None
        self._aborted: str | None = None
        self._lock = threading.Lock()

    # -- the handler's calls (this thread) -----------------------------------------------------

    @property
    def outbox_size(self) -> int:
        return sum(map(len, self._out))

    def write(self, data: bytes) -> bool:
        if self._closing is not None or self._aborted is not None:
            return False
        self._out.append(data)
        if not self._writes_paused and self.outbox_size > self.high_water:
            self._writes_paused = True
            self.handler.pause_writing()
        return True

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False

    def offload(self, fn: Callable[..., Any], *args: Any,
                done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        try:
            result, error = fn(*args), None
        except Exception as exc:  # handed to done, which decides
            result, error = None, exc
        if done is not None:
            self._posted.append((done, (result, error)))

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> _Timer:
        timer = _Timer()
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), timer, fn, args))
        return timer

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        self._posted.append((fn, args))

    def close(self, last: bytes = b"", reason: str = "closed") -> None:
        if self._closing is None:
            if last:
                self._out.append(last)
            self._closing = (b"", reason)

    # -- any thread ----------------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """Drop the connection; from any thread (the blocked read ends: the descriptor is shut down)."""
        with self._lock:
            if self._aborted is None:
                self._aborted = reason
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    @property
    def closing(self) -> bool:
        return self._closing is not None or self._aborted is not None

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> str:
        """Drive the connection until it ends; return why. Closes the socket."""
        handler = self.handler
        reason = "closed"
        try:
            handler.connection_made(self)
            reason = self._loop()
        except (OSError, ssl.SSLError) as exc:
            reason = describe_error(exc)
        finally:
            handler.connection_lost(self._aborted or reason)
            while self._posted:  # results of work done before the end still reach the handler
                fn, args = self._posted.popleft()
                fn(*args)
            if self._aborted is None and self._closing is not None:
                self._flush()
                close_gracefully(self.sock)
            self.sock.close()
        return reason

    def _flush(self) -> None:
        if self._out:
            data, self._out = b"".join(self._out), []
            self.sock.settimeout(30)  # a peer that takes nothing for 30 s is gone
            self.sock.sendall(data)
        if self._writes_paused:
            self._writes_paused = False
            self.handler.resume_writing()

    def _run_due(self) -> float | None:
        """Run due timers; seconds until the next one (None: none)."""
        while self._timers:
            when, _, timer, fn, args = self._timers[0]
            if timer.cancelled:
                heapq.heappop(self._timers)
                continue
            left = when - time.monotonic()
            if left > 0:
                return left
            heapq.heappop(self._timers)
            fn(*args)
        return None

    def _loop(self) -> str:
        sock = self.sock
        while True:
            while self._posted:
                fn, args = self._posted.popleft()
                fn(*args)
            if self._aborted is not None:
                return self._aborted
            self._flush()
            if self._posted:
                continue
            if self._closing is not None:
                return self._closing[1]
            wait = self._run_due()
            if self._posted or self._closing is not None:
                continue
            if self._paused:  # nothing posted can un-pause us: work is done inline
                return "paused with nothing pending"
            sock.settimeout(wait if wait is not None else None)
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                continue
            except ssl.SSLZeroReturnError:
                return "closed by peer"
            if self._aborted is not None:
                return self._aborted
            if not data:
                return "closed by peer"
            self.handler.data_received(data)
