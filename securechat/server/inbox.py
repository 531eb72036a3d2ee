"""Private messages kept for someone offline (mutual TLS): kept within bounds, given back without loss.

Under mutual TLS a name is a person, and a ``/msg`` to someone offline is stored in the room log as
room ``"@name"``; the person's read position there (``"@name"`` in its marks) says what it was given.

- **Kept within bounds**: one sender may leave one person at most :data:`MAX_INBOX_PER_SENDER` unread
  messages, and a person has at most :data:`MAX_INBOX` unread in all; beyond, the sender is told so and
  nothing is stored. A refusal is repeated without counting anew for :data:`REFUSAL_MEMORY` seconds, or
  until the person has read here (a sender repeating itself costs one count, not one per line).
  ``/msg`` to a name the CA never gave out is not stored at all when the server knows the CA's names
  (see ``Rooms.persons``).
- **Given back in batches**: at login, at most :data:`INBOX_BATCH_BYTES` of them are queued; the next
  batch only once the connection has *written* that one to its socket (the outbox's ``sent`` count),
  checked on the connection's own tick. So a flood of kept messages never overflows the outbox (which
  would cut the person off as a reader that stopped reading).
- **The read position moves only past what was written**: it is saved after each batch is written, so a
  connection that drops half-way gets at its next login everything from the batch in flight on (that
  batch perhaps twice). What the kernel had taken but the peer never read is gone, as for any line.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from securechat.server.room import Member, render, time_label
from securechat.store.roomlog import Entry, RoomLog
from securechat.wire import protocol
from securechat.wire.conn import OUTBOX_LIMIT

log = logging.getLogger("securechat.rooms")

# Bytes of kept messages queued at once: a sixteenth of a connection's outbox (conn.OUTBOX_LIMIT),
# beside the rooms' catch-up at login (room.REPLAY_BYTES, half of it) and live lines.
INBOX_BATCH_BYTES = OUTBOX_LIMIT // 16
# Kept messages read from the log at once (batches are cut from them; read again when used up).
INBOX_READ = 200
# Unread messages kept for one person: beyond, "inbox full". Also bounds what counting them reads.
MAX_INBOX = 500
# Unread messages one sender may leave one person: a long day of notes, not a flood.
MAX_INBOX_PER_SENDER = 100
# How often a connection giving back kept messages looks whether its last batch was written.
INBOX_POLL = 0.05
# A refusal ("too many waiting") is repeated without counting again for this long.
REFUSAL_MEMORY = 10.0
# Refusals remembered at once (sender, person): beyond, the memory starts over.
MAX_REFUSALS = 10_000


class HasLog(Protocol):
    """Where the room log is (the server may replace it after start: ``serve`` opens history late)."""

    log: RoomLog


class _Cursor:
    """A person's kept messages on their way back."""

    __slots__ = ("pending", "more", "end", "last")

    def __init__(self, entries: list[Entry]) -> None:
        self.pending = collections.deque(entries)  # read, not queued yet
        self.more = len(entries) >= INBOX_READ  # the read was full: more may be stored after them
        self.end = 0  # the outbox's byte count once the batch in flight is written
        self.last: str | None = None  # the id of that batch's last message


