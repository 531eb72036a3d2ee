"""The chat server: one thread per client, each the sole owner of its connection.

The accept loop only accepts: it never reads, writes or handshakes. A TLS connection's handshake
runs non-blocking, under a deadline, in one of a few handshake threads (:mod:`securechat.handshake`),
so a client that connects and never speaks delays nobody and costs no thread; once the handshake is
done the connection gets a thread of its own, which registers a nick and then drives its
:class:`~securechat.conn.Connection`. Until its nickname is accepted a connection holds a place in
the bounded pool of unauthenticated connections (:mod:`securechat.pending`), not a chat place: the
oldest of the busiest address makes room for the newest, so silent sockets cannot lock anyone out.
A chat line is formatted once and handed to every other member's bounded outbox by
:class:`~securechat.rooms.Rooms` (through the room log, which gives it an id and stores it after
delivery); the sender never writes to another client's socket and never waits for one.

The command line (``securechat serve``) is :mod:`securechat.serve`.
"""

from __future__ import annotations

import _thread
import enum
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
from typing import TYPE_CHECKING, cast

from securechat import DEFAULT_HOST, DEFAULT_PORT, addr, protocol
from securechat.conn import OUTBOX_LIMIT, Connection, Waker, close_gracefully, describe_error, tune_socket
from securechat.console import announce
from securechat.handshake import Handshaker
from securechat.pending import MAX_PENDING, MAX_PENDING_PER_ADDRESS, PendingPool, Throttle, Ticket, address_key
from securechat.protocol import Command
from securechat.roomlog import Directory, RoomLog, room_key
from securechat.rooms import (
    ANNOUNCE_LIMIT,
    DEFAULT_ROOM,
    GRACE_SECONDS,
    REPLAY_LINES,
    Room,
    Rooms,
    parse_positions,
    parse_rooms,
)
from securechat.rooms import room_error as rooms_error

if TYPE_CHECKING:
    from securechat.enroll import Authority

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
# Lines dropped in a row before a flooder is disconnected.
FLOOD_DISCONNECT = 100

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


class State(enum.Enum):
    """Where a session is in its life."""

    NICK = "waiting for a nickname"
    CHAT = "chatting"
    CLOSED = "closed"


