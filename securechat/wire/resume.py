"""Resuming a chat after a dropped connection: the client's side, sans I/O.

After its welcome the securechat client sends ``/session``. The server answers
``* session TOKEN GRACE`` and from then on puts a tag in front of every room line:
``@id=1700000000000-3;room=lobby [bob] hi``. :class:`ResumeState` strips the tags (people never
see them), remembers the newest id seen in each room, and the rooms the person is in.

When the connection drops, the client (:class:`securechat.client.chat.ChatClient`) reconnects with
:func:`backoff` delays and sends :meth:`ResumeState.resume_line` instead of a nickname:
``/resume TOKEN lobby=1700000000000-3 dev=...``. Within the grace period the server gives back
the same nick and rooms and replays every line after those ids, marked ``(missed HH:MM)``. If the
server no longer knows the token (restarted, or the grace period ran out), the client registers its
nick again and rejoins its rooms.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from securechat.wire import protocol
from securechat.wire.ids import id_key, room_key

# Reconnect delays: the first try after a second (a Wi-Fi blip), doubling up to half a minute so
# a server that is down for long is not hammered by every client at once.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0

_TAG_RE = re.compile(r"@id=([0-9]{1,15}-[0-9]{1,15});room=([^ ;]{1,40}) ")
_SESSION_RE = re.compile(r"\* session ([A-Za-z0-9_-]{16,64}) ([0-9.]+)\Z")
_JOINED_RE = re.compile(r"\* you joined #([A-Za-z0-9_-]{1,32}) ")
_LEFT_RE = re.compile(r"\* you left #([A-Za-z0-9_-]{1,32})\Z")
_TALKING_RE = re.compile(r"\* (?:.*; )?now talking in #([A-Za-z0-9_-]{1,32})\Z")


def backoff(first: float = BACKOFF_FIRST, most: float = BACKOFF_MAX) -> Iterator[float]:
    """Delays before each reconnection attempt: 1, 2, 4, 8, 16, 30, 30, ... seconds."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


class ResumeState:
    """What a client needs to resume: its token, and where it is in each room."""

    def __init__(self) -> None:
        self.token = ""
        self.grace = 0.0
        self.positions: dict[str, str] = {}  # room key -> newest id seen
        self.rooms: dict[str, str] = {}  # room key -> display name, in join order
        self.current = ""  # the room typed into

    def filter(self, line: str) -> str | None:
        """A received line as people should see it (tag stripped), or None when it is only for us."""
        if line.startswith("@id="):
            m = _TAG_RE.match(line)
            if m is not None:
                entry_id, room = m[1], m[2]
                key = room_key(room)
                seen = self.positions.get(key)
                if seen is None or id_key(entry_id) > id_key(seen):
                    self.positions[key] = entry_id
                self.rooms.setdefault(key, room)
                return line[m.end():]
            return line
        if line.startswith(protocol.NOTICE_PREFIX):
            m = _SESSION_RE.match(line)
            if m is not None:
                self.token, self.grace = m[1], float(m[2])
                return None
            if (m := _JOINED_RE.match(line)) is not None:
                self.rooms[room_key(m[1])] = m[1]
            elif (m := _LEFT_RE.match(line)) is not None:
                self.rooms.pop(room_key(m[1]), None)
                self.positions.pop(room_key(m[1]), None)
            if (m := _TALKING_RE.match(line)) is not None:
                self.current = m[1]
        return line

    def resume_line(self) -> str:
        """``/resume TOKEN room=id ...``: sent instead of a nickname when reconnecting."""
        positions = " ".join(f"{self.rooms.get(key, key)}={entry_id}" for key, entry_id in self.positions.items())
        return f"/resume {self.token} {positions}".rstrip()

    def rejoin_lines(self) -> list[str]:
        """Commands that put a re-registered client back in its rooms, the current one last."""
        names = [name for key, name in self.rooms.items() if key != room_key(self.current)]
        if self.current:
            names.append(self.current)
        return [f"/join {name}" for name in names if room_key(name) != room_key("lobby") or name == self.current]
