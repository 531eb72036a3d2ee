"""Dropped sessions held for their client: holding, expiry, resuming here, adopting one from another server.

A member that asked for a resume token (``/session``) and whose connection drops is *held* for the
grace period (:meth:`HeldSessions.hold`): it leaves the rooms' delivery lists but not the rooms, keeps
its nick, and its private lines wait for it. A client that comes back with the token in time *resumes*
it (:meth:`HeldSessions.resume`, then :meth:`HeldSessions.rejoin`: what it missed in each room, after
the ids it names); if none does, the member leaves for good when the grace period ends, announced once
(:meth:`HeldSessions.expire`). With a shared back-end (``--redis``), a token another server gave is
*adopted* here (:meth:`HeldSessions.adopt`): the nick is taken over in the directory in one step, and
the person rejoins its rooms quietly, since moving to another server is neither a leave nor a join.

Everything here may block (the directory and the log are Redis or SQLite round trips): it runs in a
session's turn on a worker, or on a worker when a grace timer (``Rooms.schedule``) fires; never on a
loop thread, and never under the rooms' registry lock. Holding, expiring and resuming go one at a time
(:attr:`HeldSessions.lock`), so a session is resumed or expired, never both.
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol

from securechat.server.room import (
    DEFAULT_ROOM,
    MAX_CATCHUP_LINES,
    MAX_JOINED,
    REPLAY_BYTES,
    Cancellable,
    Member,
    Room,
    Schedule,
)
from securechat.store.roomlog import Directory, Entry, RoomLog


class Registry(Protocol):
    """What holding and resuming need of :class:`~securechat.server.rooms.Rooms`."""

    log: RoomLog
    directory: Directory
    grace: float
    schedule: Schedule

    def holder(self, token: str) -> Member | None: ...

    def seat(self, member: Member, nick: str, token: str) -> None: ...

    def vacate(self, member: Member) -> bool: ...

    def take_over(self, member: Member, nick: str, token: str) -> bool: ...

    def detach(self, member: Member) -> None: ...

    def add(self, name: str, member: Member) -> tuple[Room, int] | None: ...

    def missed(self, member: Member, room: Room, after: str | None) -> list[Entry]: ...

    def catch_up(self, member: Member, room: Room, entries: list[Entry], how: str, budget: int = REPLAY_BYTES,
                 max_lines: int = MAX_CATCHUP_LINES) -> None: ...

    def drop_if_empty(self, room: Room) -> None: ...

    def tag(self, member: Member) -> None: ...

    def join(self, member: Member, name: str, *, after: str | None = None, confirm: bool = True,
             budget: int = REPLAY_BYTES, max_lines: int = MAX_CATCHUP_LINES, announce: bool = True) -> None: ...


class Expiry(Protocol):
    """Called when a held session's grace period ran out."""

    def __call__(self, member: Member) -> None: ...


class Held:
    """A dropped session waiting for its client to resume it."""

    __slots__ = ("member", "timer", "on_expiry")

    def __init__(self, member: Member, timer: Cancellable, on_expiry: Expiry) -> None:
        self.member = member
        self.timer = timer
        self.on_expiry = on_expiry


