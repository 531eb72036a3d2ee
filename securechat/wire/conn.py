"""One connection, one owner thread.

An ``ssl.SSLSocket`` wraps one OpenSSL ``SSL`` object, which must never be used by two threads at
once: a server whose sender threads ``sendall`` on other clients' sockets corrupts the heap within
seconds under load. So every :class:`Connection` is driven by exactly one thread, its owner, which
alone reads, writes, and closes the socket. Other threads hand it bytes through its bounded
:class:`Outbox` and wake it with an eventfd (a socketpair where there is none).

The owner runs the socket non-blocking under ``poll()``, coalesces whatever is queued into one
write, honours ``SSLWantReadError``/``SSLWantWriteError`` (retrying a blocked write with the same
bytes, as OpenSSL requires) and drains ``SSLSocket.pending()`` so no decrypted byte is forgotten.
The client uses it, over TLS or plain TCP alike. The server keeps the same rule with fewer threads:
its connections are held by a few loop threads, each connection by one for life
(``securechat.server.transport``), because a thread per connection does not scale to thousands.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator

from securechat.wire.protocol import MAX_LINE_BYTES, LineBuffer, LineTooLong

AnySocket = socket.socket | ssl.SSLSocket

# About 250 screenfuls of chat: plenty for a reader that is merely busy, and small enough that a
# thousand stuck readers cost the server no more than a gigabyte at the very worst.
OUTBOX_LIMIT = 1 << 20

# A TLS record carries at most 16 KiB; asking for 64 KiB takes a whole record, or several plain
# TCP segments, per call.
RECV_SIZE = 65536

# Reads per wake-up before the owner turns to its writes, so a flooding peer cannot starve them.
READS_PER_ROUND = 16

# How long a closing connection may take to flush what it still owes its peer.
CLOSE_FLUSH_SECONDS = 1.5

_NOTHING = memoryview(b"")


def _view(data: bytes) -> memoryview:
    return memoryview(data) if data else _NOTHING


_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL

_WOULD_BLOCK_READ = (ssl.SSLWantReadError, BlockingIOError, InterruptedError)
_WOULD_BLOCK_WRITE = (ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


class Waker:
    """A file descriptor that another thread makes readable to wake a ``poll()``.

    Senders may still hold a connection that has just ended, so :meth:`wake` and :meth:`close`
    share a lock: once closed, the descriptor number may already belong to a newly accepted
    socket, and eight stray bytes written there would corrupt somebody else's TLS stream.
    """

    __slots__ = ("_r", "_w", "_lock", "_closed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        if hasattr(os, "eventfd"):
            # One descriptor instead of a pair: matters at thousands of connections.
            self._r = self._w = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._r, self._w = r.detach(), w.detach()

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        """Make the descriptor readable; safe from any thread, a no-op once closed."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass  # already readable (counter full): nothing to add

    def clear(self) -> None:
        """Consume the wake-ups (owner thread only)."""
        try:
            os.read(self._r, 64)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in {self._r, self._w}:
                try:
                    os.close(fd)
                except OSError:
                    pass


# Wake-ups owed by a thread while it runs ``on_lines``: a batch of lines broadcast to N members
# costs each member one eventfd write (one GIL release) for the whole batch, not one per line.
_owed = threading.local()


@contextlib.contextmanager
def batched_wakeups() -> Iterator[None]:
    """Within it, every outbox (or server loop) this thread fills is woken once, at the end.

    Around ``on_lines`` (a batch read from one socket), around one turn of a server loop, and
    around a shared room log's reader delivering a batch it did not read from a socket: without
    it, each line would wake its recipient again.
    """
    if getattr(_owed, "wakers", None) is not None:  # already batching (nested)
        yield
        return
    owed: list[Waker] = []
    _owed.wakers = owed
    try:
        yield
    finally:
        _owed.wakers = None
        for waker in owed:
            waker.wake()


def wake_soon(waker: Waker) -> None:
    """Wake ``waker`` now, or at the end of this thread's :func:`batched_wakeups` if it is in one.

    The caller wakes each waker once per batch (it keeps its own "already signalled" flag).
    """
    owed = getattr(_owed, "wakers", None)
    if owed is None:
        waker.wake()
    else:
        owed.append(waker)


class Outbox:
    """A bounded queue of bytes for one connection, filled by any thread, drained by its owner.

    The bound counts bytes queued plus bytes taken but not yet written, so a peer that stops
    reading is detected however the backlog is split between the queue and the socket layer.
    """

    __slots__ = ("limit", "_lock", "_chunks", "_backlog", "_signalled", "overflowed", "waker")

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._backlog = 0
        self._signalled = False
        self.overflowed = False
        self.waker = Waker()

    def put(self, data: bytes) -> bool:
        """Queue ``data`` and wake the owner. False (and nothing queued) once over the bound."""
        with self._lock:
            if self.overflowed:
                return False
            backlog = self._backlog + len(data)
            if backlog > self.limit:
                self.overflowed = True
                wake = True
            else:
                self._backlog = backlog
                self._chunks.append(data)
                wake = not self._signalled
                self._signalled = True
        if wake:  # one wake-up per batch: the owner takes everything queued at once
            wake_soon(self.waker)
        return not self.overflowed

    def take(self) -> bytes:
        """Everything queued so far, as one buffer (owner thread)."""
        with self._lock:
            self._signalled = False
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def written(self, n: int) -> None:
        """The owner wrote ``n`` bytes of what it took."""
        with self._lock:
            self._backlog -= n

    @property
    def backlog(self) -> int:
        """Bytes queued or taken but not yet written."""
        return self._backlog


