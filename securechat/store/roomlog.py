"""The room log: the seam between rooms and wherever their lines live.

Every line said in a room (chat, ``/me``, join/part notices, stored private messages) becomes an
:class:`Entry` with a log-assigned id and timestamp. The room code only talks to a
:class:`RoomLog`; which one runs is chosen at start:

- the embedded log (SQLite, :mod:`securechat.store.history`): ids are assigned in-process, delivery to
  local members happens synchronously inside :meth:`RoomLog.append`, and storage is written
  afterwards by a batching writer, so history never sits on the hot path;
- the shared log (Redis Streams, several servers): ``append`` queues the entry for the stream,
  and delivery to *every* server, this one included, comes back through the ``deliver`` callback,
  so each room has one order across all servers.

Either way a caller sees the same contract: ``append`` never blocks on I/O, every appended
entry reaches ``deliver`` exactly once, in the room's order (which keeps each sender's order),
and ``read_after``/``read_before`` page through what is stored.

Rooms are named by their display name (``"lobby"``, ``"dev"``; ``"@nick"`` for one person's private
messages); a back-end keys its storage by :func:`room_key`, so ``Dev`` and ``dev`` are one room.

Ids are Redis Stream ids, ``"<milliseconds>-<sequence>"``, for every back-end, so a client's
"last id seen" means the same thing whichever back-end (or server) it reconnects to. Compare them
with :func:`id_key`, never as strings.

What :class:`securechat.server.rooms.Rooms` relies on, for whoever writes a back-end:

- ``deliver(entry)`` may run on any thread, concurrently for different rooms; the room code locks
  per room. For one room, entries must arrive in id order (the stream's order). An entry for a room
  nobody on this server is in is simply dropped by the room code.
- Kinds: ``chat``/``action``/``join`` go to every member but their sender (compared by nick),
  ``part``/``notice`` to every member. ``private`` entries live in room ``"@" + target`` with
  ``target`` set; the room code hands them to the local session called ``target``, if any.
  ``append(..., store=False)`` (a private message to someone online) must be delivered but not kept;
  ``store=True`` on a ``private`` entry (mutual TLS, recipient offline) keeps it for
  ``read_after("@nick", mark, ...)`` at the recipient's next login.
- Replay without gaps or duplicates: the room code adds a member (buffering its live entries),
  *then* reads the stored history, and drops buffered entries whose id is not newer than the last
  one read. So every entry delivered after ``append`` returned must also be found by a read that
  starts later: the embedded log stores before delivering and flushes before reading; a stream is
  readable as soon as ``XADD`` returns.
- Read positions (``marks``/``set_marks``, mutual TLS only) are per certificate name, so a person
  who comes back on another server finds them too.
- :class:`Directory` is the other half of a shared back-end: nick claims across servers, and the
  people and rooms on the other servers for ``/who``, ``/rooms`` and ``/msg``.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from securechat.wire.ids import id_key, room_key

# What an entry is; the room code decides how each kind is shown.
KINDS = frozenset({"chat", "action", "join", "part", "notice", "private"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One line in one room's log."""

    room: str  # the room's display name ("@nick" for a person's stored private messages)
    id: str  # "<ms>-<seq>", increasing within the room
    ts: float  # seconds since the epoch, the appending server's clock
    kind: str  # one of KINDS
    sender: str  # the nick that said it ("" for server notices)
    text: str  # already sanitised
    target: str = ""  # the recipient of a private message
    origin: str = ""  # which server appended it (shared logs; "" for the embedded one)


class IdClock:
    """Assigns increasing ``"<ms>-<seq>"`` ids in-process, even if the wall clock steps back."""

    def __init__(self, last: str | None = None) -> None:
        self._lock = threading.Lock()
        self._ms, self._seq = id_key(last) if last else (0, 0)

    def next(self, now: float | None = None) -> tuple[str, float]:
        """A fresh id and the timestamp that goes with it."""
        ts = time.time() if now is None else now
        ms = int(ts * 1000)
        with self._lock:
            if ms > self._ms:
                self._ms, self._seq = ms, 0
            else:
                self._seq += 1
            return f"{self._ms}-{self._seq}", ts


Deliver = Callable[[Entry], None]