class Session:
    """One client's life on the server: nick registration, then chat. Runs in its own thread."""

    # Thousands of these live at once: no per-instance __dict__.
    __slots__ = ("server", "peer", "nick", "bound_nick", "person", "state", "conn", "bucket", "dropped", "slot",
                 "admission", "joined", "current", "tagged", "token", "quitting", "paged", "held_private",
                 "private_mark", "dropped_at", "replaced", "echo",
                 "cert_serial")

    def __init__(self, server: ChatServer, sock: socket.socket | ssl.SSLSocket, peer: tuple) -> None:
        self.server = server
        self.peer = peer
        self.nick = ""
        # With mutual TLS the certificate's CN *is* the nickname: not chosen, not changeable.
        self.bound_nick = certificate_nick(sock)
        # ... and names a person, whose read positions and offline messages are kept.
        self.person = self.bound_nick or None
        self.state = State.NICK
        self.conn = Connection(
            sock,
            self._on_lines,
            outbox_limit=server.outbox_limit,
            on_tick=self._on_tick,
            on_too_long=self._on_too_long,
        )
        now = time.monotonic()
        self.conn.deadline = now + server.login_timeout if server.login_timeout > 0 else None
        self.bucket = protocol.TokenBucket(server.flood_rate, server.flood_burst, now)
        self.dropped = 0
        self.slot: _Slot | None = None  # the chat place, from the accepted nickname on
        self.admission: _Admission | None = None  # the place among the unauthenticated, until then
        self.echo = False  # "/cap echo": copy this client its own lines as relayed (protocol.CAP_ECHO)
        self.joined: list[Room] = []
        self.current: Room | None = None
        self.tagged = False  # "@id=...;room=... " in front of room lines (/session)
        self.token = ""  # resume token, once asked for
        self.quitting = False  # left with /quit, or put out by the server: nothing to hold
        self.paged: dict[str, str] = {}  # room key -> oldest id /history has shown
        self.held_private: list[bytes] | None = None  # private lines that came while dropped
        self.private_mark: str | None = None  # newest stored private message given
        self.dropped_at: dict[str, str | None] = {}  # room key -> last id when the connection dropped
        self.replaced = False  # a resumed connection took over this session
        self.cert_serial: int | None = None  # the client certificate's, watched for revocation

    def __repr__(self) -> str:
        return f"<Session {self.nick or '?'} {self.peer} {self.state.name}>"

    # -- owner thread --------------------------------------------------------------------

    def run(self) -> None:
        self.conn.send(protocol.notice(protocol.GREETING))
        self.conn.run(on_end=self._ended)

    def _ended(self, why: str) -> None:
        was_member = self.state is State.CHAT
        self.state = State.CLOSED
        self.server._release_session(self)
        rooms = self.server.rooms
        if self.replaced:
            log.info("%s %s: taken over by a resumed connection", self.peer, self.nick)
            return
        if was_member:
            if self.server.stopping:
                # While the server shuts down everyone leaves at once; nobody needs the roll call.
                rooms.unregister(self, "", quiet=True)
            elif self.quitting or not rooms.hold(self, _held_expired):
                rooms.unregister(self, _leave_reason(why))
        log.info("%s %s disconnected: %s", self.peer, self.nick or "(no nick)", why)

    def reply(self, text: str) -> None:
        self.conn.send(protocol.notice(text))

    def _on_lines(self, lines: list[bytes]) -> None:
        now = time.monotonic()
        for raw in lines:
            if self.conn.closing:
                return
            if not self.bucket.allow(now):
                self.dropped += 1
                if self.dropped == 1:
                    self.reply(f"slow down: at most {self.server.flood_rate:g} lines a second; lines dropped")
                if self.echo:  # a line the server dropped must never look delivered to its sender
                    self.reply(f"{protocol.NOT_DELIVERED} (flood control): {protocol.sanitize(protocol.decode(raw))}")
                if self.dropped >= FLOOD_DISCONNECT:
                    self.quitting = True  # put out, not dropped: no session to hold
                    self.conn.close(protocol.notice("disconnected for flooding"), reason="disconnected for flooding")
                    log.warning("%s %s disconnected for flooding", self.peer, self.nick)
                continue
            self.dropped = 0
            # Not sanitised yet: a nickname with a control character in it is refused, not
            # quietly repaired; chat text is sanitised where it is relayed.
            text = protocol.decode(raw)
            if self.state is State.NICK:
                self._login(text.strip())
            else:
                self._chat(text)

    def _login(self, nick: str) -> None:
        """A nickname line: trade the pending place for a chat place, or go back among the pending."""
        server = self.server
        admission = self.admission
        if admission is not None and not admission.ticket.release():
            return  # evicted a moment ago: the abort already asked for ends this connection
        refusal = server._take_place(self)
        if refusal is None:
            self._register(nick)
            if self.state is State.CHAT:
                return
            server._give_back_place(self)
        if refusal is not None:
            self.conn.close(protocol.notice(refusal), reason=refusal)
        elif admission is not None and not self.conn.closing:
            admission.ticket = server.pending.admit(admission.ticket.address, admission.evict)

    def _register(self, nick: str) -> None:
        parsed = protocol.parse(nick)
        if isinstance(parsed, Command) and parsed.name == "quit":
            self.cmd_quit("")
            return
        if isinstance(parsed, Command) and parsed.name == "resume":
            self._resume(parsed.arg)
            return
        if self.bound_nick is not None:
            return self._register_bound(nick, self.bound_nick)
        error = protocol.nick_error(nick) or self.server.reserved(nick) or self.server.rooms.register(self, nick)
        if error:
            self.reply(protocol.NICK_REFUSED + error + "; send another")
            return
        self._welcome(nick, "")

    def _register_bound(self, asked: str, nick: str) -> None:
        """Join under the certificate's name, whatever nick line was sent."""
        error = protocol.nick_error(nick)
        if error is None and self.server.rooms.register(self, nick) is not None:
            error = f"{nick!r} is already connected"
        if error:
            self.conn.close(protocol.notice(f"{protocol.NICK_REFUSED}{error} (your certificate names you "
                                            f"{nick!r}); goodbye"), reason="certificate nick unusable")
            return
        self._welcome(nick, "" if asked == nick else f" (your certificate names you {nick})")

    def _welcome(self, nick: str, aside: str) -> None:
        self.state = State.CHAT
        self.conn.deadline = None
        nicks = self.server.rooms.nicks()
        self.reply(f"{protocol.WELCOME}{nick}!{aside} {len(nicks)} online: {', '.join(nicks)}. "
                   "/help lists commands")
        log.info("%s is %s%s", self.peer, nick, " (certificate)" if self.bound_nick else "")
        self.server.rooms.enter_default(self)

    def _resume(self, arg: str) -> None:
        """``/resume TOKEN ROOM=ID ...``: take back a dropped session within its grace period."""
        token, *positions = arg.split()
        rooms = self.server.rooms
        old = rooms.resume(self, token, self.person) if token else None
        if old is None and token and rooms.adopt(self, token, self.person):
            # A session from another server sharing these rooms (--redis): back in its rooms, caught up.
            self.state = State.CHAT
            self.conn.deadline = None
            nicks = rooms.nicks()
            self.reply(f"{protocol.WELCOME}{self.nick}! (resumed) {len(nicks)} online: {', '.join(nicks)}. "
                       "/help lists commands")
            log.info("%s resumed %s from another server", self.peer, self.nick)
            rooms.rejoin_rooms(self, parse_rooms(positions))
            return
        if old is None:
            self.reply(f"{protocol.RESUME_REFUSED}unknown or expired session; send your nickname")
            return
        self.state = State.CHAT
        self.conn.deadline = None
        self.tagged, self.token = True, old.token
        self.paged, self.private_mark, self.dropped_at = old.paged, old.private_mark, old.dropped_at
        nicks = rooms.nicks()
        self.reply(f"{protocol.WELCOME}{self.nick}! (resumed) {len(nicks)} online: {', '.join(nicks)}. "
                   "/help lists commands")
        log.info("%s resumed %s", self.peer, self.nick)
        rooms.rejoin(self, old, parse_positions(positions))

    def _chat(self, text: str) -> None:
        parsed = protocol.parse(text)
        if isinstance(parsed, str):
            line = protocol.sanitize(parsed)
            if line.strip():
                self.server.rooms.say(self, line)
            return
        handler = COMMANDS.get(parsed.name)
        if handler is None:
            self.reply(f"unknown command /{protocol.sanitize(parsed.name)}; /help lists commands")
        else:
            handler(self, parsed.arg)  # unsanitised: each handler sanitises what it relays

    def _on_tick(self, now: float) -> None:
        if self.state is State.NICK:
            self.conn.deadline = None
            self.conn.close(protocol.notice(f"no nickname within {self.server.login_timeout:g} s; goodbye"),
                            reason="no nickname in time")

    def _on_too_long(self) -> None:
        self.quitting = True
        limit = protocol.MAX_LINE_BYTES
        self.conn.close(protocol.notice(f"{protocol.LINE_TOO_LONG} (over {limit} bytes); goodbye"),
                        reason=f"{protocol.LINE_TOO_LONG}: over {limit} bytes")

    # -- commands ------------------------------------------------------------------------

    def cmd_nick(self, arg: str) -> None:
        if self.bound_nick is not None:
            self.reply(f"{protocol.NICK_REFUSED}your nickname is bound to your certificate ({self.bound_nick})")
            return
        error = protocol.nick_error(arg) or self.server.reserved(arg) or self.server.rooms.rename(self, arg)
        if error:
            self.reply(protocol.NICK_REFUSED + error)

    def cmd_who(self, arg: str) -> None:
        name = arg.strip() or (self.current.name if self.current else "")
        if not name:
            self.reply("you are in no room: /who NAME, or /join NAME")
            return
        nicks = self.server.rooms.who(name) if rooms_error(name) is None else None
        if nicks is None:
            self.reply(f"no room #{protocol.sanitize(name.lstrip('#'))}")
        elif room_key(name) == room_key(DEFAULT_ROOM):  # the seed's one-room answer, unchanged
            self.reply(f"{len(nicks)} online: {', '.join(nicks)}")
        else:
            self.reply(f"{len(nicks)} in #{name.lstrip('#')}: {', '.join(nicks)}")

    def cmd_join(self, arg: str) -> None:
        name = arg.strip()
        if not name:
            where = ", ".join(f"#{r.name}" for r in self.joined) or "no room"
            self.reply(f"you are in {where}" + (f"; talking in #{self.current.name}" if self.current else "")
                       + "; /join NAME joins or switches")
            return
        error = rooms_error(name)
        if error:
            self.reply(error)
            return
        self.server.rooms.join(self, name)

    def cmd_part(self, arg: str) -> None:
        name = arg.strip()
        error = rooms_error(name) if name else None
        if error:
            self.reply(error)
            return
        self.server.rooms.part(self, name)

    def cmd_rooms(self, arg: str) -> None:
        listing = self.server.rooms.rooms()
        self.reply(f"{len(listing)} room{'s' if len(listing) != 1 else ''}: "
                   + ", ".join(f"#{name} ({count})" for name, count in listing))

    def cmd_history(self, arg: str) -> None:
        word = arg.split()[0] if arg.split() else ""
        if word and not (word.isascii() and word.isdigit() and int(word) > 0):
            self.reply("usage: /history [N] (N lines further back)")
            return
        self.server.rooms.history(self, int(word) if word else REPLAY_LINES)

    def cmd_session(self, arg: str) -> None:
        """Opt in to ids on room lines and to resuming after a dropped connection."""
        self.server.rooms.tag(self)
        token = self.server.rooms.new_token(self)
        self.reply(f"{protocol.SESSION}{token} {self.server.rooms.grace:g}")

    def cmd_msg(self, arg: str) -> None:
        target_nick, _, text = arg.partition(" ")
        if not target_nick or not text.strip():
            self.reply("usage: /msg NICK text")
            return
        error = self.server.rooms.private(self, target_nick, protocol.sanitize(text))
        if error:
            self.reply(error)

    def cmd_me(self, arg: str) -> None:
        action = protocol.sanitize(arg).strip()
        if action:
            self.server.rooms.say(self, action, "action")

    def cmd_help(self, arg: str) -> None:
        self.reply(protocol.HELP_TEXT)

    def cmd_quit(self, arg: str) -> None:
        self.quitting = True
        self.conn.close(protocol.notice("goodbye"))

    def cmd_cap(self, arg: str) -> None:
        if arg.strip().lower() != protocol.CAP_ECHO:
            self.reply(f"{protocol.CAP_REPLY}unknown capability {protocol.sanitize(arg)!r}; known: {protocol.CAP_ECHO}")
            return
        self.echo = True
        self.reply(protocol.cap_reply(protocol.CAP_ECHO, self.server.flood_rate, self.server.flood_burst))



