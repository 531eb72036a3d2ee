"""One client's life on the server: the nickname, then chat commands (one table), then its departure.

A :class:`Session` speaks the chat protocol in lines, whatever carries them: the line protocol's
handler (:mod:`securechat.server.lines`) feeds it each batch of lines read, and a WebSocket handler
would feed it one text message as one line, through a connection that frames what it sends
(:class:`~securechat.server.room.ChatConn`). Everything it says to others goes through
:class:`~securechat.server.rooms.Rooms`. What it needs from the server that holds it is the
:class:`Host` protocol, so this module does not import the engine.

Where it runs: lines arrive on the connection's loop thread, which must never wait. A chat line
(and ``/me``, ``/help``, ``/cap``, ``/quit``) is handled right there: the room log's ``append`` never
blocks. Everything else may block (a nickname claimed in Redis, history read from SQLite, a
certificate checked) and runs on a worker thread, one at a time per session: lines that arrive
meanwhile wait in order behind it (past :data:`MAX_WAITING`, the connection stops being read), so
a session's commands and lines keep their order, and its state is never touched by two threads at
once; what the connection is sent meanwhile is held until the step is done, so a client hears of a
command only once its effects are in place (``* welcome`` once it is in the room). Its connection is
only ever touched through ``send``/``close``/``abort``, which are thread-safe.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from securechat.server.files import FileService
from securechat.server.forgotten import FORGOTTEN
from securechat.server.pending import PendingPool, Ticket
from securechat.server.room import (
    DEFAULT_ROOM,
    REPLAY_LINES,
    ChatConn,
    Member,
    Room,
    parse_positions,
    parse_rooms,
)
from securechat.server.room import room_error as rooms_error
from securechat.server.rooms import Rooms
from securechat.wire import protocol
from securechat.wire.filexfer import TAG_RE, TICKET_COMMAND, ticket_refused
from securechat.wire.ids import room_key
from securechat.wire.protocol import Command

log = logging.getLogger("securechat.server")


# Lines dropped in a row before a flooder is disconnected.
FLOOD_DISCONNECT = 100

# Nicknames the welcome line names, at most: 100 nicks of up to 24 characters keep it under the line
# bound (protocol.MAX_LINE_BYTES) every client enforces. Beyond, it gives the count: naming everyone
# to each arrival is quadratic (10,000 people: 300 MB of welcome lines); /who names them on request.
WELCOME_NICKS = 100

# Lines waiting behind a command that runs on a worker, past which the connection is not read until
# they are done (TCP then holds the client back): a pasted screenful waits without a pause.
MAX_WAITING = 64

# What waits in a session's queue: a line, a line dropped by flood control, a step run on the loop
# in its turn, a step run on a worker in its turn.
_LINE, _DROPPED, _CALL, _JOB = range(4)


class SessionConn(ChatConn, Protocol):
    """What a session needs of its connection beyond what rooms need (the engine's Transport)."""

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Any: ...

    def offload(self, fn: Callable[..., Any], *args: Any,
                done: Callable[[Any, BaseException | None], None] | None = None) -> None: ...

    def when_written(self, fn: Callable[..., object], *args: Any) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def hold_output(self) -> None: ...

    def release_output(self) -> None: ...


class Admission(Protocol):
    """A connection's place among the unauthenticated (the engine's), and how to give it up."""

    ticket: Ticket

    def evict(self) -> None: ...


class Slot(Protocol):
    """A chatter's place in the server's counts (max_clients, max_per_ip), given back exactly once."""

    def release(self) -> None: ...


class Host(Protocol):
    """What a session needs from the server that holds it (:class:`securechat.server.engine.ChatServer`)."""

    rooms: Rooms
    pending: PendingPool
    login_timeout: float
    flood_rate: float
    flood_burst: float
    files: FileService | None  # shared files (None: --no-files)

    @property
    def stopping(self) -> bool: ...

    def reserved(self, nick: str) -> str | None: ...

    def take_place(self, session: Session) -> str | None: ...

    def give_back_place(self, session: Session) -> None: ...

    def release_session(self, session: Session) -> None: ...


class State(enum.Enum):
    """Where a session is in its life."""

    NICK = "waiting for a nickname"
    CHAT = "chatting"
    CLOSED = "closed"


class Session:
    """One client's life on the server: nick registration, then chat (see the module docstring)."""

    # Thousands of these live at once: no per-instance __dict__.
    __slots__ = ("server", "peer", "nick", "bound_nick", "person", "state", "conn", "bucket", "dropped", "slot",
                 "admission", "joined", "current", "tagged", "token", "quitting", "paged", "held_private",
                 "private_mark", "dropped_at", "replaced", "echo",
                 "cert_serial", "forgotten", "forgotten_token", "_waiting", "_busy", "_held_back", "_login_timer",
                 "nick_since")

    def __init__(self, server: Host, conn: SessionConn, peer: tuple, *, bound_nick: str | None = None) -> None:
        self.server = server
        self.peer = peer
        self.nick = ""
        # With mutual TLS the certificate's CN *is* the nickname: not chosen, not changeable.
        self.bound_nick = bound_nick
        # ... and names a person, whose read positions and offline messages are kept.
        self.person = self.bound_nick or None
        self.state = State.NICK
        self.conn = conn
        now = time.monotonic()
        self.bucket = protocol.TokenBucket(server.flood_rate, server.flood_burst, now)
        self.dropped = 0
        self.slot: Slot | None = None  # the chat place, from the accepted nickname on
        self.admission: Admission | None = None  # the place among the unauthenticated, until then
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
        # Came back after the server forgot its session: room key -> the last id it saw, until it is back there.
        self.forgotten: dict[str, str] | None = None
        self.forgotten_token = ""
        self._waiting: collections.deque[tuple[int, Any]] | None = None  # what waits for its turn
        self._busy = False  # a step of this session runs on a worker
        self._held_back = False  # reading paused: too much waiting
        self._login_timer: Any = None
        self.nick_since = 0.0  # when it took its current nick (wall clock): which private files are its own

    def __repr__(self) -> str:
        return f"<Session {self.nick or '?'} {self.peer} {self.state.name}>"

    # -- the connection's loop thread: what a handler calls ------------------------------

    def start(self) -> None:
        """Greet the client and start the login deadline."""
        self.conn.send(protocol.notice(protocol.GREETING))
        if self.server.login_timeout > 0:
            self._login_timer = self.conn.call_later(self.server.login_timeout, self._queue, _CALL,
                                                     self._login_deadline)

    def on_lines(self, lines: list[bytes]) -> None:
        """Complete lines from the client, in order (flood control counts them as they arrive)."""
        now = time.monotonic()
        for raw in lines:
            self._put(_LINE if self.bucket.allow(now) else _DROPPED, raw)
        self._pump()

    def line_too_long(self) -> None:
        """The client sent a line over the bound: it is put out (it does not wait its turn)."""
        self.quitting = True
        limit = protocol.MAX_LINE_BYTES
        self.conn.close(protocol.notice(f"{protocol.LINE_TOO_LONG} (over {limit} bytes); goodbye"),
                        reason=f"{protocol.LINE_TOO_LONG}: over {limit} bytes")

    def connection_lost(self, why: str) -> None:
        """The connection is over: its places are free at once, its departure waits its turn."""
        self.server.release_session(self)
        self._queue(_JOB, self._ended, why)

    # -- any thread ----------------------------------------------------------------------

    def when_written(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` in this session's turn, on a worker, once everything its connection was sent
        until now has been written to its socket (the inbox's next batch); never, if it ends first."""
        self.conn.when_written(self._queue, _JOB, fn, *args)

    # -- the queue of what waits its turn --------------------------------------------------

    def _put(self, kind: int, *item: Any) -> None:
        if self._waiting is None:
            self._waiting = collections.deque()
        self._waiting.append((kind, item))

    def _queue(self, kind: int, *item: Any) -> None:
        self._put(kind, *item)
        self._pump()

    def _pump(self) -> None:
        """Run what waits, in order, until a step goes to a worker (the loop thread)."""
        waiting = self._waiting
        if waiting is None:
            return
        while waiting and not self._busy:
            kind, item = waiting.popleft()
            if kind == _CALL:
                item[0](*item[1:])
            elif kind == _JOB:
                self._offload(*item)
            elif self.conn.closing:
                continue  # leaving: act on nothing more it said
            elif kind == _DROPPED:
                self._dropped(item[0])
            else:
                self.dropped = 0
                self._line(protocol.decode(item[0]))
        if not self._busy and not waiting:
            self._waiting = None  # idle sessions keep no queue
        if len(waiting) >= MAX_WAITING and not self._held_back:
            self._held_back = True
            self.conn.pause_reading()
        elif self._held_back and len(waiting) < MAX_WAITING // 2:
            self._held_back = False
            self.conn.resume_reading()

    def _offload(self, fn: Callable[..., object], *args: Any) -> None:
        self._busy = True
        self.conn.hold_output()  # its replies go out once it is done (as from a thread of its own)
        self.conn.offload(fn, *args, done=self._done)

    def _done(self, result: object, error: BaseException | None) -> None:
        self._busy = False
        self.conn.release_output()
        if error is not None:  # one client's bug must not take the server down
            log.error("unexpected error with %s", self.peer, exc_info=error)
            self.conn.abort("internal error")
        self._pump()

    def _line(self, text: str) -> None:
        """One line in its turn: a chat line here and now, anything that may block on a worker."""
        # Not sanitised yet: a nickname with a control character in it is refused, not quietly
        # repaired; chat text is sanitised where it is relayed.
        if self.state is State.NICK:
            self._offload(self._login, text.strip())
            return
        parsed = protocol.parse(text)
        if isinstance(parsed, str):
            line = protocol.sanitize(parsed)
            if line.strip():
                self.server.rooms.say(self, line)
            return
        handler = COMMANDS.get(parsed.name)
        if handler is None:
            self.reply(f"unknown command /{protocol.sanitize(parsed.name)}; /help lists commands")
        elif parsed.name in ON_THE_LOOP:
            handler(self, parsed.arg)
        else:
            self._offload(handler, self, parsed.arg)  # unsanitised: each handler sanitises what it relays

    def _dropped(self, raw: bytes) -> None:
        self.dropped += 1
        if self.dropped == 1:
            self.reply(f"slow down: at most {self.server.flood_rate:g} lines a second; lines dropped")
        if self.echo:  # a line the server dropped must never look delivered to its sender
            self.reply(f"{protocol.NOT_DELIVERED} (flood control): {protocol.sanitize(protocol.decode(raw))}")
        if self.dropped >= FLOOD_DISCONNECT:
            self.quitting = True  # put out, not dropped: no session to hold
            self.conn.close(protocol.notice("disconnected for flooding"), reason="disconnected for flooding")
            log.warning("%s %s disconnected for flooding", self.peer, self.nick)

    def _login_deadline(self) -> None:
        if self.state is State.NICK and not self.conn.closing:
            self.conn.close(protocol.notice(f"no nickname within {self.server.login_timeout:g} s; goodbye"),
                            reason="no nickname in time")

    def _stop_login_timer(self) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None

    # -- one step at a time, on a worker (or the loop) ------------------------------------

    def _ended(self, why: str) -> None:
        was_member = self.state is State.CHAT
        self.state = State.CLOSED
        self.server.release_session(self)
        rooms = self.server.rooms
        if self.replaced:
            log.info("%s %s: taken over by a resumed connection", self.peer, self.nick)
            return
        if was_member:
            if self.server.stopping:
                # While the server shuts down everyone leaves at once; nobody needs the roll call.
                rooms.unregister(self, "", quiet=True)
            elif self.quitting or not rooms.held.hold(self, _held_expired):
                rooms.unregister(self, _leave_reason(why))
        log.info("%s %s disconnected: %s", self.peer, self.nick or "(no nick)", why)

    def reply(self, text: str) -> None:
        self.conn.send(protocol.notice(text))

    def _login(self, nick: str) -> None:
        """A nickname line: take a chat place for it; the pending place goes once it is accepted
        (:meth:`_in`), and stays, with its age, while nicknames are refused."""
        server = self.server
        admission = self.admission
        if admission is not None and not admission.ticket.held:
            return  # evicted a moment ago: the abort already asked for ends this connection
        refusal = server.take_place(self)
        if refusal is not None:
            self.conn.close(protocol.notice(refusal), reason=refusal)
            return
        self._register(nick)
        if self.state is not State.CHAT:
            server.give_back_place(self)

    def _in(self) -> None:
        """The nickname (or the resumed session) is accepted: chatting, before anyone is told."""
        self.state = State.CHAT
        self._stop_login_timer()
        if self.admission is not None:
            self.admission.ticket.release()  # False: evicted meanwhile, and the abort ends it

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
        refusal = self.server.rooms.register(self, nick) if error is None else None
        if refusal is not None:  # taken: this person is here already; anything else is said as it is
            error = f"{nick!r} is already connected" if refusal.endswith(" is taken") else refusal
        if error:
            self.conn.close(protocol.notice(f"{protocol.NICK_REFUSED}{error} (your certificate names you "
                                            f"{nick!r}); goodbye"), reason="certificate nick unusable")
            return
        self._welcome(nick, "" if asked == nick else f" (your certificate names you {nick})")

    def _welcome(self, nick: str, aside: str) -> None:
        self._in()
        self.nick_since = time.time()
        self.reply(f"{protocol.WELCOME}{nick}!{aside} {self._online()}. /help lists commands")
        log.info("%s is %s%s", self.peer, nick, " (certificate)" if self.bound_nick else "")
        if self.forgotten is None or self.person:  # under mutual TLS its read positions are kept anyway
            self.server.rooms.enter_default(self)
        else:
            self._back_in(DEFAULT_ROOM, confirm=False)
        if self.forgotten is not None:
            self._lost_privates()

    def _back_in(self, name: str, *, confirm: bool = True) -> None:
        """Join ``name`` again after a forgotten session: only what was said after the last line it saw."""
        rooms = self.server.rooms
        after = self.forgotten.pop(room_key(name), None) if self.forgotten else None
        rooms.join(self, name, after=after, confirm=confirm)
        if after is not None and not rooms.log.stores:
            self.reply(f"history is off on this server: what was said in #{name.lstrip('#')} while you were "
                       "away is lost")

    def _lost_privates(self) -> None:
        """After a forgotten session: the private messages held for it, or exactly what cannot be had."""
        held = FORGOTTEN.take(self.forgotten_token, self.person, time.time())
        if held:
            self.reply(f"{len(held)} private message{'s' if len(held) != 1 else ''} while you were away:")
            for data in held:
                self.conn.send(data)
        elif held is None and not self.server.rooms.offline_messages:
            self.reply("this server did not know your session any more (it restarted, or you were away for over "
                       "an hour): private messages sent to you meanwhile, if any, are lost")

    def _online(self) -> str:
        """``3 online: alice, bob, carol`` for the welcome line; the count alone past :data:`WELCOME_NICKS`."""
        rooms = self.server.rooms
        count = rooms.online()
        if count > WELCOME_NICKS:
            return f"{count} online (/who lists them)"
        nicks = rooms.nicks()
        return f"{len(nicks)} online: {', '.join(nicks)}"

    def _resume(self, arg: str) -> None:
        """``/resume TOKEN ROOM=ID ...``: take back a dropped session within its grace period."""
        token, *positions = arg.split()
        rooms = self.server.rooms
        old = rooms.held.resume(self, token, self.person) if token else None
        if old is None and token and rooms.held.adopt(self, token, self.person):
            # A session from another server sharing these rooms (--redis): back in its rooms, caught up.
            self._in()
            self.nick_since = time.time()
            self.reply(f"{protocol.WELCOME}{self.nick}! (resumed) {self._online()}. /help lists commands")
            log.info("%s resumed %s from another server", self.peer, self.nick)
            rooms.held.rejoin_rooms(self, parse_rooms(positions))
            return
        if old is None:
            # Where it was: once it is back under its nick, it is shown only what it has not seen.
            self.forgotten, self.forgotten_token = parse_positions(positions), token
            self.tagged = True  # a securechat client: the tags keep its place from the first line
            self.reply(f"{protocol.RESUME_REFUSED}unknown or expired session; send your nickname")
            return
        self._in()
        self.tagged, self.token = True, old.token
        self.paged, self.private_mark, self.dropped_at = old.paged, old.private_mark, old.dropped_at
        self.nick_since = getattr(old, "nick_since", time.time())
        self.reply(f"{protocol.WELCOME}{self.nick}! (resumed) {self._online()}. /help lists commands")
        log.info("%s resumed %s", self.peer, self.nick)
        rooms.held.rejoin(self, old, parse_positions(positions))

    # -- commands ------------------------------------------------------------------------

    def cmd_nick(self, arg: str) -> None:
        if self.bound_nick is not None:
            self.reply(f"{protocol.NICK_REFUSED}your nickname is bound to your certificate ({self.bound_nick})")
            return
        error = protocol.nick_error(arg) or self.server.reserved(arg) or self.server.rooms.rename(self, arg)
        if error:
            self.reply(protocol.NICK_REFUSED + error)
        else:
            self.nick_since = time.time()  # files shared with the earlier holder of this nick are not its

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
        if self.forgotten and room_key(name.lstrip("#")) in self.forgotten:
            self._back_in(name)
        else:
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

    def cmd_ticket(self, arg: str) -> None:
        """``/ticket ...``: permission to move one file, on a connection of its own (securechat.server.files)."""
        if self.server.files is None:
            tag = (arg.split() + ["", ""])[1]
            off = "file sharing is off on this server"
            self.reply(ticket_refused(tag, off) if TAG_RE.match(tag) else off)
            return
        self.server.files.command(self, arg)

    def cmd_cap(self, arg: str) -> None:
        if arg.strip().lower() != protocol.CAP_ECHO:
            self.reply(f"{protocol.CAP_REPLY}unknown capability {protocol.sanitize(arg)!r}; known: {protocol.CAP_ECHO}")
            return
        self.echo = True
        self.reply(protocol.cap_reply(protocol.CAP_ECHO, self.server.flood_rate, self.server.flood_burst))


def _held_expired(member: Member) -> None:
    log.info("%s did not come back in time", member.nick)
    if member.token:
        FORGOTTEN.keep(member.token, member.person, list(member.held_private or []), time.time())


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
    TICKET_COMMAND: Session.cmd_ticket,
}

# Commands that cannot block (no storage, no directory): handled on the loop thread, like chat lines.
ON_THE_LOOP = frozenset({"me", "help", "quit", protocol.CAP_COMMAND})


def certificate_nick(cert: dict[str, Any] | None) -> str | None:
    """The commonName of a verified client certificate (``getpeercert()``'s dict), or None without one."""
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