class RoomLog(abc.ABC):
    """Where a server's rooms append lines and read them back."""

    @abc.abstractmethod
    def start(self, deliver: Deliver) -> None:
        """Begin: from now on every appended entry is passed to ``deliver`` exactly once, in order.

        ``deliver`` runs on whichever thread the back-end chooses (the appender's, for the
        embedded log); it must not block.
        """

    @abc.abstractmethod
    def append(self, room: str, kind: str, sender: str, text: str, target: str = "", *, store: bool = True,
               session: str = "") -> bool:
        """Add a line to ``room``. Never blocks on storage or the network. False: refused (a shared
        back-end that has queued as many lines as it may while its storage is unreachable).

        ``store=False`` (a private message to someone online): deliver it, but keep it out of
        history. A shared back-end may pass it through its shared storage to deliver it, as long as
        it does not keep it there. ``session`` (a departure, ``kind="part"``): the resume token of the
        session it ends; a shared back-end writes it only if no other server has taken that session
        over, and then ends the session everywhere, so a person is either announced gone or resumed
        elsewhere, never both.
        """

    @abc.abstractmethod
    def read_after(self, room: str, after_id: str | None, limit: int) -> list[Entry]:
        """Up to ``limit`` stored entries of ``room`` after ``after_id`` (from the start if None), oldest first."""

    @abc.abstractmethod
    def read_before(self, room: str, before_id: str | None, limit: int) -> list[Entry]:
        """The last ``limit`` stored entries of ``room`` before ``before_id`` (the newest if None), oldest first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop; a graceful close writes everything appended so far."""

    # -- optional: what a back-end without storage answers -----------------------------------

    def watch(self, on_pause: Callable[[bool], None]) -> None:
        """A shared back-end calls ``on_pause(True)`` when delivery has been paused for a while (its
        storage unreachable) and ``on_pause(False)`` when it goes on; the embedded log never pauses."""
        return None

    @property
    def stores(self) -> bool:
        """True when ``read_after``/``read_before`` can return anything (history is on)."""
        return True

    def last_id(self, room: str) -> str | None:
        """The newest id in ``room``, or None when it has none."""
        newest = self.read_before(room, None, 1)
        return newest[-1].id if newest else None

    def senders_after(self, room: str, after_id: str | None, limit: int) -> list[str]:
        """The senders of the first ``limit`` stored entries after ``after_id``: what counting a
        person's waiting messages needs, without their text (a back-end may do it cheaper)."""
        return [entry.sender for entry in self.read_after(room, after_id, limit)]

    def marks(self, person: str) -> dict[str, str]:
        """A person's read positions: room -> last id they were given (empty when not kept).

        ``person`` is a certificate name (mutual TLS), the only identity that survives a
        reconnection; the rooms in it are also the rooms the person was in.
        """
        return {}

    def set_marks(self, person: str, marks: dict[str, str]) -> None:
        """Replace a person's read positions (written like a line: after delivery, never blocking).

        Without storage they are not kept: a no-op.
        """
        return None


# Room names an embedded log remembers (keys and spellings): ten times the rooms a server may hold.
MAX_CHANNEL_NAMES = 10_000


class _Channel:
    """One room's order in an embedded log: the lock held while an id is given and delivered."""

    __slots__ = ("lock", "ms", "seq")

    def __init__(self, last: tuple[int, int] = (0, 0)) -> None:
        self.lock = threading.Lock()
        self.ms, self.seq = last