class Inbox:
    """Keeping and giving back private messages for people offline (see the module docstring)."""

    def __init__(self, owner: HasLog, save_marks: Callable[[Member], None]) -> None:
        self.owner = owner
        self.save_marks = save_marks
        self._lock = threading.Lock()
        self._cursors: dict[Member, _Cursor] = {}
        self._refused: dict[tuple[str, str], tuple[float, str]] = {}  # (sender, person) -> (until, why)

    def _read(self, person: str, after: str | None, limit: int) -> list[Entry] | None:
        try:
            return self.owner.log.read_after("@" + person, after, limit)
        except Exception as exc:  # storage trouble must not cost the chat
            log.error("cannot read the messages kept for %s: %s", person, exc)
            return None

    # -- keeping ----------------------------------------------------------------------------

    def refusal(self, sender: str, person: str) -> str | None:
        """Why a message from ``sender`` may not be kept for ``person`` now (too many waiting), or None."""
        roomlog = self.owner.log
        if not roomlog.stores:
            return None
        now = time.monotonic()
        with self._lock:
            until, why = self._refused.get((sender, person), (0.0, ""))
        if now < until:
            return why
        try:
            mark = roomlog.marks(person).get("@" + person)
            senders = roomlog.senders_after("@" + person, mark, MAX_INBOX)
        except Exception as exc:  # storage trouble: keep nothing rather than keep without bounds
            log.error("cannot count the messages kept for %s: %s", person, exc)
            return f"cannot keep messages for {person} right now"
        if len(senders) >= MAX_INBOX:
            why = f"{person} has {MAX_INBOX} messages waiting already: try again once they have been online"
        elif senders.count(sender) >= MAX_INBOX_PER_SENDER:
            why = (f"{person} has {MAX_INBOX_PER_SENDER} of your messages waiting already: the next ones once "
                   "they have read those")
        else:
            return None
        with self._lock:
            if len(self._refused) >= MAX_REFUSALS:
                self._refused.clear()
            self._refused[(sender, person)] = (now + REFUSAL_MEMORY, why)
        return why

    # -- giving back ------------------------------------------------------------------------

    def deliver(self, member: Member, mark: str | None) -> None:
        """A person logged in: tell how many messages were kept, and give back the first batch."""
        if not self.owner.log.stores:
            return
        entries = self._read(member.nick, mark, INBOX_READ)
        if not entries:
            return
        count = f"{len(entries)}{' or more' if len(entries) >= INBOX_READ else ''}"
        member.conn.send(protocol.notice(f"{count} private message{'s' if len(entries) != 1 else ''} "
                                         "while you were away:"))
        cursor = _Cursor(entries)
        with self._lock:
            self._cursors[member] = cursor
        self._send(member, cursor)

    def _send(self, member: Member, cursor: _Cursor) -> None:
        """Queue the next batch (at least one message, at most INBOX_BATCH_BYTES) and watch it go out."""
        budget = INBOX_BATCH_BYTES
        now = time.time()
        first = True
        while cursor.pending:
            entry = cursor.pending[0]
            data = protocol.encode(f"(missed {time_label(entry.ts, now)}) {render(entry)}")
            if not first and len(data) > budget:
                break
            member.conn.send(data)
            budget -= len(data)
            first = False
            cursor.pending.popleft()
            cursor.last = entry.id
        cursor.end = member.conn.outbox.end_offset()
        member.conn.deadline = time.monotonic() + INBOX_POLL

    def tick(self, member: Member) -> None:
        """The connection's tick (its owner thread): once the batch in flight was written, move the read
        position past it and queue the next one."""
        with self._lock:
            cursor = self._cursors.get(member)
        if cursor is None:
            member.conn.deadline = None
            return
        if member.conn.outbox.sent < cursor.end:
            member.conn.deadline = time.monotonic() + INBOX_POLL
            return
        member.private_mark = cursor.last
        self.save_marks(member)
        with self._lock:  # read: whoever was told "too many waiting" may write again
            for refused in [key for key in self._refused if key[1] == member.nick]:
                del self._refused[refused]
        if not cursor.pending and cursor.more and cursor.last is not None:
            entries = self._read(member.nick, cursor.last, INBOX_READ) or []
            cursor.pending.extend(entries)
            cursor.more = len(entries) >= INBOX_READ
        if cursor.pending:
            self._send(member, cursor)
            return
        self.forget(member)
        member.conn.deadline = None

    def forget(self, member: Member) -> None:
        """``member``'s connection is over: what was not written stays kept for its next login."""
        with self._lock:
            self._cursors.pop(member, None)
