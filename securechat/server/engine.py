"""The chat server: one thread per client, each the sole owner of its connection.

The accept loop only accepts: it never reads, writes or handshakes. A TLS connection's handshake
runs non-blocking, under a deadline, in one of a few handshake threads (:mod:`securechat.server.handshake`),
so a client that connects and never speaks delays nobody and costs no thread; once the handshake is
done the connection gets a thread of its own, which registers a nick and then drives its
:class:`~securechat.wire.conn.Connection`. Until its nickname is accepted a connection holds a place in
the bounded pool of unauthenticated connections (:mod:`securechat.server.pending`), not a chat place: the
oldest of the busiest address makes room for the newest, so silent sockets cannot lock anyone out.
A chat line is formatted once and handed to every other member's bounded outbox by
:class:`~securechat.server.rooms.Rooms` (through the room log, which gives it an id and stores it after
delivery); the sender never writes to another client's socket and never waits for one.

The command line (``securechat serve``) is :mod:`securechat.server.serve`.
"""

from __future__ import annotations

import _thread
import errno
import functools
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from securechat.server.handshake import Handshaker
from securechat.server.pending import MAX_PENDING, MAX_PENDING_PER_ADDRESS, PendingPool, Throttle, Ticket, address_key
from securechat.server.room import (
    ANNOUNCE_LIMIT,
    GRACE_SECONDS,
    REPLAY_LINES,
)
from securechat.server.rooms import Rooms
from securechat.server.session import Session
from securechat.store.roomlog import Directory, RoomLog
from securechat.wire import addr, protocol
from securechat.wire.addr import DEFAULT_HOST, DEFAULT_PORT
from securechat.wire.conn import OUTBOX_LIMIT, Waker, close_gracefully, describe_error, tune_socket
from securechat.wire.console import announce

if TYPE_CHECKING:
    from securechat.pki.authority import Authority
    from securechat.server.trust import Trust

log = logging.getLogger("securechat.server")

# Registered chatters, a thread each; 1000 threads with small stacks is ~100 MiB of address space at
# most. Connections still logging in are bounded separately (pending.MAX_PENDING): at most
# max_clients + max_pending + REFUSAL_HEADROOM connection threads in all.
DEFAULT_MAX_CLIENTS = 1000

# A TLS 1.3 handshake is one round trip plus key exchange: 10 s is generous on any LAN, and short
# enough that sockets held open by clients that never speak are recycled quickly.
HANDSHAKE_TIMEOUT = 10.0

# From handshake to accepted nickname; a person typing a nick needs seconds, not minutes.
LOGIN_TIMEOUT = 30.0

# Flood control: a fast typist sends a line or two a second; pasting 20 lines at once is fine.
FLOOD_RATE = 10.0
FLOOD_BURST = 20

# Sessions keep Python's call depth shallow; the 8 MiB default stack is address space wasted a
# thousand times over.
THREAD_STACK_SIZE = 512 * 1024

# Handshake threads: OpenSSL releases the GIL for the handshake's cryptography, so one per core.
HANDSHAKE_THREADS = max(1, min(4, os.cpu_count() or 1))

# Connections being told why they cannot join (server full, plaintext on the TLS port) need a thread
# for up to ~2.5 s each; past this many at once they are closed without the explanation.
REFUSAL_HEADROOM = 64

# A session that finds no descriptor for its eventfd makes room (evicting a pending connection) and
# tries again this many times in all: a few 10 ms waits, then it gives up.
SESSION_ATTEMPTS = 3

# What an evicted unauthenticated connection ends with (it is dropped without a notice: a notice
# would keep its thread lingering for the peer's goodbye, which is what a flood would exploit).
EVICTED = "evicted: its place among connections still logging in was needed"

