"""One server connection on its loop, and the handler interface every protocol implements.

A :class:`Transport` owns one accepted socket for its whole life, and belongs to one
:class:`~securechat.server.loop.Loop`: only that loop's thread reads, writes, handshakes or closes
it, so its ``ssl.SSLSocket`` (one OpenSSL ``SSL`` object) has exactly one owner, ever. It opens the
connection (first byte, TLS handshake: :mod:`securechat.server.handshake`), picks the handler by
the ALPN (:mod:`securechat.server.routes`), then moves bytes: reads (at most
:data:`READS_PER_TURN` records a turn, and what TLS holds in ``pending()``), a bounded outbox
written in one coalesced ``send`` per turn (a write blocked by ``SSLWantWriteError`` is retried
with the same bytes, as OpenSSL requires), a graceful close (flush, close_notify, FIN, a short
linger reading what the peer still sends), or an abort.

**The handler interface** (what #21's HTTPS/WebSocket and #22's file transfer plug in as). A handler
is created by its route's factory and called only on the connection's loop thread::

    class Handler:
        def connection_made(self, transport: Transport) -> None    # the route is decided
        def data_received(self, data: bytes) -> None               # bytes from the peer (decrypted)
        def eof_received(self) -> bool                             # peer finished; True keeps writing open
        def pause_writing(self) -> None                            # outbox reached transport.high_water
        def resume_writing(self) -> None                           # ... back under transport.low_water
        def connection_lost(self, reason: str) -> None             # once, before the socket lingers

and it drives its transport with, on the loop thread: ``write(data) -> bool`` (False: over the
outbox bound, being closed), ``pause_reading()``, ``resume_reading()``, ``outbox_size``,
``high_water``/``low_water``, ``hold_output()``/``release_output()``, ``peer``, ``alpn``, ``tls``,
``peer_certificate(binary_form)``,
``ssl_context``, ``admission`` (its place among unauthenticated connections: release it once the
peer has proved who it is); and from ANY thread: ``send(data) -> bool``, ``close(last, reason)``,
``abort(reason)``, ``closing``, ``post(fn, *args)`` (run on the loop), ``call_later(delay, fn,
*args) -> Timer`` (``Timer.cancel()``), ``offload(fn, *args, done=callback)`` (``fn`` on a worker
thread, then ``done(result, error)`` on this loop), ``when_written(fn, *args)`` (``fn`` on this loop
once everything sent so far has been written to the socket). A handler never blocks: what may block goes
through ``offload``; a streaming handler (a file download) writes while ``outbox_size`` is under
``high_water`` and continues in ``resume_writing``; one that must not read more while a disk write
is pending calls ``pause_reading()`` and ``resume_reading()`` from the ``done`` callback.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from securechat.server.handshake import TLS_HANDSHAKE_RECORD
from securechat.server.loop import ERROR, READ, WRITE, Loop, Timer
from securechat.server.routes import HTTP_SNIFF_BYTES, NO_ALPN, PLAINTEXT, Routes
from securechat.wire import hello
from securechat.wire.conn import OUTBOX_LIMIT, RECV_SIZE, describe_error, send_close

if TYPE_CHECKING:
    from securechat.server.workers import Workers

log = logging.getLogger("securechat.server")

# Reads (TLS records of up to 16 KiB) from one connection per turn of its loop: a flooding peer gets
# its turn, then the loop's other connections get theirs (handshakes included), then the rest.
READS_PER_TURN = 4

# How long a closing connection may take to flush what it still owes its peer, and how long it then
# keeps reading (and discarding) what the peer still sends, so a reset cannot destroy the last lines.
CLOSE_FLUSH_SECONDS = 1.5
LINGER_SECONDS = 0.5

# Back-pressure marks for streaming handlers, under the outbox bound (conn.OUTBOX_LIMIT): above
# HIGH, pause_writing(); once back under LOW, resume_writing(). A 16 KiB TLS record four times over
# keeps a stream moving while the socket drains.
HIGH_WATER = OUTBOX_LIMIT // 2
LOW_WATER = 64 * 1024

_WOULD_BLOCK_READ = (ssl.SSLWantReadError, BlockingIOError, InterruptedError)
_WOULD_BLOCK_WRITE = (ssl.SSLWantWriteError, BlockingIOError, InterruptedError)

# The states of a connection, in order.
SNIFF, HANDSHAKE, OPEN, CLOSING, LINGER, CLOSED = range(6)
_STATES = ("sniff", "handshake", "open", "closing", "linger", "closed")


class Handler:
    """A connection's protocol: the base does nothing. See the module docstring for the contract."""

    __slots__ = ()  # thousands live at once: subclasses may go without a __dict__ too

    def connection_made(self, transport: Transport) -> None:
        """The route is decided; ``transport`` is this connection's for good."""

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer, decrypted, in order, in chunks of any size."""

    def eof_received(self) -> bool:
        """The peer will send nothing more. Return True to keep writing; False (default) closes."""
        return False

    def pause_writing(self) -> None:
        """The outbox reached ``transport.high_water``."""

    def resume_writing(self) -> None:
        """The outbox drained under ``transport.low_water`` after :meth:`pause_writing`."""

    def connection_lost(self, reason: str) -> None:
        """The connection is over (for the peer's purposes); called once. ``reason`` is for people."""


class Host(Protocol):
    """What a transport needs from the server that accepted it (the engine's ChatServer)."""

    routes: Routes
    handshake_timeout: float
    workers: Workers

    def tls_context(self, offered: tuple[str, ...] = ()) -> ssl.SSLContext | None: ...

    def handshaken(self, transport: Transport) -> None: ...

    def connection_closed(self, transport: Transport) -> None: ...


class Transport:
    """One connection, owned by one loop thread (see the module docstring)."""

    __slots__ = ("loop", "host", "sock", "fd", "peer", "alpn", "tls", "handler", "admission", "limit",
                 "high_water", "low_water", "_state", "_mask", "_out", "_backlog", "_view", "_dirty",
                 "_paused", "_held", "_writes_paused", "_eof", "_write_wants_read", "_read_wants_write", "_timer",
                 "_reason", "_asked", "_lost", "_first", "_sent", "_watchers", "_hello_waits", "__weakref__")

    def __init__(self, sock: socket.socket, peer: tuple[Any, ...], loop: Loop, host: Host,
                 limit: int = OUTBOX_LIMIT) -> None:
        self.loop = loop
        self.host = host
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.alpn: str | None = None  # the route's key once decided (an ALPN name, None, a plaintext key)
        self.tls = False
        self.handler: Handler | None = None
        self.admission: Any = None  # the engine's place among the unauthenticated
        self.limit = limit  # outbox bound: bytes queued or taken but not yet written
        self.high_water = min(HIGH_WATER, limit)
        self.low_water = min(LOW_WATER, self.high_water)
        self._state = SNIFF
        self._mask = -1  # the events the loop watches for; -1 until the loop has it
        self._out: list[bytes] | None = None
        self._backlog = 0
        self._view: bytes | memoryview | None = None  # taken from the outbox, not yet accepted by the socket
        self._dirty = False
        self._paused = False
        self._held = False  # output waits (hold_output) until release_output
        self._writes_paused = False
        self._eof = False  # the peer finished and the handler keeps writing
        self._write_wants_read = False
        self._read_wants_write = False
        self._timer: Timer | None = None
        self._reason = "closed"
        self._asked = False  # close() or abort() asked, from any thread
        self._lost = False  # connection_lost has been called
        self._first = b""  # plaintext bytes read while deciding the route
        self._hello_waits = 0  # times the rest of a ClientHello was waited for
        self._sent = 0  # bytes the socket accepted, since the start
        # (the byte count _sent must reach, what to call then), in order: see when_written
        self._watchers: collections.deque[tuple[int, Callable[..., object], tuple[Any, ...]]] | None = None

    def __repr__(self) -> str:
        return f"<Transport {self.peer[:2]} {_STATES[self._state]}>"

    # -- any thread --------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """A close or abort was asked (or the connection is over)."""
        return self._asked or self._state >= CLOSING

    def send(self, data: bytes) -> bool:
        """Queue ``data`` for the peer, from any thread, in order. False once closing or over the bound."""
        if self._asked:
            return False
        loop = self.loop
        if loop.in_thread():
            if loop._deliveries:
                loop.flush_deliveries()  # what was queued for this connection before goes first
            return self.write(data)
        loop.deliver(self.write, data)
        return True

    def close(self, last: bytes = b"", reason: str = "closed") -> None:
        """Send ``last`` after whatever is queued, then close cleanly (TLS close_notify); any thread."""
        if self._asked:
            return
        self._asked = True
        loop = self.loop
        if loop.in_thread():
            if loop._deliveries:
                loop.flush_deliveries()
            self._close_here(last, reason)
        else:
            loop.deliver(self._close_here, last, reason)

    def abort(self, reason: str) -> None:
        """Drop the connection without flushing; any thread. ``connection_lost(reason)`` follows."""
        self._asked = True
        self.loop.call_soon_threadsafe(self._abort_here, reason)

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on this connection's loop thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Timer:
        """Run ``fn(*args)`` on this connection's loop in ``delay`` seconds (any thread; ``.cancel()``)."""
        return self.loop.call_later(delay, fn, *args)

    def offload(self, fn: Callable[..., Any], *args: Any,
                done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        """Run ``fn(*args)`` on a worker thread, then ``done(result, error)`` on this loop."""
        self.host.workers.submit(self.loop, fn, args, done)

    def when_written(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on this loop once everything sent to this connection until now has been
        written to its socket; any thread (in order with that thread's sends). Never, if the
        connection ends first.

        Written means accepted by the socket (OpenSSL writes whole records to the kernel before it
        reports them sent), not merely queued here: what the kernel still holds is out of the
        server's hands, as for any line. Kept private messages move their read position only past
        what was written (:mod:`securechat.server.inbox`).
        """
        if self._asked:
            return
        loop = self.loop
        if loop.in_thread():
            if loop._deliveries:
                loop.flush_deliveries()  # sends queued before this one count
            self._watch(fn, args)
        else:
            loop.deliver(self._watch, fn, args)

    # -- the loop thread: for handlers -------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Queue ``data`` (loop thread only); it is written at the end of the turn, coalesced."""
        if self._state != OPEN:
            return False
        backlog = self._backlog + len(data)
        if backlog > self.limit:
            self._asked = True
            self.loop.call_soon_threadsafe(self._abort_here, "not reading: outbox over its bound")
            return False
        self._backlog = backlog
        out = self._out
        if out is None:
            self._out = [data]
        else:
            out.append(data)
        if not self._dirty:
            self._dirty = True
            self.loop.dirty(self)
        if backlog >= self.high_water and not self._writes_paused:
            self._writes_paused = True
            self._call(self.handler.pause_writing)  # type: ignore[union-attr]
        return True

    def _watch(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        if self._state >= LINGER:  # over (a clean close was already told to the handler)
            return
        if not self._backlog:
            self._call(fn, *args)
            return
        if self._watchers is None:
            self._watchers = collections.deque()
        self._watchers.append((self._sent + self._backlog, fn, args))

    @property
    def outbox_size(self) -> int:
        """Bytes queued or taken but not yet accepted by the socket."""
        return self._backlog

    def pause_reading(self) -> None:
        """Stop reading until :meth:`resume_reading` (loop thread)."""
        self._paused = True
        self._update_mask()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._update_mask()
            if self._state == OPEN:
                self.loop.ready(self)  # TLS may hold decrypted bytes no poll will announce

    def hold_output(self) -> None:
        """Queue what is written, but send none of it until :meth:`release_output` (loop thread).

        For a step that runs elsewhere (a chat command on a worker): its replies and whatever else
        comes for this connection meanwhile go out together, in order, once the step is complete,
        so the peer never hears of a step before its effects are in place.
        """
        self._held = True

    def release_output(self) -> None:
        if self._held:
            self._held = False
            if (self._out or self._view is not None or self._state == CLOSING) and not self._dirty:
                self._dirty = True
                self.loop.dirty(self)

    def peer_certificate(self, binary_form: bool = False) -> Any:
        """The peer's verified certificate (a dict, or DER bytes), or None (loop thread)."""
        if not isinstance(self.sock, ssl.SSLSocket):
            return None
        return self.sock.getpeercert(binary_form)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context this connection's handshake used (renewal may have swapped the server's since)."""
        return self.sock.context if isinstance(self.sock, ssl.SSLSocket) else None

    # -- the loop thread: life ---------------------------------------------------------------

    def _adopt(self) -> None:
        """Start on the loop (posted by the accepting thread)."""
        if self._state == CLOSED:  # aborted before its loop got to it
            return
        self.loop.connections += 1
        self._mask = READ
        self.loop.register(self.fd, READ, self._on_events)
        if self.host.tls_context() is None:
            self._open(NO_ALPN)
        else:
            self._timer = self.loop.call_later(self.host.handshake_timeout, self._opening_expired)

    def _on_events(self, mask: int) -> None:
        state = self._state
        if state >= OPEN:
            if mask & ERROR and self._paused and state == OPEN:
                # Reported whatever the mask (level-triggered): a reset while reading is paused
                # would spin the loop until resumed. The peer is gone; so is what it left unread.
                error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self._peer_gone(os.strerror(error).lower() if error else "connection lost")
                return
            if mask & (READ | ERROR):
                self._read()
                if self._write_wants_read and self._state < CLOSED:
                    self._write_wants_read = False
                    self._flush()
            if mask & WRITE and self._state < LINGER:
                if self._read_wants_write:
                    self._read()
                if self._state < LINGER:
                    self._flush()
        elif state == HANDSHAKE:
            self._handshake()
        elif state == SNIFF:
            self._sniff()

    def _sniff(self) -> None:
        """The first bytes: a TLS record, or plaintext (whose route may need a few bytes to tell)."""
        sock = self.sock
        try:
            first = sock.recv(1, socket.MSG_PEEK) if not self._first else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("handshake with %s failed: %s", self.peer, describe_error(exc))
            self._close_fd()
            return
        if first and first[0] == TLS_HANDSHAKE_RECORD:
            offered = self._offered_alpn(sock)
            if offered is None:
                return  # the rest of the ClientHello is on its way: looked at again in a moment
            context = self.host.tls_context(offered)
            assert context is not None
            try:
                # Ragged EOFs raise, so a vanished peer is told apart from one that said goodbye.
                self.sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False,
                                                suppress_ragged_eofs=False)
            except (OSError, ValueError) as exc:  # e.g. the peer sent its bytes and hung up at once
                log.info("handshake with %s failed: %s", self.peer, describe_error(exc))
                self._close_fd()
                return
            self.tls = True
            self._state = HANDSHAKE
            self._handshake()
            return
        if not first and not self._first:
            self._close_fd()  # closed before saying anything
            return
        try:
            data = sock.recv(HTTP_SNIFF_BYTES - len(self._first))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._first += data
        key = self.host.routes.plaintext(self._first)
        if key is None and data:
            return  # wait for the rest of the request line's method (under the opening deadline)
        log.info("%s spoke plaintext to the TLS port", self.peer)
        first_bytes, self._first = self._first, b""
        self._open(key if key is not None else PLAINTEXT, first_bytes)

    def _offered_alpn(self, sock: socket.socket) -> tuple[str, ...] | None:
        """The ALPN names the ClientHello offers (peeked, left for OpenSSL), or None to wait for its rest.

        Browsers are spared the client-certificate request (see :mod:`securechat.wire.hello`), which
        the server can only decide before the handshake starts. While the ClientHello is incomplete
        (a browser's spans two TCP segments on most LANs) the socket is not watched, or the unread bytes
        would wake the loop without pause; it is looked at again after 2, 4, 8 ... ms, at most
        :data:`~securechat.wire.hello.HELLO_WAITS` times, and after that the default context is used.
        """
        try:
            data = sock.recv(hello.MAX_HELLO_BYTES, socket.MSG_PEEK)
        except OSError:
            return ()  # the handshake will say what is wrong
        offered = hello.offered_alpn(data)
        if offered is None and self._hello_waits < hello.HELLO_WAITS:
            self._hello_waits += 1
            self._set_mask(0)
            self.loop.call_later(0.001 * 2 ** self._hello_waits, self._sniff_again)
            return None
        return offered or ()

    def _sniff_again(self) -> None:
        if self._state == SNIFF:
            self._set_mask(READ)
            self._sniff()

    def _handshake(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_mask(READ)
        except ssl.SSLWantWriteError:
            self._set_mask(WRITE)
        except ssl.SSLError as exc:  # includes a refused client certificate: worth the admin's eye
            log.warning("refused TLS handshake from %s: %s", self.peer, describe_error(exc))
            self._close_fd()
        except (OSError, ValueError) as exc:
            log.info("handshake with %s failed: %s", self.peer, describe_error(exc))
            self._close_fd()
        else:
            self.host.handshaken(self)
            self._open(sock.selected_alpn_protocol())

    def _opening_expired(self) -> None:
        if self._state < OPEN:
            log.info("handshake with %s failed: timed out", self.peer)
            self._close_fd()

    def _open(self, key: str | None, first: bytes = b"") -> None:
        """The route is decided: make the handler and hand it the connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        factory = self.host.routes.get(key)
        if factory is None:
            log.info("%s: nothing serves %r here", self.peer, key)
            self._close_fd()
            return
        if self._asked:  # evicted while opening: the abort queued on the loop ends it, handler-less
            return
        self.alpn = key
        self._state = OPEN
        self._set_mask(READ)
        try:
            handler = self.handler = factory()
        except Exception:
            log.exception("unexpected error with %s", self.peer)
            self._close_fd()
            return
        self._call(handler.connection_made, self)
        if first and self._state == OPEN:
            self._call(handler.data_received, first)
        if self._state == OPEN and not self._paused:
            self.loop.ready(self)  # whatever came with the handshake's last flight

    def _read_more(self) -> None:
        if self._state >= OPEN and not self._paused:
            self._read()

    def _read(self) -> None:
        if self._paused and self._state == OPEN:
            return
        self._read_wants_write = False
        sock = self.sock
        for _ in range(READS_PER_TURN):
            try:
                data = sock.recv(RECV_SIZE)
            except _WOULD_BLOCK_READ:
                break
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                self._update_mask()
                break
            except ssl.SSLZeroReturnError:
                self._peer_gone("closed by peer")
                return
            except OSError as exc:
                self._peer_gone(describe_error(exc))
                return
            if not data:
                self._peer_gone("closed by peer")
                return
            if self._state != OPEN or self._eof:
                continue  # leaving: keep TLS moving, act on nothing more
            self._call(self.handler.data_received, data)  # type: ignore[union-attr]
            if self._paused or self._state != OPEN:
                return
        else:
            self.loop.ready(self)  # a flood may not starve the others: the rest next turn
            return
        if self.tls and self._state == OPEN and not self._paused and sock.pending():  # type: ignore[union-attr]
            self.loop.ready(self)

    def _peer_gone(self, reason: str) -> None:
        state = self._state
        if state == LINGER:
            self._close_fd()
            return
        if state == OPEN and reason == "closed by peer" and not self._eof:
            handler = self.handler
            keep = False
            try:
                keep = bool(handler is not None and handler.eof_received())
            except Exception:
                log.exception("unexpected error with %s", self.peer)
            if keep and self._state == OPEN:
                self._eof = True
                self._update_mask()
                return
        self._end(reason)
        self._close_fd()

    def _flush(self) -> None:
        """Write what is queued, coalesced; finish a close once everything is out."""
        self._dirty = False
        state = self._state
        if state >= LINGER or self._held or self._write_wants_read or self._read_wants_write:
            return
        sock = self.sock
        view = self._view  # a blocked write is retried with the same bytes, as OpenSSL requires
        while True:
            if view is None:
                out = self._out
                if not out:
                    break
                self._out = None
                view = out[0] if len(out) == 1 else b"".join(out)
            try:
                n = sock.send(view)
            except _WOULD_BLOCK_WRITE:
                break
            except ssl.SSLWantReadError:
                self._write_wants_read = True
                break
            except OSError as exc:
                self._view = None
                self._end(describe_error(exc))
                self._close_fd()
                return
            self._backlog -= n
            self._sent += n
            # Even an empty slice keeps the whole buffer alive: drop it once written, or an idle
            # connection holds on to its last (possibly 1 MiB) batch.
            view = memoryview(view)[n:] if n < len(view) else None
        self._view = view
        if (view is not None) != bool(self._mask & WRITE) or self._write_wants_read:
            self._update_mask()
        watchers = self._watchers
        if watchers is not None:
            while watchers and watchers[0][0] <= self._sent:
                _, fn, args = watchers.popleft()
                self._call(fn, *args)
            if not watchers and self._watchers is watchers:
                self._watchers = None  # an idle connection keeps no deque
        if self._writes_paused and self._backlog <= self.low_water and self._state == OPEN:
            self._writes_paused = False
            self._call(self.handler.resume_writing)  # type: ignore[union-attr]
        if self._state == CLOSING and view is None and not self._out:
            self._closed_cleanly()

    def _close_here(self, last: bytes, reason: str) -> None:
        """A clean close, on the loop: ``last``, then flush, then close_notify and linger."""
        self._asked = True
        state = self._state
        if state >= CLOSING:
            return
        if state < OPEN:
            self._close_fd()
            return
        if last:
            self.write(last)
            if self._state != OPEN:  # that was over the bound: aborting
                return
        self._state = CLOSING
        self._reason = reason
        self._timer = self.loop.call_later(CLOSE_FLUSH_SECONDS, self._flush_expired)
        if not self._dirty:
            self._dirty = True
            self.loop.dirty(self)

    def _flush_expired(self) -> None:
        if self._state == CLOSING:
            self._end(f"{self._reason} (peer not reading)")
            self._close_fd()

    def _closed_cleanly(self) -> None:
        """Everything is out: tell the handler, send close_notify and FIN, then read until EOF, briefly."""
        if self._timer is not None:
            self._timer.cancel()
        self._end(self._reason)
        if not send_close(self.sock):
            self._close_fd()
            return
        self._state = LINGER
        self._view = self._out = None
        self._set_mask(READ)
        self._timer = self.loop.call_later(LINGER_SECONDS, self._close_fd)

    def _abort_here(self, reason: str) -> None:
        if self._state == CLOSED:
            return
        self._end(reason)
        self._close_fd()

    def _end(self, reason: str) -> None:
        """The connection is over for the handler: ``connection_lost``, exactly once."""
        if self._lost:
            return
        self._lost = True
        self._asked = True
        handler = self.handler
        if handler is not None:
            try:
                handler.connection_lost(reason)
            except Exception:
                log.exception("unexpected error with %s", self.peer)

    def _close_fd(self) -> None:
        """Close the socket and forget it (the handler, if any, was told first)."""
        if self._state == CLOSED:
            return
        registered = self._mask >= 0
        self._state = CLOSED
        self._asked = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._end("closed")
        if registered:
            self.loop.unregister(self.fd)
            self.loop.connections -= 1
        self._out = self._view = self._watchers = None
        self._backlog = 0
        try:
            self.sock.close()
        except OSError:
            pass
        self.host.connection_closed(self)

    def _abandon(self) -> None:
        """The loop is stopping: close without a word."""
        self._end("server stopped")
        self._close_fd()

    # -- helpers -----------------------------------------------------------------------------

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        """Call the handler; a bug in it ends this connection, never the loop."""
        try:
            fn(*args)
        except Exception:
            log.exception("unexpected error with %s", self.peer)
            self._asked = True
            self.loop.call_soon_threadsafe(self._abort_here, "internal error")

    def _set_mask(self, mask: int) -> None:
        if mask != self._mask and self._mask >= 0 and self._state != CLOSED:
            self._mask = mask
            self.loop.modify(self.fd, mask)

    def _update_mask(self) -> None:
        state = self._state
        if state == CLOSED or state < OPEN:
            return
        want = 0 if (self._paused and state == OPEN) or self._eof else READ
        if (self._view is not None and not self._write_wants_read) or self._read_wants_write:
            want |= WRITE
        self._set_mask(want)
