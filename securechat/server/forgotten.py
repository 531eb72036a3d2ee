"""Sessions whose grace period ran out, remembered for a while so that their client, coming back, is told what is lost.

When a dropped session is not resumed in time (:meth:`securechat.server.resume.HeldSessions.hold`), its resume
token, its person and the private lines held for it are kept here (:data:`FORGOTTEN`). A client that
comes back later with that token is refused the resume, but once it has a nickname again it gets those
private lines, and is told exactly what cannot be had (:class:`securechat.server.session.Session`).
"""

from __future__ import annotations

import collections
import threading

# Sessions whose grace period ran out are remembered this long (and within this many bytes of held private
# lines, the oldest forgotten first), so that their client, coming back later with the token, gets the
# private messages held for it and is told exactly what is lost.
FORGOTTEN_KEEP = 3600.0
FORGOTTEN_BYTES = 8 << 20


class Forgotten:
    """Expired sessions by resume token: (when, person, the private lines held for it). Thread-safe, bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[str, tuple[float, str | None, list[bytes]]] = collections.OrderedDict()
        self._bytes = 0

    def keep(self, token: str, person: str | None, held: list[bytes], now: float) -> None:
        with self._lock:
            self._items[token] = (now, person, held)
            self._bytes += sum(map(len, held))
            while self._items and (self._bytes > FORGOTTEN_BYTES or next(iter(self._items.values()))[0] <
                                   now - FORGOTTEN_KEEP):
                self._bytes -= sum(map(len, self._items.popitem(last=False)[1][2]))

    def take(self, token: str, person: str | None, now: float) -> list[bytes] | None:
        """The private lines held for session ``token`` (once), None when it is not remembered."""
        with self._lock:
            item = self._items.get(token)
            if item is None or item[1] != person or item[0] < now - FORGOTTEN_KEEP:
                return None
            del self._items[token]
            self._bytes -= sum(map(len, item[2]))
            return item[2]


# One per process: tokens are 144 random bits, so the servers of a process (tests) never share one.
FORGOTTEN = Forgotten()
