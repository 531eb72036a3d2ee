"""One room, and the words of rooms: names, bounds, how a stored line reads, ``/resume`` positions.

:class:`Room` keeps its members in delivery order (the one registry behind every line said in it);
:class:`~securechat.server.rooms.Rooms` owns every room and is the only one to change them.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from securechat.store.roomlog import Entry, RoomLog
from securechat.wire import protocol
from securechat.wire.conn import OUTBOX_LIMIT
from securechat.wire.ids import id_key, room_key

# Everyone starts here, so the seed's single-room flow is unchanged.
DEFAULT_ROOM = "lobby"

# A room name is a short word like a nick; 32 leaves room for "project-name-2026".
MAX_ROOM_CHARS = 32
ROOM_RE = re.compile(r"#?([A-Za-z0-9_-]{1,%d})\Z" % MAX_ROOM_CHARS)

# Rooms one person follows at once: enough for any real person; each costs a delivery per line.
MAX_JOINED = 20

# Rooms on one server: bounds the registry (a room lives while someone is in it).
MAX_ROOMS = 1000

# Lines replayed on joining a room (IRC bouncers and ergo default to about this many).
REPLAY_LINES = 50

# Most lines one /history asks for: a couple of screenfuls; page again for more.
MAX_HISTORY_PAGE = 200

# Most missed lines read back per room on resuming; beyond, the newest (and /history pages further).
MAX_CATCHUP = 5000

# Most missed lines replayed at once, in all of a resume's (or a return's) rooms together: the
# securechat client keeps at most 4096 unread lines before its display takes them.
MAX_CATCHUP_LINES = 2000

# Bytes of replayed lines a join or resume may queue at once, in all its rooms together: half of a
# client's outbox (conn.OUTBOX_LIMIT, 1 MiB), leaving the rest for live lines meanwhile.
REPLAY_BYTES = OUTBOX_LIMIT // 2

# Joins and leaves are announced in rooms of at most this many members (0: always). Beyond, they
# are noise, and quadratic: 5000 people joining one by one would be 12.5 million notices.
ANNOUNCE_LIMIT = 200

# Private lines kept for a dropped session during its grace period (then they are lost).
HELD_PRIVATE_LIMIT = 200

# How long a dropped session's nick and rooms are held for it (seconds).
GRACE_SECONDS = 60.0

# Kinds delivered to everyone but their sender (a join is told to the others only).
EXCLUDE_SENDER = frozenset({"chat", "action", "join"})

# What a replay (joining a room, /history) counts: lines people said. Arrivals and departures are left
# out of replays, or 30 people coming and going would push the last real lines out of a newcomer's 50
# (/who tells who is here now); renames stay, uncounted, so the speakers' names make sense.
CONVERSATION = frozenset({"chat", "action"})
REPLAYED = CONVERSATION | {"notice"}
# Entries looked through for one replay at most (about 6 ms of SQLite and Python here), so a room where
# only arrivals happened for days costs a bounded read: 20 comings and goings for each line of a 50-line
# replay. Reads start at twice the lines wanted and double, so a quiet doorway costs one read.
MAX_REPLAY_SCAN = 1000


def conversation(read_before: Callable[[str | None, int], list[Entry]], anchor: str | None,
                 limit: int) -> tuple[list[Entry], str | None]:
    """The replay of the last ``limit`` conversation lines before ``anchor``, oldest first (see
    :data:`CONVERSATION`), and the id paging goes on before: the oldest entry looked at, or the oldest
    shown when more were found (None when nothing was there). ``read_before(anchor, n)`` is the log's."""
    found: list[Entry] = []
    oldest: str | None = None
    counted = scanned = 0
    chunk_size = 2 * limit
    while counted < limit and scanned < MAX_REPLAY_SCAN:
        wanted = min(chunk_size, MAX_REPLAY_SCAN - scanned)
        chunk_size *= 2
        chunk = read_before(anchor, wanted)
        if not chunk:
            break
        scanned += len(chunk)
        anchor = oldest = chunk[0].id
        found = [e for e in chunk if e.kind in REPLAYED] + found
        counted += sum(e.kind in CONVERSATION for e in chunk)
        if len(chunk) < wanted:
            break
    while counted > limit:  # the oldest chunk gave more than needed: keep the newest
        counted -= found[0].kind in CONVERSATION
        found = found[1:]
    if found and oldest is not None and counted >= limit:
        oldest = found[0].id
    return found, oldest


# What people are told when the chat's servers cannot reach their shared storage (Redis): nothing is
# lost and nothing is shown out of order, it waits.
PAUSED_WHY = "the chat's servers cannot reach their shared store"
PAUSED = f"delivery paused: {PAUSED_WHY}; your lines wait and go out, in order, when it is back"
RESUMED = "delivery resumed"
UNCHECKED = ("cannot check {nick!r} with the chat's other servers right now (their shared store is unreachable); "
             "try again in a moment")


