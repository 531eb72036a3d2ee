"""The chat server: accepts, admits, and gives each connection to one of a few loop threads for life.

Threads: the accept loop (``serve_forever``: it only accepts and admits, never reads or writes), a
few loop threads (:mod:`securechat.server.loop`; :func:`default_loops`), and a small worker pool for
what may block (:mod:`securechat.server.workers`). Not one thread per connection: a connection is a
:class:`~securechat.server.transport.Transport` owned by one loop, which alone touches its socket
(**one owner per SSL object**, as before, now a loop instead of a thread of its own), drives its
non-blocking TLS handshake under a deadline, and then hands its bytes to the handler its route
chose (:mod:`securechat.server.routes`: by ALPN, or by the first bytes of plaintext). A connection
costs one descriptor, its TLS state and a few small objects; a silent one costs nobody else anything.

Until its nickname is accepted a connection holds a place in the bounded pool of unauthenticated
connections (:mod:`securechat.server.pending`), not a chat place: the oldest of the busiest address
makes room for the newest. A chat line is formatted once by :class:`~securechat.server.rooms.Rooms`
and handed to each loop that has members of its room (one queue entry and at most one wake-up per
loop); each loop queues it on its own members' bounded outboxes and writes them.

**Plugging in a protocol** (the browser's HTTPS/WebSocket, file transfer): write a
:class:`~securechat.server.transport.Handler` and register its factory before the server starts,
``server.routes.add("http/1.1", lambda: MyHandler(server))``; the ALPN name is offered in every
handshake from then on (``routes.PLAINTEXT_HTTP`` for plaintext that looks like HTTP). A handler
that carries chat builds a :class:`~securechat.server.session.Session` over a connection that
frames each line its way and calls ``server.add_session``, exactly as
:class:`~securechat.server.lines.LineHandler` does for lines.

The command line (``securechat serve``) is :mod:`securechat.server.serve`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from securechat.pki import enrollment
from securechat.server.enroll import EnrollHandler
from securechat.server.handshake import Trimmer
from securechat.server.lines import LineHandler, Notice
from securechat.server.loop import Loop, Timer
from securechat.server.pending import MAX_PENDING, MAX_PENDING_PER_ADDRESS, PendingPool, Throttle, Ticket, address_key
from securechat.server.room import (
    ANNOUNCE_LIMIT,
    GRACE_SECONDS,
    REPLAY_LINES,
)
from securechat.server.rooms import Rooms
from securechat.server.routes import NO_ALPN, PLAINTEXT, Routes
from securechat.server.session import Session
from securechat.server.transport import Transport
from securechat.server.workers import WORKERS, Workers
from securechat.store.roomlog import Directory, RoomLog
from securechat.wire import addr, hello, protocol
from securechat.wire.addr import DEFAULT_HOST, DEFAULT_PORT
from securechat.wire.conn import OUTBOX_LIMIT, Waker, batched_wakeups, describe_error, tune_socket
from securechat.wire.console import announce

if TYPE_CHECKING:
    from securechat.pki.authority import Authority
    from securechat.server.trust import Trust

log = logging.getLogger("securechat.server")

# Registered chatters. A connection costs ~15-20 KiB (its TLS state, its objects), not a thread, so
# the bound is about people: beyond a LAN's thousand, raise it.
DEFAULT_MAX_CLIENTS = 1000

# A TLS 1.3 handshake is one round trip plus key exchange: 10 s is generous on any LAN, and short
# enough that sockets held open by clients that never speak are recycled quickly.
HANDSHAKE_TIMEOUT = 10.0

# From handshake to accepted nickname; a person typing a nick needs seconds, not minutes.
LOGIN_TIMEOUT = 30.0

# Flood control: a fast typist sends a line or two a second; pasting 20 lines at once is fine.
FLOOD_RATE = 10.0
FLOOD_BURST = 20

# Loop threads at most. A loop uses one core at best (its Python work holds the GIL; OpenSSL and
# the system calls release it), so one loop per core this process may run on; past four, more loops
# only add GIL hand-offs, not throughput.
MAX_LOOPS = 4

# Connections being told why they cannot join (server full, plaintext on the TLS port) keep their
# descriptor for up to ~2 s each (flush, linger); past this many at once they are closed without
# the explanation.
REFUSAL_HEADROOM = 64

# What an evicted unauthenticated connection ends with (it is dropped without a notice: a notice
# would keep it lingering for the peer's goodbye, which is what a flood would exploit).
EVICTED = "evicted: its place among connections still logging in was needed"

# accept() errors that concern one connection (it was reset before we took it), not the server.
# Linux passes the new connection's pending network error on from accept() (see accept(2)).
_ACCEPT_PEER_ERRORS = frozenset(getattr(errno, name) for name in (
    "ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
    "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name))


def default_loops() -> int:
    """Loop threads for this process: the cores it may run on, at most :data:`MAX_LOOPS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_LOOPS, cores))


class ChatServer:
    """A securechat server. ``ssl_context=None`` serves plain TCP (``--plain``)."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_per_ip: int = 0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        login_timeout: float = LOGIN_TIMEOUT,
        flood_rate: float = FLOOD_RATE,
        flood_burst: float = FLOOD_BURST,
        outbox_limit: int = OUTBOX_LIMIT,
        announce_limit: int = ANNOUNCE_LIMIT,
        max_pending: int = MAX_PENDING,
        max_pending_per_ip: int = MAX_PENDING_PER_ADDRESS,
        dual_stack: bool = False,
        roomlog: RoomLog | None = None,
        directory: Directory | None = None,
        replay: int = REPLAY_LINES,
        grace: float = GRACE_SECONDS,
        offline_messages: bool = False,
        authority: Authority | None = None,
        trust: Trust | None = None,
        loops: int | None = None,
        workers: int = WORKERS,
    ) -> None:
        self.host = host
        # host "::" with dual_stack: one socket for IPv6 and IPv4 (IPV6_V6ONLY off), where the OS allows it.
        self.dual_stack = dual_stack
        self.port = port
        self.ssl_context = ssl_context  # read at each handshake: renewal swaps it (pki.renewal)
        self.max_clients = max_clients
        self.max_per_ip = max_per_ip
        self.handshake_timeout = handshake_timeout
        self.login_timeout = login_timeout
        self.flood_rate = flood_rate
        self.flood_burst = flood_burst
        self.outbox_limit = outbox_limit
        # Who is in which room; lines go through ``roomlog`` (default: LocalLog, no history) and
        # the people on other servers come from ``directory`` (default: nobody else).
        self.rooms = Rooms(roomlog, directory, announce_limit=announce_limit, replay=replay, grace=grace,
                           offline_messages=offline_messages)
        self.rooms.schedule = self._schedule  # grace periods: timer-heap entries, run on a worker
        # Invites and renewals (securechat.pki.enrollment), when the CA is at hand.
        self.authority = authority
        # The CA's ledger enforced here (securechat.server.trust): revoked certificates, names given out.
        self.trust = trust
        if trust is not None:
            self.rooms.persons = trust.person  # offline messages go to people the CA knows, by their name
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        self._chatters = 0  # sessions holding a chat place (a Slot): what max_clients bounds
        self._per_ip: dict[str, int] = {}  # chat places by address: what max_per_ip bounds
        self._refusing = 0  # connections being told why they are refused: what REFUSAL_HEADROOM bounds
        self._connections = 0  # accepted and not yet closed, in any phase
        self._all_closed = threading.Condition(self._lock)
        # Repeated trouble (evictions, out of descriptors) is one log line per interval.
        self._throttle = Throttle(log)
        # Connections not yet past their nickname (or an enrollment): public, for other entry paths.
        self.pending = PendingPool(max_pending, max_pending_per_ip, self._throttle)
        self.loops = [Loop(f"securechat-loop-{i}") for i in range(loops or default_loops())]
        self._trimmers = {loop: Trimmer(loop) for loop in self.loops}
        self.workers = Workers(workers)
        self._started = False
        self._burst = [0] * len(self.loops)  # connections given to each loop in this accept burst
        self._alpn_ready: ssl.SSLContext | None = None  # the context whose ALPN list is set
        self._alpn_lock = threading.Lock()
        # Which handler a connection gets: by ALPN after the handshake, by its first bytes before.
        self.routes = Routes()
        self.routes.add(NO_ALPN, lambda: LineHandler(self))
        self.routes.add(PLAINTEXT, lambda: Notice(self, self._tls_required()))
        if authority is not None:
            self.routes.add(enrollment.ALPN, lambda: EnrollHandler(authority))
        self._listener: socket.socket | None = None
        self._waker = Waker()
        self._stopping = threading.Event()
        self._signalled = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Create the listening socket and start the loop threads; return the address bound.

        Port 0 picks a free port. Once this returns, connections queue until :meth:`serve_forever`.
        """
        protocol.prepare()  # the look-alike tables: built here, not during someone's first join
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.dual_stack else 1)
            listener.bind((self.host, self.port))
            listener.listen(min(socket.SOMAXCONN, 4096))
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        if not self._started:
            self._started = True
            for loop in self.loops:
                loop.start()
            self.workers.start()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "bind() first"
        name = self._listener.getsockname()
        return str(name[0]), int(name[1])

    def start(self) -> tuple[str, int]:
        """Bind and serve from a background thread; return the bound address."""
        address = self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="securechat-accept", daemon=True)
        self._thread.start()
        return address

    def serve_forever(self, signal_fd: int | None = None) -> None:
        """Accept until :meth:`stop` (or a signal handler calling it).

        ``signal_fd`` is the read end of :func:`signal.set_wakeup_fd`'s pipe: a signal delivered to
        any other thread wakes the loop, so the main thread runs its Python handler at once.
        """
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        self.rooms.start()  # here, not in bind(): the caller may set rooms.log once the port is known
        listener = self._listener
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(self._waker.fileno(), select.POLLIN)
        if signal_fd is not None:
            poller.register(signal_fd, select.POLLIN)
        throttle = self._throttle
        try:
            while not self._stop_requested():
                due = throttle.due()  # wake up to log what repeated trouble was not yet told
                for fd, _ in poller.poll(None if due is None else due * 1000 + 1):
                    if fd == signal_fd:
                        try:
                            os.read(fd, 512)  # the handler itself runs in this thread, now
                        except OSError:
                            pass
                throttle.flush()
                with batched_wakeups():  # each loop is woken once for the whole burst
                    self._accept_burst(listener)
        finally:
            listener.close()
            self._stopped.set()

    def _accept_burst(self, listener: socket.socket) -> None:
        self._burst = [0] * len(self.loops)
        while not self._stop_requested():
            try:
                sock, peer = listener.accept()
                # The seed's ('ip', port), also for IPv4 clients of a dual-stack socket
                # (::ffff:192.0.2.1): per-address limits and logs then see one address.
                peer = (addr.unmap(peer[0]), peer[1])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PEER_ERRORS:
                    continue  # that connection is gone already; the next may be fine
                self._accept_failed(exc)
                return
            self._admit(sock, peer)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors (EMFILE, ENFILE) or kernel memory: make room, back off, keep serving.

        The connections waiting in the listen queue stay there; the oldest unauthenticated
        connection is closed to free a descriptor for them, so a flood that exhausts descriptors
        still cannot keep a real client out. One log line per interval, however often it happens.
        """
        made_room = self.pending.evict_one()
        self._throttle("descriptors", f"accept failed: {describe_error(exc)}; "
                       + ("closing the oldest unauthenticated connections to make room" if made_room else
                          "newcomers wait in the listen queue (raise 'ulimit -n' or lower --max-clients)"))
        # The evicted connection's loop frees its descriptor within milliseconds; with nothing to
        # evict, only a departure frees one, and the listener would otherwise poll readable in a spin.
        time.sleep(0.01 if made_room else 0.1)

    def stop(self) -> None:
        """Ask the accept loop to end; safe from any thread."""
        self._stopping.set()
        self._waker.wake()

    def stop_from_signal(self) -> None:
        """Ask the accept loop to end, from a signal handler.

        Takes no lock: the handler runs in the main thread between two bytecodes, possibly while
        that very thread holds one. ``serve_forever(signal_fd=...)`` makes its poll() return.
        """
        self._signalled = True

    def _stop_requested(self) -> bool:
        return self._signalled or self._stopping.is_set()

    def shutdown(self, timeout: float = 1.5) -> None:
        """Stop accepting, tell every client the server is going, close them all cleanly."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._stopped.wait(timeout)
        bye = protocol.notice(protocol.SHUTDOWN)
        for session in self.sessions():
            session.conn.close(bye, reason=protocol.SHUTDOWN)
        with self._all_closed:  # every goodbye flushed (or its reader given up on), every session gone
            self._all_closed.wait_for(lambda: not self._sessions and not self._refusing, timeout)
        self.workers.drain(timeout)  # their departures (rooms, Redis, read positions) run on workers
        self.workers.close()
        for loop in self.loops:
            loop.stop()
        self._waker.close()
        self._throttle.flush(force=True)
        self.rooms.close()  # after the sessions: a graceful stop stores every line said

    def abandon(self) -> None:
        """Undo :meth:`bind` for a server that will not serve after all."""
        if self._listener is not None:
            self._listener.close()
        self.workers.close(wait=False)
        for loop in self.loops:
            loop.stop()
        self._waker.close()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- what the handlers and transports ask ------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def sessions(self) -> list[Session]:
        """A snapshot of the sessions past the handshake."""
        with self._lock:
            return list(self._sessions)

    def add_session(self, session: Session) -> None:
        """A chat session began (its handler calls this before greeting)."""
        with self._lock:
            self._sessions.add(session)

    def reserved(self, nick: str) -> str | None:
        """Why a client without a certificate may not take ``nick`` (it is a certificate's name), or None."""
        return self.trust.reserved(nick) if self.trust is not None else None

    @property
    def client_count(self) -> int:
        """Sessions past the handshake."""
        return len(self._sessions)

    @property
    def connection_count(self) -> int:
        """Connections accepted and not yet closed, in any phase (handshake, login, chat, linger)."""
        return self._connections

    def tls_context(self, offered: tuple[str, ...] = ()) -> ssl.SSLContext | None:
        """The context for a new handshake, offering the routes' ALPN names (None: ``--plain``).

        ``offered``: the ALPN names of the client's ClientHello. A browser's handshake gets the context
        the browser front door attached (``securechat_browsers``: no client-certificate request), if any.
        """
        ctx = self.ssl_context
        if ctx is not None and hello.is_browser(offered):
            browsers = getattr(ctx, "securechat_browsers", None)
            if browsers is not None:
                return browsers
        if ctx is not None and ctx is not self._alpn_ready:
            with self._alpn_lock:  # once per context, before any handshake uses it
                if ctx is not self._alpn_ready:
                    names = self.routes.alpn()
                    if names:
                        ctx.set_alpn_protocols(names)
                    self._alpn_ready = ctx
        return ctx

    def handshaken(self, transport: Transport) -> None:
        self._trimmers[transport.loop].owe()

    def connection_closed(self, transport: Transport) -> None:
        """A transport closed its socket (any phase): its pending place and counts go."""
        admission = transport.admission
        with self._lock:
            self._connections -= 1
            if admission is not None and admission.refusing:
                self._refusing -= 1
            self._all_closed.notify_all()
        if admission is not None:
            admission.ticket.release()

    def _schedule(self, delay: float, fn: Callable[..., object], *args: Any) -> Timer:
        """``fn(*args)`` on a worker in ``delay`` seconds (may block: it is the rooms' expiry)."""
        loop = self.loops[0]
        return loop.call_later(delay, self.workers.submit, loop, fn, args, None)

    def _tls_required(self) -> str:
        return (f"{protocol.TLS_REQUIRED}: connect with 'securechat connect HOST' "
                f"or 'openssl s_client -connect HOST:{self.address[1]}'")

    def _admit(self, sock: socket.socket, peer: tuple) -> None:
        """Give a new connection a pending place and a loop; runs in the accept loop, never waits."""
        announce(f"[NEW CLIENT] Connected from {peer[:2]}")
        loads = [loop.connections + burst for loop, burst in zip(self.loops, self._burst, strict=True)]
        i = loads.index(min(loads))  # the loop with the fewest connections
        self._burst[i] += 1
        loop = self.loops[i]
        transport = Transport(sock, peer, loop, self, self.outbox_limit)
        admission = transport.admission = Admission(transport)
        with self._lock:
            self._connections += 1
        # May close the oldest pending connection of the busiest address to make room: never refused.
        admission.ticket = self.pending.admit(address_key(str(peer[0])), admission.evict)
        try:
            tune_socket(sock)
            sock.setblocking(False)
        except OSError:  # reset before we got to it
            sock.close()
            self.connection_closed(transport)
            return
        loop.call_soon_threadsafe(transport._adopt)

    def early_refusal(self, peer: tuple) -> str | None:
        """Why a connection from ``peer`` cannot chat now (full, too many from its address), or None.

        Early word for the common case; :meth:`take_place` decides, atomically, at the nickname.
        """
        with self._lock:
            return self._refusal(address_key(str(peer[0])))

    def refuse(self, transport: Transport, text: str) -> None:
        """Tell a connection why it cannot join and close it, while the headroom for that lasts."""
        with self._lock:
            busy = self._refusing >= REFUSAL_HEADROOM
            if not busy:
                self._refusing += 1
                transport.admission.refusing = True
        if busy:
            self._throttle("refusing", f"closed {transport.peer[:2]} without a word ({text}): already telling "
                           f"{REFUSAL_HEADROOM} others")
            transport.abort(text)
            return
        log.info("refused %s: %s", transport.peer, text)
        transport.close(protocol.notice(text), reason=text)

    def release_session(self, session: Session) -> None:
        """The session is over for everyone else: free its places before its socket lingers."""
        with self._lock:
            self._sessions.discard(session)
            self._all_closed.notify_all()
        if session.admission is not None:
            session.admission.ticket.release()
        self.give_back_place(session)

    def _refusal(self, ip: str) -> str | None:
        """Why a connection from ``ip`` may not take a chat place now (caller holds the lock)."""
        if self._chatters >= self.max_clients:
            return f"{protocol.SERVER_FULL} ({self.max_clients} clients); try again later"
        if self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip:
            return f"too many connections from {ip} (at most {self.max_per_ip}); try again later"
        return None

    def take_place(self, session: Session) -> str | None:
        """Give ``session`` a chat place (counted by max_clients and max_per_ip); or say why not."""
        ip = address_key(str(session.peer[0]))
        with self._lock:
            refusal = self._refusal(ip)
            if refusal is None:
                self._chatters += 1
                self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
                session.slot = Slot(self, ip)
        return refusal

    def give_back_place(self, session: Session) -> None:
        slot, session.slot = session.slot, None
        if slot is not None:
            slot.release()


class Admission:
    """A connection on its way in: its pending place, and how to end it when the pool needs the place.

    :meth:`evict` may come from any thread at any moment; the transport's ``abort`` is thread-safe
    and idempotent, and the transport's loop alone closes the socket.
    """

    __slots__ = ("transport", "ticket", "evicted", "refusing")

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.ticket: Ticket
        self.evicted = False
        self.refusing = False  # counted in the server's REFUSAL_HEADROOM until the socket closes

    def evict(self) -> None:
        """The pending pool needs this place: ask the connection's loop to close it (any thread)."""
        self.evicted = True
        self.transport.abort(EVICTED)


class Slot:
    """A chatter's place in the counts of max_clients and max_per_ip, given back exactly once."""

    __slots__ = ("server", "ip", "_held")

    def __init__(self, server: ChatServer, ip: str) -> None:
        self.server = server
        self.ip = ip
        self._held = True

    def release(self) -> None:
        server = self.server
        per_ip = server._per_ip
        with server._lock:
            if not self._held:
                return
            self._held = False
            server._chatters -= 1
            left = per_ip.get(self.ip, 1) - 1
            if left > 0:
                per_ip[self.ip] = left
            else:
                per_ip.pop(self.ip, None)
