"""TLS handshakes for the server, many at once, off the accept loop and off the session threads.

A handshake is the most expensive thing a connection does, and the deepest: OpenSSL's key exchange
and signature touch several pages of the thread's stack and set up per-thread random generators.
Run on a session's own thread, that memory stays with the session for as long as it lives (about
13 KiB a connection, a fifth of the total; measured in the note on the scale target). So a few
handshake threads each drive many non-blocking handshakes under ``poll()``, each with its own
deadline, and a connection gets its session thread only once its handshake is done; its
``SSLSocket`` is handed over whole, so it still has exactly one owner at a time.

A client that connects and never speaks costs a descriptor and a table entry until its deadline
(or until the server's pool of unauthenticated connections needs its place: :meth:`Handshaker.cancel`),
never a thread, and delays nobody: one stalled handshake never blocks another.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from securechat.wire.conn import Waker, describe_error

log = logging.getLogger("securechat.server")

# TLS records start with content type 22 (handshake); anything else is not a TLS client.
TLS_HANDSHAKE_RECORD = 0x16

# After a burst of handshakes, hand freed memory back to the system at most this often.
TRIM_INTERVAL = 1.0


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or a no-op elsewhere.

    A handshake allocates tens of KiB that it frees at the end, interleaved with the ~14 KiB an
    established connection keeps; after a connection storm glibc holds on to the holes (about
    2.6 KiB a connection at 3000 connections, measured with mallinfo2). Trimming returns whole
    free pages without moving anything.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


@dataclass(slots=True)
class Pending:
    """A connection in its handshake."""

    raw: socket.socket
    peer: tuple[Any, ...]
    deadline: float
    token: object  # the server's bookkeeping, handed back untouched
    sock: ssl.SSLSocket | None = field(default=None)
    fd: int = -1  # set when the handshake thread takes it on
    cancelled: bool = False


class Handshaker:
    """One thread driving many non-blocking server-side handshakes.

    ``context()`` is asked for the current SSLContext at each new handshake (renewal swaps it).
    Exactly one of the callbacks is called for each submitted connection, from this thread:
    ``on_done(sock, peer, token)`` with the connected SSLSocket, ``on_plaintext(raw, peer, token)``
    when the first byte is not a TLS record, or ``on_failed(peer, token)`` after the socket has
    been closed (handshake error, timeout, peer gone, :meth:`cancel`, shutdown).
    """

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        timeout: float,
        on_done: Callable[[ssl.SSLSocket, tuple[Any, ...], object], None],
        on_plaintext: Callable[[socket.socket, tuple[Any, ...], object], None],
        on_failed: Callable[[tuple[Any, ...], object], None],
        name: str = "securechat-handshake",
    ) -> None:
        self.context = context
        self.timeout = timeout
        self.on_done = on_done
        self.on_plaintext = on_plaintext
        self.on_failed = on_failed
        self._inbox: deque[Pending] = deque()
        self._cancels: deque[Pending] = deque()
        self._waker = Waker()
        # In submission order, which with one timeout for all is deadline order.
        self._pending: dict[int, Pending] = {}
        self._stopping = False
        self._done_since_trim = 0
        self._trim = _malloc_trim()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, raw: socket.socket, peer: tuple[Any, ...], token: object) -> Pending:
        """Hand over a freshly accepted socket (any thread); the handle is for :meth:`cancel`."""
        raw.setblocking(False)
        p = Pending(raw, peer, time.monotonic() + self.timeout, token)
        self._inbox.append(p)
        self._waker.wake()
        return p

    def cancel(self, p: Pending) -> None:
        """Abandon a handshake (any thread): unless it has already ended, it fails with ``on_failed``.

        Only this thread closes the socket; a handshake that finished first is not affected.
        """
        p.cancelled = True
        self._cancels.append(p)
        self._waker.wake()

    def stop(self, timeout: float = 1.0) -> None:
        """Abandon every handshake in progress (``on_failed`` for each) and end the thread."""
        self._stopping = True
        self._waker.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._waker.close()

    # -- the handshake thread -------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        waker_fd = self._waker.fileno()
        poller.register(waker_fd, select.POLLIN)
        pending = self._pending
        last_trim = 0.0
        try:
            while not self._stopping:
                timeout = None
                if pending:
                    first = next(iter(pending.values()))
                    timeout = max(0.0, (first.deadline - time.monotonic()) * 1000)
                for fd, _ in poller.poll(timeout):
                    if fd == waker_fd:
                        self._waker.clear()
                        continue
                    p = pending.get(fd)
                    if p is not None:
                        self._step(fd, p, poller)
                while self._inbox:
                    p = self._inbox.popleft()
                    fd = p.fd = p.raw.fileno()
                    pending[fd] = p
                    poller.register(fd, select.POLLIN)
                    if p.cancelled:
                        self._fail(fd, p, poller)
                while self._cancels:
                    p = self._cancels.popleft()
                    if pending.get(p.fd) is p:
                        log.info("handshake with %s abandoned: its place was needed", p.peer)
                        self._fail(p.fd, p, poller)
                now = time.monotonic()
                while pending:
                    fd, p = next(iter(pending.items()))
                    if p.deadline > now:
                        break
                    log.info("handshake with %s failed: timed out", p.peer)
                    self._fail(fd, p, poller)
                if self._done_since_trim and not pending and now - last_trim >= TRIM_INTERVAL:
                    self._trim()
                    self._done_since_trim = 0
                    last_trim = now
        finally:
            while self._inbox:
                p = self._inbox.popleft()
                pending[p.raw.fileno()] = p
            for fd, p in list(pending.items()):
                self._fail(fd, p, poller)

    def _forget(self, fd: int, poller: select.poll) -> None:
        del self._pending[fd]
        try:
            poller.unregister(fd)
        except KeyError:
            pass

    def _fail(self, fd: int, p: Pending, poller: select.poll) -> None:
        self._forget(fd, poller)
        (p.sock or p.raw).close()
        self.on_failed(p.peer, p.token)

    def _step(self, fd: int, p: Pending, poller: select.poll) -> None:
        if p.sock is None:
            try:
                first = p.raw.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("handshake with %s failed: %s", p.peer, describe_error(exc))
                self._fail(fd, p, poller)
                return
            if not first:
                self._fail(fd, p, poller)
                return
            if first[0] != TLS_HANDSHAKE_RECORD:
                log.info("%s spoke plaintext to the TLS port", p.peer)
                self._forget(fd, poller)
                self.on_plaintext(p.raw, p.peer, p.token)
                return
            try:
                # Ragged EOFs raise, so a vanished peer is told apart from one that said goodbye.
                p.sock = self.context().wrap_socket(p.raw, server_side=True, do_handshake_on_connect=False,
                                                    suppress_ragged_eofs=False)
            except (OSError, ValueError) as exc:  # e.g. the peer sent its bytes and hung up at once
                log.info("handshake with %s failed: %s", p.peer, describe_error(exc))
                self._fail(fd, p, poller)
                return
        try:
            p.sock.do_handshake()
        except ssl.SSLWantReadError:
            poller.modify(fd, select.POLLIN)
        except ssl.SSLWantWriteError:
            poller.modify(fd, select.POLLOUT)
        except ssl.SSLError as exc:  # includes a refused client certificate: worth the admin's eye
            log.warning("refused TLS handshake from %s: %s", p.peer, describe_error(exc))
            self._fail(fd, p, poller)
        except (OSError, ValueError) as exc:
            log.info("handshake with %s failed: %s", p.peer, describe_error(exc))
            self._fail(fd, p, poller)
        else:
            self._forget(fd, poller)
            self._done_since_trim += 1
            self.on_done(p.sock, p.peer, p.token)