Write = Callable[[bytes], object]
Targets = tuple[tuple[str, Write], ...]


class Fanout(Protocol):
    """A loop thread of the engine (:class:`securechat.server.loop.Loop`), as delivery sees it."""

    def fanout(self, data: bytes, targets: Targets, exclude: str | None) -> None:
        """Queue ``data`` on each ``(nick, write)`` of ``targets`` but ``exclude``'s, on that loop's thread."""


class ChatConn(Protocol):
    """What rooms need of a member's connection: the engine's Transport for line clients, or an adapter
    that frames each line otherwise (a WebSocket message)."""

    @property
    def loop(self) -> Fanout: ...

    @property
    def closing(self) -> bool: ...

    def send(self, data: bytes) -> bool:
        """Queue one or more encoded lines for the peer; from any thread, in order."""

    def write(self, data: bytes) -> object:
        """The same, from the connection's own loop thread only (what a fan-out calls)."""

    def close(self, last: bytes = b"", reason: str = "closed") -> None: ...

    def abort(self, reason: str) -> None: ...


class Member(Protocol):
    """What :class:`Rooms` needs from a session (the server's Session)."""

    nick: str

    @property
    def conn(self) -> ChatConn: ...

    joined: list[Room]  # in join order
    current: Room | None  # the room its chat lines go to
    tagged: bool  # opted in to "@id=...;room=... " tags (/session)
    token: str  # resume token ("" until /session)
    person: str | None  # the certificate's name under mutual TLS
    paged: dict[str, str]  # room key -> the oldest id /history has shown
    held_private: list[bytes] | None  # private lines that came while dropped (None: connected)
    private_mark: str | None  # the newest stored private message given to it
    dropped_at: dict[str, str | None]  # room key -> the room's last id when its connection dropped
    replaced: bool  # a resumed connection took over from this one
    echo: bool  # "/cap echo": its own lines come back to it as the others got them

    def when_written(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` in the member's turn (on a worker: it may block) once everything its connection
        was sent until now has been written to its socket; never, if the connection ends first."""


class Cancellable(Protocol):
    """A timer that can be cancelled (what ``Rooms.schedule`` returns)."""

    def cancel(self) -> None: ...


# What times the grace periods: ``schedule(delay, fn, *args)`` runs ``fn(*args)`` in ``delay`` seconds.
Schedule = Callable[..., Cancellable]


def thread_timer(delay: float, fn: Callable[..., object], *args: object) -> Cancellable:
    """A :class:`threading.Timer` (a thread each): the default outside the engine, which uses its timer heap."""
    timer = threading.Timer(delay, fn, args)
    timer.daemon = True
    timer.start()
    return timer


def room_error(name: str) -> str | None:
    """Why ``name`` is not a usable room name, or None."""
    if not ROOM_RE.match(name):
        return f"a room name is 1-{MAX_ROOM_CHARS} of letters A-Z, digits, '_' and '-', optionally after '#'"
    return None


def time_label(ts: float, now: float) -> str:
    """A line's time for people: ``09:05``, or ``2026-11-24 09:05`` when not today (server time)."""
    return _minute_label(int(ts // 60), time.localtime(now)[:3])


@functools.lru_cache(maxsize=4096)  # a replay of 50 lines spans a few minutes: 50 formats become a few
def _minute_label(minute: int, today: tuple[int, ...]) -> str:
    t = time.localtime(minute * 60)
    return time.strftime("%H:%M" if t[:3] == today else "%Y-%m-%d %H:%M", t)


def render(entry: Entry) -> str:
    """An entry as a member of its room sees it (without the room marker)."""
    kind = entry.kind
    if kind == "chat":
        return f"[{entry.sender}] {entry.text}"
    if kind == "action":
        return f"[{entry.sender}] * {entry.text}"
    if kind == "join":
        return f"* {entry.sender} joined"
    if kind == "part":
        return f"* {entry.sender} left ({entry.text})" if entry.text else f"* {entry.sender} left"
    if kind == "private":
        return f"[{entry.sender} -> {entry.target}] {entry.text}"
    return f"* {entry.text}"


def tag(entry: Entry) -> str:
    """The opt-in tag in front of a room line: ``@id=1700000000000-0;room=dev ``."""
    return f"@id={entry.id};room={entry.room} "


def read_stored(log: RoomLog, room: str, anchor: str | None, limit: int, *, before: bool) -> list[Entry]:
    """Up to ``limit`` stored lines of ``room`` before (or after) id ``anchor``; [] when storage fails (logged)."""
    if limit <= 0 or not log.stores:
        return []
    try:
        if before:
            return log.read_before(room, anchor, limit)
        return log.read_after(room, anchor, limit)
    except Exception as exc:  # storage trouble must not cost the chat
        logging.getLogger("securechat.rooms").error("cannot read the history of #%s: %s", room, exc)
        return []


def replayed(member: Member, entry: Entry, how: str, now: float) -> bytes:
    """``entry`` replayed to ``member`` (``how``: history, missed), as sent."""
    where = "" if member.current is not None and member.current.key == room_key(entry.room) else f"#{entry.room} "
    line = f"({how} {time_label(entry.ts, now)}) {where}{render(entry)}"
    if member.tagged:
        line = tag(entry) + line
    return protocol.encode(line)


def live(member: Member, room: Room, entry: Entry) -> bytes:
    """A live ``entry`` of ``room`` as ``member`` gets it, as sent."""
    line = render(entry) if member.current is room else f"#{room.name} {render(entry)}"
    if member.tagged:
        line = tag(entry) + line
    return protocol.encode(line)


class Room:
    """One room's members. ``members`` is an immutable snapshot, replaced under ``lock``."""

    __slots__ = ("name", "key", "lock", "members", "catching", "last_id", "fast", "slow")

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = room_key(name)
        self.lock = threading.Lock()
        self.members: tuple[Member, ...] = ()
        # Members being given history: their live lines wait here until the history is out.
        self.catching: dict[Member, list[Entry]] = {}
        self.last_id: str | None = None  # the newest id delivered here
        # The members split for delivery (rebuilt under ``lock`` on every change, which is rare):
        # plain clients typing into this room get the one shared line, handed once to each loop
        # thread that has some of them, with their (nick, write) pairs, nothing else looked at per
        # line; the others (tagged, typing elsewhere, being given history) are formatted one by one.
        self.fast: dict[Fanout, Targets] = {}
        self.slow: tuple[Member, ...] = ()

    def rebuild(self) -> None:
        """Recompute :attr:`fast` and :attr:`slow` (caller holds :attr:`lock`)."""
        fast: dict[Fanout, list[tuple[str, Write]]] = {}
        slow = []
        for m in self.members:
            if m.current is self and not m.tagged and m not in self.catching:
                fast.setdefault(m.conn.loop, []).append((m.nick, m.conn.write))
            else:
                slow.append(m)
        self.fast, self.slow = {loop: tuple(targets) for loop, targets in fast.items()}, tuple(slow)

    # Arrivals and departures update the lists in place (C-speed tuple slicing) instead of
    # rebuilding them member by member: 5000 people joining one room was quadratic in Python
    # (54 s to connect them all instead of 6 s).

    def add_catching(self, member: Member) -> None:
        """A newcomer, catching up: slow until :meth:`settle` (caller holds :attr:`lock`)."""
        self.members = (*self.members, member)
        self.catching[member] = []
        self.slow = (*self.slow, member)

    def settle(self, member: Member) -> None:
        """``member`` has caught up: it moves to the fast list if it qualifies (caller holds the lock)."""
        if member.current is self and not member.tagged and member not in self.catching and member in self.slow:
            self.slow = _without(self.slow, member)
            loop = member.conn.loop
            self.fast[loop] = (*self.fast.get(loop, ()), (member.nick, member.conn.write))

    def remove(self, member: Member) -> None:
        """``member`` leaves the delivery lists (caller holds :attr:`lock`)."""
        self.members = _without(self.members, member)
        self.catching.pop(member, None)
        if member in self.slow:
            self.slow = _without(self.slow, member)
            return
        loop = member.conn.loop
        targets = _without(self.fast.get(loop, ()), (member.nick, member.conn.write))
        if targets:
            self.fast[loop] = targets
        else:
            self.fast.pop(loop, None)

    def __repr__(self) -> str:
        return f"<Room #{self.name} {len(self.members)}>"


def _without(items: tuple[Any, ...], item: object) -> tuple[Any, ...]:
    """``items`` less the first ``item`` (unchanged when absent)."""
    try:
        i = items.index(item)
    except ValueError:
        return items
    return items[:i] + items[i + 1:]


def parse_rooms(words: Iterable[str]) -> list[tuple[str, str]]:
    """``ROOM=ID`` words from ``/resume`` -> [(room name, id)], in order; anything malformed is ignored."""
    out: list[tuple[str, str]] = []
    for word in words:
        name, _, entry_id = word.partition("=")
        name = name[1:] if name.startswith("#") else name
        try:
            id_key(entry_id)
        except ValueError:
            continue
        if room_error(name) is None and len(out) < MAX_JOINED:
            out.append((name, entry_id))
    return out


def parse_positions(words: Iterable[str]) -> dict[str, str]:
    """``ROOM=ID`` words from ``/resume`` -> {room_key: id}; anything malformed is ignored."""
    positions: dict[str, str] = {}
    for word in words:
        name, _, entry_id = word.partition("=")
        if name.startswith("#"):
            name = name[1:]
        try:
            id_key(entry_id)
        except ValueError:
            continue
        if room_error(name) is None and len(positions) < MAX_JOINED:
            positions[room_key(name)] = entry_id
    return positions