class LocalLog(RoomLog):
    """The embedded log without storage (``--no-history``, and the library default).

    Ids are assigned per room in-process and each entry is delivered synchronously inside
    :meth:`append`, under the room's lock, so every member sees a room's lines in id order.
    Subclasses store entries by overriding :meth:`_store`, which runs under that same lock right
    before delivery (so a reader that waits for storage never misses a delivered line).
    """

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._channels: dict[str, _Channel] = {}
        self._channels_lock = threading.Lock()
        # Every "@nick" room shares one channel: ids still increase within each of them, and the
        # table does not grow with every person ever messaged.
        self._private = _Channel()

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    @property
    def stores(self) -> bool:
        return False

    def _channel(self, room: str) -> _Channel:
        if room.startswith("@"):
            return self._private
        channel = self._channels.get(room)
        if channel is None:
            key = room_key(room)
            with self._channels_lock:
                channel = self._channels.get(key)
                if channel is None:
                    last = self.last_id(room)
                    channel = self._channels[key] = _Channel(id_key(last) if last else (0, 0))
                # Also under the exact spelling, so the next append skips room_key() (bounded: a
                # client cycling through spellings of one name must not grow the table for ever).
                if len(self._channels) < MAX_CHANNEL_NAMES:
                    self._channels[room] = channel
        return channel

    def append(self, room: str, kind: str, sender: str, text: str, target: str = "", *, store: bool = True,
               session: str = "") -> bool:
        deliver = self._deliver
        channel = self._channel(room)
        with channel.lock:
            ts = time.time()
            ms = int(ts * 1000)
            if ms > channel.ms:
                channel.ms, channel.seq = ms, 0
            else:  # same millisecond, or the wall clock stepped back: keep increasing
                channel.seq += 1
            entry = Entry(room, f"{channel.ms}-{channel.seq}", ts, kind, sender, text, target)
            if store:
                self._store(entry)
            if deliver is not None:
                deliver(entry)
        return True

    def _store(self, entry: Entry) -> None:
        """Keep ``entry`` (called under the room's lock, before delivery; must not block)."""

    def read_after(self, room: str, after_id: str | None, limit: int) -> list[Entry]:
        return []

    def read_before(self, room: str, before_id: str | None, limit: int) -> list[Entry]:
        return []

    def last_id(self, room: str) -> str | None:
        return None

    def close(self) -> None:
        self._deliver = None


class Directory(abc.ABC):
    """Who is online, across every server sharing the rooms (one server: just this one).

    The room code keeps its own sessions; a directory answers for the others. The embedded
    default (:class:`LocalDirectory`) knows only local people, so every answer is "no one else".
    A shared back-end claims nicks atomically (with a TTL it refreshes), and reports the people
    and rooms of the other servers.
    """

    @abc.abstractmethod
    def claim(self, nick: str) -> bool:
        """Reserve ``nick`` (compare with ``protocol.nick_key``) for this server; False if another holds it.

        Raises :class:`DirectoryUnavailable` when it cannot tell (a shared back-end's storage is
        unreachable): a nick is never granted without asking, so no two servers hand out one nick.
        """

    @abc.abstractmethod
    def release(self, nick: str) -> None:
        """Give up a nick this server claimed."""

    @abc.abstractmethod
    def online(self, nick: str) -> bool:
        """True when ``nick`` is connected to another server."""

    @abc.abstractmethod
    def joined(self, room: str, nick: str) -> None:
        """``nick`` (on this server) is now in ``room``."""

    @abc.abstractmethod
    def parted(self, room: str, nick: str) -> None:
        """``nick`` (on this server) left ``room``."""

    @abc.abstractmethod
    def members(self, room: str) -> list[str]:
        """The nicks in ``room`` on the other servers."""

    @abc.abstractmethod
    def rooms(self) -> dict[str, int]:
        """Room display name -> member count on the other servers."""

    def everyone(self) -> list[str]:
        """Nicks online on the other servers."""
        return []

    # -- resuming on another server (optional: a shared back-end) ------------------------------

    def remember_session(self, token: str, nick: str, person: str | None) -> None:
        """A resume token was given to ``nick`` here: another server may be asked to resume it."""
        return None

    def session_nick(self, token: str, person: str | None) -> str | None:
        """The nick of a session started on another server with ``token`` (same ``person``), or None."""
        return None

    def take_over(self, nick: str) -> bool:
        """Claim ``nick`` for this server even if another holds it (its owner proved it with a token)."""
        return self.claim(nick)


class DirectoryUnavailable(Exception):
    """A shared directory's storage is unreachable: it cannot answer for the cluster right now."""


class LocalDirectory(Directory):
    """One server alone: nobody is anywhere else."""

    def claim(self, nick: str) -> bool:
        return True

    def release(self, nick: str) -> None:
        pass

    def online(self, nick: str) -> bool:
        return False

    def joined(self, room: str, nick: str) -> None:
        pass

    def parted(self, room: str, nick: str) -> None:
        pass

    def members(self, room: str) -> list[str]:
        return []

    def rooms(self) -> dict[str, int]:
        return {}