class ConnectionClosed(Exception):
    """Raised inside the owner loop to end it; ``reason`` says why, for people."""

    def __init__(self, reason: str, *, clean: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.clean = clean


def describe_error(exc: BaseException) -> str:
    """A short, human explanation of why a socket operation failed."""
    if isinstance(exc, ssl.SSLEOFError):
        return "connection lost"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, BrokenPipeError):
        return "connection broken"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):  # its errno is an EAI_* code: os.strerror says "unknown error -2"
        return f"no such host name or address ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


class Connection:
    """A line-oriented connection whose socket only its owner thread touches.

    ``on_lines`` is called in the owner thread with each batch of complete lines received;
    ``on_tick`` when ``deadline`` (a ``time.monotonic()`` value, or None) has passed;
    ``on_too_long`` when the peer sends a line over the bound (default: abort). Any thread may
    call :meth:`send`, :meth:`close` and :meth:`abort`.
    """

    __slots__ = ("sock", "outbox", "buffer", "on_lines", "on_tick", "on_too_long", "deadline", "_closing",
                 "_close_reason", "_aborted")

    def __init__(
        self,
        sock: AnySocket,
        on_lines: Callable[[list[bytes]], None],
        *,
        outbox_limit: int = OUTBOX_LIMIT,
        max_line: int = MAX_LINE_BYTES,
        on_tick: Callable[[float], None] | None = None,
        on_too_long: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.outbox = Outbox(outbox_limit)
        self.buffer = LineBuffer(max_line)
        self.on_lines = on_lines
        self.on_tick = on_tick
        self.on_too_long = on_too_long or (lambda: self.abort("line too long"))
        self.deadline: float | None = None
        self._closing: float | None = None  # when a clean close was asked for
        self._close_reason = "closed"
        self._aborted: str | None = None

    # -- any thread ------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Queue ``data`` for the peer. False when the peer's backlog is over the bound."""
        return self.outbox.put(data)

    def close(self, last: bytes = b"", reason: str = "closed") -> None:
        """Send ``last`` and whatever is queued, then close cleanly (TLS close_notify).

        ``reason`` is what :meth:`run` will return.
        """
        if last:
            self.outbox.put(last)
        if self._closing is None:
            self._close_reason = reason
            self._closing = time.monotonic()
        self.outbox.waker.wake()

    def abort(self, reason: str) -> None:
        """Drop the connection without flushing."""
        self._aborted = reason
        self.outbox.waker.wake()

    @property
    def closing(self) -> bool:
        return self._closing is not None or self._aborted is not None

    # -- owner thread ----------------------------------------------------------------------

    def run(self, on_end: Callable[[str], None] | None = None) -> str:
        """Drive the connection until it ends; return why it ended. Closes the socket.

        ``on_end(reason)`` runs as soon as the connection is over for the peer's purposes, before
        the graceful close lingers for the peer's last bytes.
        """
        try:
            clean = False
            try:
                reason = self._loop()
            except ConnectionClosed as exc:
                reason, clean = exc.reason, exc.clean
            if on_end is not None:
                on_end(reason)
            if clean:
                self._flush_and_shutdown()
        finally:
            self._release()
        return reason

    def _loop(self) -> str:
        sock = self.sock
        sock.setblocking(False)
        fd = sock.fileno()
        outbox = self.outbox
        waker_fd = outbox.waker.fileno()
        is_tls = isinstance(sock, ssl.SSLSocket)
        poller = select.poll()
        poller.register(waker_fd, _POLLIN)
        mask = _POLLIN
        poller.register(fd, mask)
        pending = _NOTHING  # taken from the outbox, not yet accepted by the socket
        more_to_read = False
        write_waits_for_read = False
        read_waits_for_write = False
        while True:
            if self._aborted is not None:
                return self._aborted
            if outbox.overflowed:
                raise ConnectionClosed("not reading: outbox over its bound")
            want = _POLLIN
            if (pending and not write_waits_for_read) or read_waits_for_write:
                want |= _POLLOUT
            if want != mask:
                poller.modify(fd, want)
                mask = want
            if more_to_read:
                timeout: float | None = 0
            elif self._closing is not None:
                timeout = 50
            elif self.deadline is not None:
                timeout = max(0.0, (self.deadline - time.monotonic()) * 1000)
            else:
                timeout = None
            events = poller.poll(timeout)
            readable = more_to_read
            writable = False
            for efd, ev in events:
                if efd == waker_fd:
                    outbox.waker.clear()
                    continue
                if ev & (_POLLIN | _POLLERR):
                    readable = True
                if ev & _POLLOUT:
                    writable = True
            if read_waits_for_write and writable:
                readable = True
            if write_waits_for_read and readable:
                writable = True

            if readable:
                more_to_read = False
                read_waits_for_write = False
                write_waits_for_read = False
                for _ in range(READS_PER_ROUND):
                    try:
                        data = sock.recv(RECV_SIZE)
                    except _WOULD_BLOCK_READ:
                        break
                    except ssl.SSLWantWriteError:
                        read_waits_for_write = True
                        break
                    except ssl.SSLZeroReturnError:
                        raise ConnectionClosed("closed by peer") from None
                    except OSError as exc:
                        raise ConnectionClosed(describe_error(exc)) from None
                    if not data:
                        raise ConnectionClosed("closed by peer")
                    if self._closing is not None:
                        continue  # leaving: keep TLS moving, but act on nothing more
                    try:
                        lines = self.buffer.feed(data)
                    except LineTooLong:
                        self.on_too_long()
                        break
                    if lines:
                        with batched_wakeups():
                            self.on_lines(lines)
                    if self.closing:
                        break
                else:
                    more_to_read = True
                if is_tls and not more_to_read and sock.pending():  # type: ignore[union-attr]
                    more_to_read = True

            if not pending:
                pending = _view(outbox.take())
            if pending and not read_waits_for_write:
                while pending:
                    try:
                        n = sock.send(pending)
                    except _WOULD_BLOCK_WRITE:
                        break
                    except ssl.SSLWantReadError:
                        write_waits_for_read = True
                        break
                    except OSError as exc:
                        raise ConnectionClosed(describe_error(exc)) from None
                    outbox.written(n)
                    # Even an empty slice keeps the whole buffer alive: drop it once written, or
                    # an idle connection holds on to its last (possibly 1 MiB) batch.
                    pending = pending[n:] if n < len(pending) else _view(outbox.take())

            if self._closing is not None:
                if not pending and not outbox.backlog:
                    raise ConnectionClosed(self._close_reason, clean=True)
                if time.monotonic() - self._closing > CLOSE_FLUSH_SECONDS:
                    raise ConnectionClosed(f"{self._close_reason} (peer not reading)")
            if self.deadline is not None and self.on_tick is not None:
                now = time.monotonic()
                if now >= self.deadline:
                    self.on_tick(now)

    def _flush_and_shutdown(self) -> None:
        close_gracefully(self.sock)

    def _release(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.outbox.waker.close()


# How long a closing socket keeps reading (and discarding) what the peer still sends.
LINGER_SECONDS = 0.5


def send_close(sock: AnySocket) -> bool:
    """Send the TLS close_notify (if TLS) and the TCP FIN on a non-blocking socket, without waiting
    for the peer's; False when the socket is already gone. Owner thread only."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()  # non-blocking: sends our close_notify, does not wait for the peer's
        except (ssl.SSLError, OSError, ValueError):
            pass
    try:
        sock.shutdown(socket.SHUT_WR)  # on an SSLSocket this also drops the TLS layer
    except OSError:
        return False
    return True


def close_gracefully(sock: AnySocket, linger: float = LINGER_SECONDS) -> None:
    """Send the TLS close_notify and the TCP FIN, then drain what the peer still sends, briefly.

    Closing a socket that has unread data makes the kernel answer with a reset, and a reset can
    destroy the last lines (a goodbye, a refusal) before the peer has read them. The caller closes
    the socket afterwards. Owner thread only.
    """
    sock.setblocking(False)
    if not send_close(sock):
        return
    poller = select.poll()
    poller.register(sock.fileno(), _POLLIN)
    deadline = time.monotonic() + linger
    while (left := deadline - time.monotonic()) > 0 and poller.poll(left * 1000):
        try:
            if not sock.recv(RECV_SIZE):
                return
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return


def tune_socket(sock: socket.socket, *, keepalive_idle: int = 60, keepalive_interval: int = 10,
                keepalive_count: int = 6) -> None:
    """TCP_NODELAY (chat lines are small and latency matters) and keepalive (dead peers are found).

    With the defaults a peer that vanished without a FIN or RST is detected within
    ``idle + interval * count`` = 2 minutes; TCP_USER_TIMEOUT gives the same bound while data is
    waiting for an acknowledgement, when keepalive is silent and retransmissions alone would take
    about 15 minutes to give up.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if sys.platform.startswith("linux"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive_interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive_count)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            (keepalive_idle + keepalive_interval * keepalive_count) * 1000)
    except OSError as exc:  # pragma: no cover - e.g. a socket already reset by the peer
        if exc.errno not in (errno.EINVAL, errno.ENOTCONN, errno.ECONNRESET):
            raise
