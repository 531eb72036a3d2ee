"""The enrollment route (ALPN ``securechat-enroll/1``): invites and renewals, on a loop, signed on a worker.

The exchange itself (:meth:`securechat.pki.authority.Authority.exchange`) is sans I/O: a generator
that yields for each line it needs from the joiner. :class:`EnrollHandler` cuts the connection's
bytes into lines on the loop thread and runs each step of the exchange on a worker thread (it
reads the ledger and may sign a certificate with the CA's key), one step at a time; the lines a
step says are sent when it is done. Its two deadlines are timers on the loop: the first line
within :data:`~securechat.pki.authority.FIRST_LINE_DEADLINE` (a silent connection holds no slot,
and is gone long before the whole exchange's deadline), the whole exchange within
:data:`~securechat.pki.enrollment.EXCHANGE_DEADLINE`. A deadline, a line over the bound, the joiner
leaving or its pending place being needed end the exchange the same way: thrown into it on a
worker, logged there, and the slot it took (if its first line got it one) given back.
"""

from __future__ import annotations

import collections
import logging
import ssl
from collections.abc import Callable, Generator
from typing import Any

from securechat.pki import authority, enrollment
from securechat.server.transport import Handler, Transport
from securechat.wire.protocol import LineBuffer, LineTooLong

log = logging.getLogger("securechat.enroll")


class _Said:
    """The lines one step of the exchange says (collected on the worker, sent by the loop)."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def send(self, line: str) -> None:
        self.lines.append(line.encode("ascii") + b"\n")

    def take(self) -> list[bytes]:
        lines, self.lines = self.lines, []
        return lines


class _Connection:
    """What the exchange reads of the TLS connection, taken on the loop thread (its owner)."""

    __slots__ = ("context", "_der")

    def __init__(self, context: ssl.SSLContext, der: bytes | None) -> None:
        self.context = context
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._der if binary_form else None


class EnrollHandler(Handler):
    """One joiner's connection: lines in, one exchange step at a time on a worker, answers out."""

    __slots__ = ("authority", "transport", "buffer", "said", "steps", "waiting", "failure", "busy", "over",
                 "deadline", "first_deadline")

    def __init__(self, ca: authority.Authority) -> None:
        self.authority = ca
        self.transport: Transport | None = None
        self.buffer = LineBuffer(enrollment.MAX_WIRE_LINE)
        self.said = _Said()
        self.steps: Generator[None, str, None] | None = None
        self.waiting: collections.deque[str] = collections.deque()
        self.failure: BaseException | None = None
        self.busy = False
        self.over = False
        self.deadline: Any = None
        self.first_deadline: Any = None  # until the first line (JOIN or RENEW) arrives

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        self.deadline = transport.call_later(enrollment.EXCHANGE_DEADLINE, self._fail,
                                             TimeoutError("the exchange took too long"))
        wait = authority.FIRST_LINE_DEADLINE
        self.first_deadline = transport.call_later(wait, self._fail, TimeoutError(f"no request within {wait:g} s"))
        context = transport.ssl_context
        assert context is not None
        connection = _Connection(context, transport.peer_certificate(True))
        self.steps = self.authority.exchange(self.said, connection, transport.peer)
        self._step(next, self.steps)

    def data_received(self, data: bytes) -> None:
        try:
            lines = self.buffer.feed(data)
        except LineTooLong:
            self._fail(ValueError("line too long"))
            return
        if lines and self.first_deadline is not None:
            self.first_deadline.cancel()  # the request came in time
            self.first_deadline = None
        self.waiting.extend(line.decode("ascii", "replace") for line in lines)
        self._next()

    def connection_lost(self, reason: str) -> None:
        self._stop_timers()
        if not self.over:
            self._fail(ConnectionError("connection closed"))

    # -- the loop thread ---------------------------------------------------------------------

    def _stop_timers(self) -> None:
        for timer in (self.deadline, self.first_deadline):
            if timer is not None:
                timer.cancel()
        self.deadline = self.first_deadline = None

    def _fail(self, failure: BaseException) -> None:
        if self.failure is None and not self.over:
            self.failure = failure
            if self.transport is not None and not self.transport.closing:
                self.transport.pause_reading()
            self._next()

    def _next(self) -> None:
        if self.busy or self.over or self.steps is None:
            return
        if self.failure is not None:
            self._step(self.steps.throw, self.failure)
        elif self.waiting:
            self._step(self.steps.send, self.waiting.popleft())

    def _step(self, fn: Callable[..., object], *args: Any) -> None:
        self.busy = True
        assert self.transport is not None
        self.transport.offload(self._run, fn, *args, done=self._done)

    def _run(self, fn: Callable[..., object], *args: Any) -> tuple[list[bytes], bool]:
        """One step, on a worker: what it said, and whether the exchange is over."""
        try:
            fn(*args)
            over = False
        except StopIteration:
            over = True
        return self.said.take(), over

    def _done(self, result: tuple[list[bytes], bool] | None, error: BaseException | None) -> None:
        self.busy = False
        transport = self.transport
        assert transport is not None
        if error is not None:  # not an exchange failure (those are logged inside): a bug
            log.error("unexpected error enrolling %s", transport.peer, exc_info=error)
            self.over = True
            transport.abort("internal error")
            return
        assert result is not None
        lines, over = result
        for line in lines:
            transport.send(line)
        if over:
            self.over = True
            self._stop_timers()
            transport.close()
            return
        self._next()
