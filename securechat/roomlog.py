"""The room log: the seam between rooms and wherever their lines live.

Every line said in a room (chat, ``/me``, join/part notices, stored private messages) becomes an
:class:`Entry` with a log-assigned id and timestamp. The room code only talks to a
:class:`RoomLog`; which one runs is chosen at start:

- the embedded log (SQLite, :mod:`securechat.history`): ids are assigned in-process, delivery to
  local members happens synchronously inside :meth:`RoomLog.append`, and storage is written
  afterwards by a batching writer, so history never sits on the hot path;
- the shared log (Redis Streams, several servers): ``append`` queues the entry for the stream,
  and delivery to *every* server, this one included, comes back through the ``deliver`` callback,
  so each room has one order across all servers.

Either way a caller sees the same contract: ``append`` never blocks on I/O, every appended
entry reaches ``deliver`` exactly once, in the room's order (which keeps each sender's order),
and ``read_after``/``read_before`` page through what is stored.

Ids are Redis Stream ids, ``"<milliseconds>-<sequence>"``, for every back-end, so a client's
"last id seen" means the same thing whichever back-end (or server) it reconnects to. Compare them
with :func:`id_key`, never as strings.
"""

from __future__ import annotations

import abc
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

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


# ASCII digits only (str.isdigit admits other scripts' digits); 15 digits is beyond any real clock.
_ID_RE = re.compile(r"([0-9]{1,15})-([0-9]{1,15})\Z")


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of an entry id: ``"1700000000000-3"`` -> ``(1700000000000, 3)``.

    Raises ValueError for anything that is not an id, so an id from a client can be validated
    with it.
    """
    match = _ID_RE.match(entry_id)
    if match is None:
        raise ValueError(f"not an entry id: {entry_id[:40]!r}")
    return int(match[1]), int(match[2])


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
    def append(self, room: str, kind: str, sender: str, text: str, target: str = "") -> None:
        """Add a line to ``room``. Never blocks on storage or the network."""

    @abc.abstractmethod
    def read_after(self, room: str, after_id: str | None, limit: int) -> list[Entry]:
        """Up to ``limit`` stored entries of ``room`` after ``after_id`` (from the start if None), oldest first."""

    @abc.abstractmethod
    def read_before(self, room: str, before_id: str | None, limit: int) -> list[Entry]:
        """The last ``limit`` stored entries of ``room`` before ``before_id`` (the newest if None), oldest first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop; a graceful close writes everything appended so far."""