class HeldSessions:
    """The dropped sessions of one server's rooms, and the ways back into them (see the module docstring)."""

    def __init__(self, rooms: Registry) -> None:
        self.rooms = rooms
        self.lock = threading.Lock()  # holding, expiring and resuming one at a time; guards _held
        self._held: dict[str, Held] = {}  # resume token -> a dropped session waiting for its client

    def close(self) -> None:
        """Stop the grace timers (the server is stopping)."""
        with self.lock:
            held = list(self._held.values())
            self._held.clear()
        for h in held:
            h.timer.cancel()

    def in_room(self, room: Room) -> list[Member]:
        """The held members of ``room``: still in it, as the other servers count them."""
        return [h.member for h in list(self._held.values()) if room in h.member.joined]

    def counts(self) -> collections.Counter[Room]:
        """How many held members each room has."""
        return collections.Counter(room for h in list(self._held.values()) for room in list(h.member.joined))

    def hold(self, member: Member, on_expiry: Expiry) -> bool:
        """``member``'s connection dropped: keep its nick and rooms for the rooms' grace period.

        Only a member that asked for a token (/session) is held. It leaves the rooms' delivery
        (its lines are read back from the log on resume) but not the rooms, and nobody is told
        anything unless the grace period runs out. False when it is not held (then unregister it).
        """
        rooms = self.rooms
        with self.lock:
            if member.replaced:  # a new connection already took over: nothing left to do
                return True
            if not member.token or rooms.grace <= 0:
                return False
            rooms.detach(member)
            # expire() waits for this lock: the entry is there before it runs.
            timer = rooms.schedule(rooms.grace, self.expire, member.token)
            self._held[member.token] = Held(member, timer, on_expiry)
        return True

    def expire(self, token: str) -> None:
        """The grace period of held session ``token`` is over (or its person came back afresh): it leaves."""
        rooms = self.rooms
        with self.lock:
            held = self._held.pop(token, None)
            if held is None:
                return
            rooms.vacate(held.member)  # the nick is free before anyone is told it left
        member = held.member
        rooms.directory.release(member.nick)
        joined = list(member.joined)
        member.joined.clear()
        for room in joined:
            rooms.directory.parted(room.name, member.nick)
            # ``session``: a shared log writes it only if no other server has taken the session over.
            rooms.log.append(room.name, "part", member.nick, "connection lost", session=member.token)
            rooms.drop_if_empty(room)
        held.on_expiry(member)

    def resume(self, member: Member, token: str, person: str | None) -> Member | None:
        """Take over session ``token``: the old member, or None when there is no such session.

        The old one is either held (its connection dropped) or still connected: a connection that
        died silently (Wi-Fi gone) looks alive to the server for up to two minutes, and the
        returning client must not wait for that. Under mutual TLS it must be the same certificate.
        """
        with self.lock:
            old = self.rooms.holder(token)
            if old is None or old.person != person:
                return None
            held = self._held.pop(token, None)
            if held is not None:
                held.timer.cancel()
            else:
                self.rooms.detach(old)
                old.replaced = True
                old.conn.abort("resumed from another connection")
            self.rooms.seat(member, old.nick, token)
        return old

    def adopt(self, member: Member, token: str, person: str | None) -> bool:
        """Take over a session that another server gave ``token`` (a shared back-end; that server is gone).

        The directory knows the token's nick, which is taken over here; then :meth:`rejoin_rooms`.
        False (nothing done) when the token is unknown everywhere.
        """
        directory = self.rooms.directory
        nick = directory.session_nick(token, person)
        if nick is None or not self.rooms.take_over(member, nick, token):
            return False
        directory.remember_session(token, nick, person)
        return True

    def rejoin_rooms(self, member: Member, rooms: list[tuple[str, str]]) -> None:
        """An adopted member joins ``rooms`` again (``(name, last id seen)``), each with what it missed, quietly."""
        self.rooms.tag(member)
        share = REPLAY_BYTES // max(1, len(rooms))
        for name, after in rooms[:MAX_JOINED]:
            self.rooms.join(member, name, after=after, confirm=False, budget=share, announce=False)
        if not member.joined:
            self.rooms.join(member, DEFAULT_ROOM, confirm=False, announce=False)

    def rejoin(self, member: Member, old: Member, positions: dict[str, str]) -> None:
        """Put a resumed ``member`` back in ``old``'s rooms with what it missed (after its ids)."""
        rooms = self.rooms
        joined, current = list(old.joined), old.current
        old.joined.clear()
        for room in joined:
            added = rooms.add(room.name, member)  # the room may have emptied and gone meanwhile
            if added is None:
                continue
            member.joined.append(added[0])
            if current is room or member.current is None:
                member.current = added[0]
        for data in old.held_private or []:
            member.conn.send(data)
        share = max(1, len(member.joined))
        for room in list(member.joined):
            # Without an id from the client (it saw no line there), from where the drop happened.
            after = positions.get(room.key) or old.dropped_at.get(room.key)
            rooms.catch_up(member, room, rooms.missed(member, room, after), "missed", REPLAY_BYTES // share,
                           MAX_CATCHUP_LINES // share)