# accept() errors that concern one connection (it was reset before we took it), not the server.
# Linux passes the new connection's pending network error on from accept() (see accept(2)).
_ACCEPT_PEER_ERRORS = frozenset(getattr(errno, name) for name in (
    "ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
    "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name))


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
    ) -> None:
        self.host = host
        # host "::" with dual_stack: one socket for IPv6 and IPv4 (IPV6_V6ONLY off), where the OS allows it.
        self.dual_stack = dual_stack
        self.port = port
        self.ssl_context = ssl_context
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
        self._refusing = 0  # refusal threads alive: what REFUSAL_HEADROOM bounds
        # Repeated trouble (evictions, out of descriptors or threads) is one log line per interval.
        self._throttle = Throttle(log)
        # Connections not yet past their nickname (or an enrollment): public, for other entry paths.
        self.pending = PendingPool(max_pending, max_pending_per_ip, self._throttle)
        self._handshakers: list[Handshaker] = []
        self._next_handshaker = 0
        self._listener: socket.socket | None = None
        self._waker = Waker()
        self._stopping = threading.Event()
        self._signalled = False
        self._stopped = threading.Event()
        self._threads = 0  # connection threads alive (sessions and refusals)
        self._threads_done = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Create the listening socket and start the handshake threads; return the address bound.

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
        self._start_handshakers()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "bind() first"
        name = self._listener.getsockname()
        return str(name[0]), int(name[1])

    def _start_handshakers(self) -> None:
        threading.stack_size(THREAD_STACK_SIZE)
        if self.ssl_context is not None and not self._handshakers:
            self._handshakers = [
                Handshaker(self._current_context, self.handshake_timeout, self._handshake_done,
                           self._plaintext_on_tls_port, self._handshake_failed, name=f"securechat-handshake-{i}")
                for i in range(HANDSHAKE_THREADS)
            ]
            for handshaker in self._handshakers:
                handshaker.start()

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
                while not self._stop_requested():
                    try:
                        sock, peer = listener.accept()
                        # The seed's ('ip', port), also for IPv4 clients of a dual-stack socket
                        # (::ffff:192.0.2.1): per-address limits and logs then see one address.
                        peer = (addr.unmap(peer[0]), peer[1])
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno in _ACCEPT_PEER_ERRORS:
                            continue  # that connection is gone already; the next may be fine
                        self._accept_failed(exc)
                        break
                    self._admit(sock, peer)
        finally:
            listener.close()
            self._stopped.set()

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
        # The evicted connection's owner frees its descriptor within milliseconds; with nothing to
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
        for handshaker in self._handshakers:
            handshaker.stop()
        with self._lock:
            sessions = list(self._sessions)
        bye = protocol.notice(protocol.SHUTDOWN)
        for session in sessions:
            session.conn.close(bye, reason=protocol.SHUTDOWN)
        with self._threads_done:
            self._threads_done.wait_for(lambda: self._threads == 0, timeout)
        self._waker.close()
        self._throttle.flush(force=True)
        self.rooms.close()  # after the sessions: a graceful stop stores every line said

    def abandon(self) -> None:
        """Undo :meth:`bind` for a server that will not serve after all."""
        for handshaker in self._handshakers:
            handshaker.stop()
        if self._listener is not None:
            self._listener.close()
        self._waker.close()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- connections ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def sessions(self) -> list[Session]:
        """A snapshot of the sessions past the handshake."""
        with self._lock:
            return list(self._sessions)

    def reserved(self, nick: str) -> str | None:
        """Why a client without a certificate may not take ``nick`` (it is a certificate's name), or None."""
        return self.trust.reserved(nick) if self.trust is not None else None

    @property
    def client_count(self) -> int:
        """Sessions past the handshake."""
        return len(self._sessions)

    def _current_context(self) -> ssl.SSLContext:
        assert self.ssl_context is not None
        return self.ssl_context

    def _admit(self, sock: socket.socket, peer: tuple) -> None:
        """Give a new connection a pending place and pass it on; runs in the accept loop, never waits."""
        announce(f"[NEW CLIENT] Connected from {peer[:2]}")
        admission = Admission(peer)
        # May close the oldest pending connection of the busiest address to make room: never refused.
        admission.ticket = self.pending.admit(address_key(str(peer[0])), admission.evict)
        try:
            tune_socket(sock)
        except OSError:  # reset before we got to it
            sock.close()
            self._handshake_failed(peer, admission)
            return
        if self._handshakers:
            handshaker = self._handshakers[self._next_handshaker]
            self._next_handshaker = (self._next_handshaker + 1) % len(self._handshakers)
            admission.hand_to(functools.partial(handshaker.cancel, handshaker.submit(sock, peer, admission)))
        elif not self._start(self._run_session, sock, peer, admission):
            admission.ticket.release()

    def _start(self, target: Callable[..., None], sock: socket.socket | ssl.SSLSocket, peer: tuple,
               *args: object) -> bool:
        """Give a connection (and the ownership of its socket) to a thread of its own.

        A bare ``_thread`` thread: a ``threading.Thread`` object, with its events and locks, costs
        another 2.6 KiB a connection, and the server keeps its own count for :meth:`shutdown`.
        False (and the socket closed) when no thread can be started.
        """
        with self._lock:
            self._threads += 1
        try:
            _thread.start_new_thread(self._thread_main, (target, (sock, peer, *args)))
        except RuntimeError as exc:  # can't start a thread: out of memory or a ulimit
            self._throttle("thread", f"closed {peer[:2]}: cannot start a thread: {exc}")
            sock.close()
            self._thread_ended()
            return False
        return True

    def _thread_main(self, target: Callable[..., None], args: tuple[object, ...]) -> None:
        try:
            target(*args)
        finally:
            self._thread_ended()

    def _thread_ended(self) -> None:
        with self._threads_done:
            self._threads -= 1
            if not self._threads:
                self._threads_done.notify_all()

    @property
    def thread_count(self) -> int:
        """Connection threads alive: sessions, and connections being told why they are refused."""
        return self._threads

    def _handshake_failed(self, peer: tuple, admission: object) -> None:
        """A connection ended before it had a thread (the socket is already closed)."""
        assert isinstance(admission, Admission)
        admission.ticket.release()

    def _plaintext_on_tls_port(self, raw: socket.socket, peer: tuple, admission: object) -> None:
        assert isinstance(admission, Admission)
        admission.ticket.release()
        notice = (f"{protocol.TLS_REQUIRED}: connect with 'securechat connect HOST' "
                  f"or 'openssl s_client -connect HOST:{self.address[1]}'")
        self._refuse(raw, peer, notice)

    def _handshake_done(self, sock: ssl.SSLSocket, peer: tuple, admission: object) -> None:
        assert isinstance(admission, Admission)
        if admission.evicted:  # between the handshake's end and this call: its place is gone
            sock.close()
            return
        if self.authority is not None and self.authority.wants(sock):  # a join: takes no chat place
            if not self._start(self._run_enroll, sock, peer, admission):
                admission.ticket.release()
            return
        # Early word for the common case; _take_place decides, atomically, at the nickname.
        with self._lock:
            refusal = self._refusal(address_key(str(peer[0])))
        if refusal:
            admission.ticket.release()
            self._refuse(sock, peer, refusal)
        elif not self._start(self._run_session, sock, peer, admission):
            admission.ticket.release()

    def _refuse(self, sock: socket.socket | ssl.SSLSocket, peer: tuple, text: str) -> None:
        """Tell a connection why it cannot join, from a thread of its own, while threads for that last."""
        with self._lock:
            busy = self._refusing >= REFUSAL_HEADROOM
            if not busy:
                self._refusing += 1
        if busy:
            sock.close()
            self._throttle("refusing", f"closed {peer[:2]} without a word ({text}): already telling "
                           f"{REFUSAL_HEADROOM} others")
        elif not self._start(self._run_refusal, sock, peer, text):
            self._refusal_done()

    def _refusal_done(self) -> None:
        with self._lock:
            self._refusing -= 1

    def _run_refusal(self, sock: socket.socket | ssl.SSLSocket, peer: tuple, text: str) -> None:
        try:
            log.info("refused %s: %s", peer, text)
            _say_and_close(sock, protocol.notice(text))
        finally:
            self._refusal_done()

    def _run_enroll(self, sock: ssl.SSLSocket, peer: tuple, admission: Admission) -> None:
        """An enrollment exchange (securechat.pki.enrollment): unauthenticated from start to end, so it holds its
        pending place throughout; evicted, its blocking read is ended by shutting the socket down."""
        assert self.authority is not None
        try:
            admission.hand_to(functools.partial(_shut_down, sock))
            self.authority.serve(sock, peer)
        except Exception:  # one joiner's bug must not take the server down
            log.exception("unexpected error enrolling %s", peer)
        finally:
            admission.ticket.release()
            _say_and_close(sock, b"")

    def _run_session(self, sock: socket.socket | ssl.SSLSocket, peer: tuple, admission: Admission) -> None:
        session = None
        try:
            serial = None
            if self.trust is not None:
                refusal, serial = self.trust.admit(sock)
                if refusal is not None:
                    log.warning("refused %s: %s", peer, refusal)
                    _say_and_close(sock, protocol.notice(refusal))
                    return
            for attempt in range(SESSION_ATTEMPTS):
                try:
                    session = Session(self, sock, peer)
                    break
                except OSError as exc:  # EMFILE for its eventfd
                    out_of_fds = exc.errno in (errno.EMFILE, errno.ENFILE)
                    if out_of_fds and attempt + 1 < SESSION_ATTEMPTS and self.pending.evict_one():
                        time.sleep(0.01)  # its owner frees the descriptor within milliseconds
                        continue
                    self._throttle("descriptors" if out_of_fds else "session",
                                   f"closed {peer[:2]}: cannot start its session: {describe_error(exc)}")
                    return
            assert session is not None
            session.admission = admission
            session.cert_serial = serial
            admission.hand_to(functools.partial(session.conn.abort, EVICTED))
            with self._lock:
                self._sessions.add(session)
            if self._stopping.is_set():
                session.conn.close(protocol.notice(protocol.SHUTDOWN), reason=protocol.SHUTDOWN)
            session.run()
        except Exception:  # one client's bug must not take the server down
            log.exception("unexpected error with %s", peer)
        finally:
            admission.ticket.release()
            if session is not None:
                self.release_session(session)
            sock.close()

    def release_session(self, session: Session) -> None:
        """The session is over for everyone else: free its places before its socket lingers."""
        with self._lock:
            self._sessions.discard(session)
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
    """A connection on its way in: its pending place, and how to ask its socket's owner to close it.

    Ownership moves from the accept loop to a handshake thread to a session thread (or an
    enrollment); :meth:`evict` can come from any thread at any moment. So each new owner calls
    :meth:`hand_to` (which installs its ``stop`` and then checks ``evicted``) while :meth:`evict`
    sets ``evicted`` and then calls the installed ``stop``: whichever comes second acts, and
    ``stop`` may run twice, so it must be idempotent (Handshaker.cancel, Connection.abort are).
    """

    __slots__ = ("peer", "ticket", "_stop", "evicted")

    def __init__(self, peer: tuple) -> None:
        self.peer = peer
        self.ticket: Ticket
        self._stop: Callable[[], None] | None = None
        self.evicted = False

    def hand_to(self, stop: Callable[[], None]) -> None:
        """The socket has a new owner; ``stop()`` asks it, from any thread, to close the connection."""
        self._stop = stop
        if self.evicted:
            stop()

    def evict(self) -> None:
        """The pending pool needs this place: ask the socket's owner to close it (any thread)."""
        self.evicted = True
        stop = self._stop
        if stop is not None:
            stop()


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


def _shut_down(sock: socket.socket | ssl.SSLSocket) -> None:
    """End a blocking read in the socket's owner thread, from any thread: the plain socket's shutdown
    is one syscall on the descriptor and leaves the TLS object alone (which only its owner touches)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already shut down or closed
        pass


def _say_and_close(sock: socket.socket | ssl.SSLSocket, data: bytes) -> None:
    """Send one short message and close, from the thread that owns ``sock``."""
    try:
        sock.settimeout(2)
        if data:
            sock.sendall(data)
        close_gracefully(sock)
    except (OSError, ValueError):
        pass
    finally:
        sock.close()
