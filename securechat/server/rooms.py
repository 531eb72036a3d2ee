"""Rooms: who is in which room, and delivery of every room's lines through the room log.

The server's sessions only call :class:`Rooms`; :class:`Rooms` only talks to a
:class:`~securechat.store.roomlog.RoomLog` (where lines get their ids and are kept) and a
:class:`~securechat.store.roomlog.Directory` (who is on the other servers). A line said in a room is
appended to the log; the log hands it back to :meth:`Rooms._deliver`, which formats it once per
form and queues it on each member's bounded outbox. Nobody writes to another client's socket. A member
whose connection dropped is held for its client to resume by :attr:`Rooms.held`
(:mod:`securechat.server.resume`).

Where it runs: chat lines (:meth:`Rooms.say`) on a loop thread, so appending never blocks; everything
that asks the directory or reads the log (a nick claim, a join's count and replay, /who, /rooms, read
positions) on a worker, in the session's turn, and outside the registry lock, so that a slow Redis holds
up nobody else.

What a member sees (see the protocol table in :mod:`securechat.wire.protocol`):

- a line of the room it is typing into (its *current* room) exactly as the seed showed it:
  ``[nick] text``, ``* alice joined``;
- a line of another room it follows, behind the room's name: ``#dev [bob] hi``;
- history (on joining, or ``/history``) as ``(history 09:05) [bob] hi``, missed lines (resuming
  after a dropped connection, or a person's return under mutual TLS) as ``(missed 09:05) ...``,
  each batch followed by ``* now live in #room``;
- with ``/session`` (opt-in; the securechat client sends it) every room line is preceded by a tag
  ``@id=<id>;room=<name> `` so the client knows its last id in each room.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable

from securechat.server.inbox import Inbox
from securechat.server.resume import HeldSessions
from securechat.server.room import (
    ANNOUNCE_LIMIT,
    DEFAULT_ROOM,
    EXCLUDE_SENDER,
    GRACE_SECONDS,
    HELD_PRIVATE_LIMIT,
    MAX_CATCHUP,
    MAX_CATCHUP_LINES,
    MAX_HISTORY_PAGE,
    MAX_JOINED,
    MAX_ROOMS,
    PAUSED,
    PAUSED_WHY,
    REPLAY_BYTES,
    REPLAY_LINES,
    RESUMED,
    UNCHECKED,
    Member,
    Room,
    Schedule,
    conversation,
    live,
    read_stored,
    render,
    replayed,
    room_error,
    thread_timer,
)
from securechat.store.roomlog import Directory, DirectoryUnavailable, Entry, LocalDirectory, LocalLog, RoomLog
from securechat.wire import protocol
from securechat.wire.ids import id_key, room_key

log = logging.getLogger("securechat.rooms")


class Rooms:
    """Every room on this server, the nick registry, and delivery through the room log."""

    def __init__(
        self,
        roomlog: RoomLog | None = None,
        directory: Directory | None = None,
        *,
        announce_limit: int = ANNOUNCE_LIMIT,
        replay: int = REPLAY_LINES,
        offline_messages: bool = False,
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.log: RoomLog = roomlog if roomlog is not None else LocalLog()
        self.directory: Directory = directory if directory is not None else LocalDirectory()
        self.announce_limit = announce_limit
        self.replay = replay
        # Under mutual TLS a name is a person: a /msg to someone offline is kept for them.
        self.offline_messages = offline_messages
        self.inbox = Inbox(self, self._save_marks)
        # The person a nick names, spelled as the CA issued it, or None for nobody (the server's
        # securechat.server.trust, when it knows the CA's names); None here: any nick is a person.
        self.persons: Callable[[str], str | None] | None = None
        self.grace = grace
        self.schedule: Schedule = thread_timer  # grace periods; the engine's is its timer heap, not a thread each
        self._lock = threading.Lock()
        self._nicks: dict[str, Member] = {}  # nick_key -> member (held sessions included)
        self._claiming: set[str] = set()  # nick keys being claimed from the directory (outside the lock)
        self._tokens: dict[str, Member] = {}  # resume token -> its member, connected or held
        self._rooms: dict[str, Room] = {}  # room_key -> room
        self._by_name: dict[str, Room] = {}  # exact display name -> room (the fast path)
        self._started = False
        self.held = HeldSessions(self)  # dropped sessions waiting for their client (securechat.server.resume)

    def start(self) -> None:
        """Connect to the log: from now on its entries are delivered here."""
        if not self._started:
            self._started = True
            self.log.watch(self._paused)
            self.log.start(self._deliver)

    def close(self) -> None:
        """Stop the grace timers and close the log (a graceful close stores everything)."""
        self.held.close()
        self.log.close()

    def _changed(self, member: Member, *also: Room) -> None:
        """``member``'s nick, current room or tags changed: rebuild the delivery lists it is in."""
        for room in {*member.joined, *also}:
            with room.lock:
                room.rebuild()

    def tag(self, member: Member) -> None:
        """``member`` asked for tags (/session) on every room line from now on."""
        member.tagged = True
        self._changed(member)

    # -- nicknames -------------------------------------------------------------------------

    def register(self, member: Member, nick: str) -> str | None:
        """Give ``member`` the name ``nick`` (no room yet); return why not, or None."""
        key = protocol.nick_key(nick)
        dropped = self._nicks.get(key)
        if dropped is not None and member.person and dropped.person == member.person and \
                dropped.held_private is not None:
            # The same person (certificate) is back with a fresh client instead of resuming:
            # the held session is over now, not at the end of its grace period.
            self.held.expire(dropped.token)
        with self._lock:
            holder = self._nicks.get(key)
            if holder is not None and holder.held_private is not None:
                return f"{nick!r} is held for its dropped connection to resume (up to {self.grace:g} s)"
            if holder is not None or key in self._claiming:
                return f"{nick!r} is taken"
            self._claiming.add(key)
        claimed = self._claim(key, nick)
        with self._lock:
            if claimed:
                self._nicks[key] = member
                member.nick = nick
        return None if claimed else UNCHECKED.format(nick=nick) if claimed is None else f"{nick!r} is taken"

    def _claim(self, key: str, nick: str, *, take_over: bool = False) -> bool | None:
        """The directory on ``nick``, asked outside the registry lock: True, False (taken), None (cannot tell)."""
        try:
            return self.directory.take_over(nick) if take_over else self.directory.claim(nick)
        except DirectoryUnavailable:
            return None
        finally:
            with self._lock:
                self._claiming.discard(key)

    def rename(self, member: Member, new: str) -> str | None:
        """Rename ``member`` and tell each of its rooms; return why not, or None."""
        old = member.nick
        key = protocol.nick_key(new)
        changing = protocol.nick_key(old) != key
        with self._lock:
            holder = self._nicks.get(key)
            if (holder is not None and holder is not member) or key in self._claiming:
                return f"{new!r} is taken"
            if changing:
                self._claiming.add(key)
        claimed = self._claim(key, new) if changing else True
        with self._lock:
            if not claimed:
                return UNCHECKED.format(nick=new) if claimed is None else f"{new!r} is taken"
            del self._nicks[protocol.nick_key(old)]
            self._nicks[key] = member
            member.nick = new
        self._changed(member)
        if protocol.nick_key(old) != key:
            self.directory.release(old)
        if member.token:  # a shared directory resumes it on another server under the new nick
            self.directory.remember_session(member.token, new, member.person)
        for room in list(member.joined):
            self.directory.parted(room.name, old)
            self.directory.joined(room.name, new)
            self.log.append(room.name, "notice", "", f"{old} is now {new}")
        return None

    def unregister(self, member: Member, why: str, *, quiet: bool = False) -> None:
        """``member`` is gone for good: leave every room (telling each, unless ``quiet``), free the nick."""
        self._save_marks(member)
        self.inbox.forget(member)
        for room in list(member.joined):
            self._leave_room(member, room, why, quiet=quiet, session=member.token)
        member.current = None
        if self.vacate(member):
            self.directory.release(member.nick)

    def vacate(self, member: Member) -> bool:
        """Free ``member``'s resume token and nick here (not in the directory); True if the nick was its."""
        with self._lock:
            if member.token and self._tokens.get(member.token) is member:
                del self._tokens[member.token]
            key = protocol.nick_key(member.nick)
            if self._nicks.get(key) is not member:
                return False
            del self._nicks[key]
        return True

    def holder(self, token: str) -> Member | None:
        """The member resume token ``token`` names here (connected or held), or None."""
        return self._tokens.get(token)

    def seat(self, member: Member, nick: str, token: str) -> None:
        """``member`` (a resumed connection) takes the place of ``nick`` and ``token`` here."""
        with self._lock:
            member.nick, member.token = nick, token
            self._tokens[token] = member
            self._nicks[protocol.nick_key(nick)] = member

    def take_over(self, member: Member, nick: str, token: str) -> bool:
        """Seat ``member`` as ``nick`` with ``token``, a session taken over from another server through the
        directory (outside the registry lock); False when either is here already or the nick went to someone else."""
        key = protocol.nick_key(nick)
        with self._lock:
            if key in self._nicks or token in self._tokens or key in self._claiming:
                return False  # here already: HeldSessions.resume() is the way back
            self._claiming.add(key)
        taken = self._claim(key, nick, take_over=True)
        with self._lock:
            if not taken:
                return False
            self._nicks[key] = member
            self._tokens[token] = member
            member.nick, member.token = nick, token
        return True

    def find(self, nick: str) -> Member | None:
        """The local member called ``nick`` (held sessions included), or None."""
        return self._nicks.get(protocol.nick_key(nick))

    def online(self) -> int:
        """How many are online here and on the other servers (:meth:`nicks` without the list)."""
        return len(self._nicks) + len(self.directory.everyone())

    def nicks(self) -> list[str]:
        """Everyone online here and on the other servers, sorted."""
        with self._lock:
            here = [m.nick for m in self._nicks.values()]
        return sorted({*here, *self.directory.everyone()}, key=str.casefold)

    # -- rooms -------------------------------------------------------------------------------

    def _room(self, name: str, *, create: bool) -> Room | None:
        room = self._by_name.get(name)
        if room is not None:
            return room
        key = room_key(name)
        with self._lock:
            room = self._rooms.get(key)
            if room is None and create and len(self._rooms) < MAX_ROOMS:
                room = self._rooms[key] = Room(name)
                self._by_name[name] = room
        return room

    def add(self, name: str, member: Member) -> tuple[Room, int] | None:
        """Put ``member`` in room ``name`` (created if need be, None past MAX_ROOMS), catching up.

        Under the registry lock, so a room being emptied at that moment cannot be dropped with
        the newcomer in it (lock order: registry, then room).
        """
        key = room_key(name)
        with self._lock:
            room = self._rooms.get(key)
            if room is None:
                if len(self._rooms) >= MAX_ROOMS:
                    return None
                room = self._rooms[key] = Room(name)
                self._by_name[name] = room
            with room.lock:
                room.add_catching(member)
                return room, len(room.members)

    def drop_if_empty(self, room: Room) -> None:
        """Forget ``room`` if nobody is in it any more (nor joining it)."""
        with self._lock, room.lock:
            if not room.members and not room.catching and self._rooms.get(room.key) is room:
                del self._rooms[room.key]
                self._by_name.pop(room.name, None)

    def enter_default(self, member: Member) -> None:
        """A new arrival: join the default room, or, for a returning person, the rooms it was in
        with what it missed, and its stored private messages."""
        marks = self.log.marks(member.person) if member.person else {}
        rooms = {name: mark for name, mark in marks.items() if not name.startswith("@")}
        if not rooms:
            self.join(member, DEFAULT_ROOM, confirm=False)
        share = max(1, len(rooms))
        for name, mark in rooms.items():
            if room_error(name) is None and len(member.joined) < MAX_JOINED:
                self.join(member, name, after=mark, confirm=False, budget=REPLAY_BYTES // share,
                          max_lines=MAX_CATCHUP_LINES // share)
        if member.person:
            self.inbox.deliver(member, marks.get("@" + member.nick))

    def join(self, member: Member, name: str, *, after: str | None = None, confirm: bool = True,
             budget: int = REPLAY_BYTES, max_lines: int = MAX_CATCHUP_LINES, announce: bool = True) -> None:
        """Join ``name`` (created on first join) and make it the current room; replies to ``member``.

        With ``after`` (an id), the lines after it are replayed as missed instead of the last
        :attr:`replay` lines as history. ``announce=False``: nobody is told (resumed from another server).
        """
        if name.startswith("#"):
            name = name[1:]
        key = room_key(name)
        for followed in member.joined:
            if followed.key == key:
                previous, member.current = member.current, followed
                self._changed(member, *([previous] if previous else []))
                member.conn.send(protocol.notice(f"now talking in #{followed.name}"))
                return
        if len(member.joined) >= MAX_JOINED:
            member.conn.send(protocol.notice(f"you follow {MAX_JOINED} rooms already: /part one first"))
            return
        added = self.add(name, member)
        if added is None:
            member.conn.send(protocol.notice(f"too many rooms on this server ({MAX_ROOMS}); join an existing one"))
            return
        room, count = added
        count += len(self.held.in_room(room)) + len(self.directory.members(room.name))  # as /rooms counts
        previous = member.current
        member.current = room
        member.joined.append(room)
        if previous is not None:
            with previous.lock:
                previous.rebuild()
        self.directory.joined(room.name, member.nick)
        if confirm:  # not at login: the welcome line says it
            member.conn.send(protocol.notice(f"you joined #{room.name} ({count} here); now talking in #{room.name}"))
        # Read before telling the room: the replay ends with what was said before this arrival.
        if after is None:  # what people said (room.conversation), however many came and went since
            entries, oldest = conversation(functools.partial(read_stored, self.log, room.name, before=True), None,
                                           self.replay)
            if oldest:
                member.paged[room.key] = oldest  # /history goes on from there
        else:
            entries = self.missed(member, room, after)
        if announce and (not self.announce_limit or count <= self.announce_limit):
            self.log.append(room.name, "join", member.nick, "")
        self.catch_up(member, room, entries, "history" if after is None else "missed", budget, max_lines)

    def missed(self, member: Member, room: Room, after: str | None) -> list[Entry]:
        """What ``member`` missed in ``room`` after id ``after`` (not its own lines), oldest first.

        Beyond :data:`MAX_CATCHUP` lines, the newest ones: a gap before the live lines would be
        worse than one further back, which /history can page through.
        """
        entries = read_stored(self.log, room.name, after, MAX_CATCHUP, before=False)
        if len(entries) >= MAX_CATCHUP:
            entries = read_stored(self.log, room.name, None, MAX_CATCHUP, before=True)
            if entries:
                member.paged[room.key] = entries[0].id
        return [e for e in entries if e.sender != member.nick]

    def catch_up(self, member: Member, room: Room, entries: list[Entry], how: str,
                  budget: int = REPLAY_BYTES, max_lines: int = MAX_CATCHUP_LINES) -> None:
        """Send ``entries`` as history or missed lines, then the live lines that arrived meanwhile.

        At most ``budget`` bytes of them, the newest: they arrive in the member's outbox all at
        once, and overflowing it would cut the member off.
        """
        now = time.time()
        send = member.conn.send
        skipped = max(0, len(entries) - max_lines)
        entries = entries[skipped:]
        lines = [replayed(member, entry, how, now) for entry in entries]
        if sum(map(len, lines)) > budget:
            keep = 0
            for data in reversed(lines):
                budget -= len(data)
                if budget < 0:
                    break
                keep += 1
            skipped += len(lines) - keep
            lines, entries = lines[len(lines) - keep:], entries[len(lines) - keep:]
        if skipped and entries:
            member.paged[room.key] = entries[0].id
        if entries or skipped:
            plural = "s" if len(entries) != 1 else ""
            more = f" ({skipped} earlier not shown: /history pages back)" if skipped else ""
            send(protocol.notice(f"history of #{room.name}: {len(entries)} line{plural}{more}" if how == "history"
                                 else f"missed in #{room.name}: {len(entries)} line{plural}{more}"))
            for data in lines:
                send(data)
        with room.lock:
            waiting = room.catching.pop(member, [])
            room.settle(member)
            if entries:
                send(protocol.notice(f"now live in #{room.name}"))
            last = id_key(entries[-1].id) if entries else None
            for entry in waiting:
                if last is None or id_key(entry.id) > last:
                    if entry.kind in EXCLUDE_SENDER and entry.sender == member.nick:
                        continue
                    send(live(member, room, entry))
            if room.last_id is None and entries:
                room.last_id = entries[-1].id

    def part(self, member: Member, name: str) -> None:
        """Leave ``name`` (the current room when empty); replies to ``member``."""
        if name.startswith("#"):
            name = name[1:]
        target = member.current if not name else next((r for r in member.joined if r.key == room_key(name)), None)
        if target is None:
            member.conn.send(protocol.notice(f"you are not in #{protocol.sanitize(name)}" if name
                                             else "you are in no room"))
            return
        self._leave_room(member, target, "")
        member.conn.send(protocol.notice(f"you left #{target.name}"))
        if member.current is not None:
            member.conn.send(protocol.notice(f"now talking in #{member.current.name}"))

    def _leave_room(self, member: Member, room: Room, why: str, *, quiet: bool = False, session: str = "") -> None:
        with room.lock:
            announcing = not self.announce_limit or len(room.members) <= self.announce_limit
            room.remove(member)
        if room in member.joined:
            member.joined.remove(room)
        member.paged.pop(room.key, None)
        if member.current is room:
            member.current = member.joined[-1] if member.joined else None
            if member.current is not None:
                self._changed(member)
        self.directory.parted(room.name, member.nick)
        if not quiet and (why or announcing):  # ``session``: unless it was resumed on another server meanwhile
            self.log.append(room.name, "part", member.nick, why, session=session)
        self.drop_if_empty(room)

    def rooms(self) -> list[tuple[str, int]]:
        """Every room with people in it, here and on the other servers: (name, members), by name."""
        held = self.held.counts()
        with self._lock:
            counts = {room.name: len(room.members) + held[room] for room in self._rooms.values()}
        for name, n in self.directory.rooms().items():
            counts[name] = counts.get(name, 0) + n
        return sorted(((n, c) for n, c in counts.items() if c), key=lambda item: item[0].casefold())

    def who(self, name: str) -> list[str] | None:
        """The members of room ``name`` everywhere, sorted; None when there is no such room here."""
        name = name.removeprefix("#")
        room = self._room(name, create=False)
        here = [m.nick for m in (*room.members, *self.held.in_room(room))] if room is not None else []
        there = self.directory.members(name)
        if room is None and not there:
            return None
        return sorted({*here, *there}, key=str.casefold)

    def _paused(self, paused: bool) -> None:
        """The shared log cannot reach its storage for a while now (or can again): tell everyone here why."""
        for member in [m for m in list(self._nicks.values()) if m.held_private is None]:
            member.conn.send(protocol.notice(PAUSED if paused else RESUMED))

    # -- saying things ---------------------------------------------------------------------

    def say(self, member: Member, text: str, kind: str = "chat") -> None:
        """A chat line (or ``/me`` action) in the member's current room."""
        room = member.current
        if room is None:
            member.conn.send(protocol.notice("you are in no room: /join NAME"))
            return
        if not self.log.append(room.name, kind, member.nick, text):
            member.conn.send(protocol.notice(f"{protocol.NOT_DELIVERED} ({PAUSED_WHY}): {text}"))

    def private(self, member: Member, target_nick: str, text: str) -> str | None:
        """A private message; return why it cannot be sent, or None."""
        target = self.find(target_nick)
        if target is not None:
            name, store = target.nick, False
        elif self.directory.online(target_nick):
            name, store = target_nick, False
        elif self.offline_messages and protocol.nick_error(target_nick) is None:
            person = self.persons(target_nick) if self.persons is not None else target_nick
            if person is None:
                return f"no such nick: {protocol.sanitize(target_nick)}"
            refusal = self.inbox.refusal(member.nick, person)
            if refusal is not None:
                return refusal
            name, store = person, True
            member.conn.send(protocol.notice(f"{person} is offline: kept for their next login"))
        else:
            return f"no such nick: {protocol.sanitize(target_nick)}"
        if not self.log.append("@" + name, "private", member.nick, text, name, store=store):
            return f"{protocol.NOT_DELIVERED} ({PAUSED_WHY}): {text}"
        if member.echo and protocol.nick_key(name) != protocol.nick_key(member.nick):
            member.conn.send(protocol.private(member.nick, name, text))
        return None

    def history(self, member: Member, count: int) -> None:
        """Page back through the current room: ``count`` lines before the oldest one already shown."""
        room = member.current
        if room is None:
            member.conn.send(protocol.notice("you are in no room: /join NAME"))
            return
        if not self.log.stores:
            member.conn.send(protocol.notice("history is off on this server"))
            return
        entries, oldest = conversation(functools.partial(read_stored, self.log, room.name, before=True),
                                       member.paged.get(room.key), min(count, MAX_HISTORY_PAGE))
        if oldest:
            member.paged[room.key] = oldest
        if not entries:
            member.conn.send(protocol.notice(f"no earlier lines in #{room.name}"))
            return
        now = time.time()
        member.conn.send(protocol.notice(f"history of #{room.name}: {len(entries)} earlier "
                                         f"line{'s' if len(entries) != 1 else ''}"))
        for entry in entries:
            member.conn.send(replayed(member, entry, "history", now))
        member.conn.send(protocol.notice(f"end of history; now live in #{room.name}"))

    # -- delivery (the log's callback) -----------------------------------------------------

    def _deliver(self, entry: Entry) -> None:
        """Queue ``entry`` for every member of its room. Runs on the log's thread; never blocks."""
        name = entry.room
        if name[:1] == "@":
            self._deliver_private(entry)
            return
        room = self._by_name.get(name)
        if room is None:
            room = self._rooms.get(room_key(name))
            if room is None:
                return
        exclude = entry.sender if entry.kind in EXCLUDE_SENDER else None
        if exclude is not None:
            sender = self._nicks.get(protocol.nick_key(exclude))
            if sender is not None and sender.echo and entry.kind != "join":
                exclude = None  # "/cap echo": the sender sees its line exactly as the others do (never its join)
        here = protocol.encode(render(entry))
        there: bytes | None = None
        with room.lock:
            room.last_id = entry.id
            for loop, targets in room.fast.items():  # one hand-off per loop thread, whatever its members
                loop.fanout(here, targets, exclude)
            if not room.slow:
                return
            catching = room.catching
            for member in room.slow:
                if member.nick == exclude:
                    continue
                if member in catching:
                    catching[member].append(entry)
                elif member.tagged:
                    member.conn.send(live(member, room, entry))
                elif member.current is room:
                    member.conn.send(here)
                else:
                    if there is None:
                        there = protocol.encode(f"#{room.name} {render(entry)}")
                    member.conn.send(there)

    def _deliver_private(self, entry: Entry) -> None:
        target = self._nicks.get(protocol.nick_key(entry.target))
        if target is None:
            return
        data = protocol.encode(render(entry))
        held = target.held_private
        if held is not None:  # dropped, in its grace period: kept for the resume
            if len(held) < HELD_PRIVATE_LIMIT:
                held.append(data)
            return
        target.conn.send(data)

    # -- read positions and dropped connections (held: securechat.server.resume) -----------

    def _save_marks(self, member: Member) -> None:
        """Under mutual TLS: remember where the person is in each of its rooms."""
        if not member.person or not self.log.stores:
            return
        marks = {room.name: room.last_id or "0-0" for room in member.joined}
        if member.private_mark:
            marks["@" + member.nick] = member.private_mark
        else:
            previous = self.log.marks(member.person).get("@" + member.nick)
            if previous:
                marks["@" + member.nick] = previous
        try:
            self.log.set_marks(member.person, marks)
        except Exception as exc:
            log.error("cannot keep the read positions of %s: %s", member.person, exc)

    def new_token(self, member: Member) -> str:
        """Give ``member`` a resume token (once): unguessable, and nothing else."""
        with self._lock:
            if not member.token:
                member.token = secrets.token_urlsafe(18)
                self._tokens[member.token] = member
        self.directory.remember_session(member.token, member.nick, member.person)
        return member.token

    def detach(self, member: Member) -> None:
        """Stop delivering to ``member`` but keep its nick and rooms (its lines stay in the log)."""
        self._save_marks(member)
        self.inbox.forget(member)
        member.dropped_at = {room.key: room.last_id for room in member.joined}
        member.held_private = []
        for room in member.joined:
            with room.lock:
                room.remove(member)