def _held_expired(member: object) -> None:
    log.info("%s did not come back in time", getattr(member, "nick", "?"))


# Command name (without the slash) -> handler: the whole command set, in one table.
COMMANDS: dict[str, Callable[[Session, str], None]] = {
    "nick": Session.cmd_nick,
    "who": Session.cmd_who,
    "join": Session.cmd_join,
    "part": Session.cmd_part,
    "rooms": Session.cmd_rooms,
    "history": Session.cmd_history,
    "session": Session.cmd_session,
    "msg": Session.cmd_msg,
    "me": Session.cmd_me,
    "help": Session.cmd_help,
    "quit": Session.cmd_quit,
    protocol.CAP_COMMAND: Session.cmd_cap,
}


def certificate_nick(sock: socket.socket | ssl.SSLSocket) -> str | None:
    """The commonName of a verified client certificate, or None without one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    if not cert:
        return None
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""  # a certificate without a CN: nick_error refuses the empty name


def _leave_reason(why: str) -> str:
    """How a departure is worded for the others."""
    if why in ("closed", "closed by peer"):
        return ""
    if why.startswith("not reading"):
        return "disconnected: not reading its messages"
    return why


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
        # Invites, renewals and the revocation denylist (securechat.enroll), when the CA is at hand.
        self.authority = authority
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        self._chatters = 0  # sessions holding a chat place (a _Slot): what max_clients bounds
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
        return self.authority.reserved(nick) if self.authority is not None else None

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
        admission = _Admission(peer)
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
        assert isinstance(admission, _Admission)
        admission.ticket.release()

    def _plaintext_on_tls_port(self, raw: socket.socket, peer: tuple, admission: object) -> None:
        assert isinstance(admission, _Admission)
        admission.ticket.release()
        notice = (f"{protocol.TLS_REQUIRED}: connect with 'securechat connect HOST' "
                  f"or 'openssl s_client -connect HOST:{self.address[1]}'")
        self._refuse(raw, peer, notice)

    def _handshake_done(self, sock: ssl.SSLSocket, peer: tuple, admission: object) -> None:
        assert isinstance(admission, _Admission)
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

    def _run_enroll(self, sock: ssl.SSLSocket, peer: tuple, admission: _Admission) -> None:
        """An enrollment exchange (securechat.enroll): unauthenticated from start to end, so it holds its
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

    def _run_session(self, sock: socket.socket | ssl.SSLSocket, peer: tuple, admission: _Admission) -> None:
        session = None
        try:
            serial = None
            if self.authority is not None:
                refusal, serial = self.authority.admit(sock)
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
                self._release_session(session)
            sock.close()

    def _release_session(self, session: Session) -> None:
        """The session is over for everyone else: free its places before its socket lingers."""
        with self._lock:
            self._sessions.discard(session)
        if session.admission is not None:
            session.admission.ticket.release()
        self._give_back_place(session)

    def _refusal(self, ip: str) -> str | None:
        """Why a connection from ``ip`` may not take a chat place now (caller holds the lock)."""
        if self._chatters >= self.max_clients:
            return f"{protocol.SERVER_FULL} ({self.max_clients} clients); try again later"
        if self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip:
            return f"too many connections from {ip} (at most {self.max_per_ip}); try again later"
        return None

    def _take_place(self, session: Session) -> str | None:
        """Give ``session`` a chat place (counted by max_clients and max_per_ip); or say why not."""
        ip = address_key(str(session.peer[0]))
        with self._lock:
            refusal = self._refusal(ip)
            if refusal is None:
                self._chatters += 1
                self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
                session.slot = _Slot(self, ip)
        return refusal

    def _give_back_place(self, session: Session) -> None:
        slot, session.slot = session.slot, None
        if slot is not None:
            slot.release()


class _Admission:
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


class _Slot:
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
