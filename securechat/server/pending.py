"""Connections that have not authenticated yet, in a bounded pool of their own.

Between ``accept()`` and an accepted nickname a connection proves nothing: it may be a person about
to type a nick, or one of a thousand sockets opened to wear the server out. Such connections never
take a chat place (``--max-clients`` counts registered chatters only); they hold a :class:`Ticket`
from a :class:`PendingPool` instead, whatever phase they are in (TLS handshake, nickname, an
enrollment exchange: anything before the peer is known). The pool never refuses a newcomer; when it
is full, somebody already waiting makes room:

- an address at its own cap (``per_address``) gives up its oldest pending connection;
- otherwise, in a full pool, the address holding the most pending connections gives up its oldest
  (among equals, the address that reached that count first).

So a flood from one address, or from a few, only ever evicts itself, and a person connecting from
an address with one connection in flight is the last to go. A flood from more addresses than the
pool has room for degrades to "the oldest makes room for the newest": silent sockets then live
``size / flood rate`` seconds each, which is still enough for a client to finish a handshake on a
LAN. The evicted connection's owner is told through ``on_evict`` and closes it; evictions are
counted and logged at most once per :data:`LOG_INTERVAL`, never a line per socket.

Usage, for anything that accepts connections before it knows who is on the other end::

    ticket = server.pending.admit(address_key(peer[0]), on_evict=lambda: conn.abort("evicted"))
    ...                                   # handshake, nickname, enrollment
    if not ticket.release():              # authenticated; False: evicted meanwhile, so drop it
        ...

``release()`` is idempotent, and must also be called when the connection ends unauthenticated.
Inside the server an ``Admission`` holds each connection's ticket from ``accept()`` on; evicting it
asks the connection's loop thread to abort it, and the ticket goes when the connection closes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("securechat.server")

# Unauthenticated connections at once. On a LAN a few dozen people log in at the same moment at
# most; 512 is ten times that, and bounds what silent connections cost: a silent socket is a
# descriptor and a table entry; a session at the nickname prompt ~15 KiB (its TLS state), so a full
# pool of those is ~8 MiB.
MAX_PENDING = 512

# Pending connections from one address. A classroom of 60 behind one NAT, all at the nickname
# prompt together, still fits; a single machine holds at most 1/8 of the pool.
MAX_PENDING_PER_ADDRESS = 64

# Repeated events (evictions, descriptor exhaustion) are logged at most this often, with a count.
LOG_INTERVAL = 10.0


def address_key(ip: str) -> str:
    """The address a connection is counted under: IPv4-mapped IPv6 addresses count as IPv4."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


class Throttle:
    """Logs an event that may repeat thousands of times a second as one line per interval.

    The first occurrence is logged at once; later ones within ``interval`` are counted, and the
    count is reported by the next occurrence after the interval or by :meth:`flush`.
    """

    def __init__(self, logger: logging.Logger = log, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # key -> when it was last logged
        self._unsaid: dict[str, tuple[int, str]] = {}  # key -> (occurrences not logged, latest text)

    def __call__(self, key: str, message: str) -> None:
        """Log ``message`` (an occurrence of ``key``) unless one was logged less than an interval ago."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                count, _ = self._unsaid.get(key, (0, ""))
                self._unsaid[key] = (count + 1, message)
                return
            self._last[key] = now
            count, _ = self._unsaid.pop(key, (0, ""))
        self.logger.warning("%s%s", message, self._suffix(count, now - last if last is not None else 0.0))

    def due(self) -> float | None:
        """Seconds until :meth:`flush` has something to say, or None while nothing is owed."""
        with self._lock:
            if not self._unsaid:
                return None
            now = self.clock()
            return max(0.0, min(self._last[key] + self.interval - now for key in self._unsaid))

    def flush(self, force: bool = False) -> None:
        """Log the counts owed for keys whose interval has passed (all of them with ``force``)."""
        now = self.clock()
        lines = []
        with self._lock:
            for key, (count, message) in list(self._unsaid.items()):
                if force or now - self._last[key] >= self.interval:
                    lines.append(f"{message} (and {count} like it in the last {now - self._last[key]:.0f} s)")
                    self._last[key] = now
                    del self._unsaid[key]
        for line in lines:
            self.logger.warning("%s", line)

    def _suffix(self, count: int, elapsed: float) -> str:
        return f" ({count} more like it in the last {elapsed:.0f} s)" if count else ""


class Ticket:
    """One connection's place in a :class:`PendingPool`: held, then released or evicted, once."""

    __slots__ = ("pool", "address", "on_evict", "_held")

    def __init__(self, pool: PendingPool, address: str, on_evict: Callable[[], None]) -> None:
        self.pool = pool
        self.address = address
        self.on_evict = on_evict
        self._held = True

    @property
    def held(self) -> bool:
        """Still in the pool: neither released nor evicted."""
        return self._held

    def release(self) -> bool:
        """Leave the pool (authenticated, or gone). True if it was still held, False once evicted.

        Idempotent; safe from any thread. A False answer after authenticating means the eviction
        won the race: ``on_evict`` has been or is being called, and the connection must end.
        """
        return self.pool._release(self)

    def __repr__(self) -> str:
        return f"<Ticket {self.address} {'held' if self._held else 'gone'}>"


class PendingPool:
    """A bounded set of unauthenticated connections; the newest always gets in.

    ``size`` is the most held at once (at least 1); ``per_address`` the most from one address,
    0 for no per-address cap. ``on_evict`` callbacks run in the thread that called :meth:`admit`
    (or :meth:`evict_one`), after the pool's lock is released: they must be thread-safe and quick
    (ask the connection's owner to close it; never close another thread's socket directly).
    """

    def __init__(self, size: int = MAX_PENDING, per_address: int = MAX_PENDING_PER_ADDRESS,
                 throttle: Throttle | None = None) -> None:
        if size < 1 or per_address < 0:
            raise ValueError("size must be at least 1 and per_address at least 0")
        self.size = size
        self.per_address = per_address
        self.throttle = throttle if throttle is not None else Throttle()
        self._lock = threading.Lock()
        # address -> its tickets, oldest first (dicts keep insertion order; used as ordered sets)
        self._held: dict[str, dict[Ticket, None]] = {}
        # n -> the addresses holding exactly n tickets, in the order they reached n
        self._ranks: dict[int, dict[str, None]] = {}
        self._top = 0  # the largest n in _ranks
        self._count = 0
        self._evicted = 0

    def __len__(self) -> int:
        return self._count

    @property
    def evicted(self) -> int:
        """Connections evicted since the pool was made."""
        return self._evicted

    def count(self, address: str) -> int:
        """Pending connections held by ``address``."""
        return len(self._held.get(address, ()))

    def admit(self, address: str, on_evict: Callable[[], None]) -> Ticket:
        """Add a connection from ``address``, evicting another if the pool or the address is full."""
        ticket = Ticket(self, address, on_evict)
        with self._lock:
            victim = None
            if self.per_address and len(self._held.get(address, ())) >= self.per_address:
                victim = self._evict_oldest(address)
                key, why = "per-address", f"{self.per_address} from that address (--max-pending-per-ip)"
            elif self._count >= self.size:
                victim = self._evict_oldest(next(iter(self._ranks[self._top])))
                key, why = "pool", f"{self.size} in all (--max-pending), the most from that address"
            self._add(ticket)
        if victim is not None:
            self._evicted_one(victim, key, why)
        return ticket

    def evict_one(self) -> bool:
        """Evict one pending connection by the pool's policy, e.g. to free a descriptor; False if empty.

        Not logged here: the caller logs why it needed the room.
        """
        with self._lock:
            if not self._count:
                return False
            victim = self._evict_oldest(next(iter(self._ranks[self._top])))
        self._evicted_one(victim)
        return True

    # -- under the lock --------------------------------------------------------------------

    def _add(self, ticket: Ticket) -> None:
        held = self._held.setdefault(ticket.address, {})
        held[ticket] = None
        self._rerank(ticket.address, len(held) - 1, len(held))
        self._count += 1

    def _remove(self, ticket: Ticket) -> None:
        held = self._held[ticket.address]
        del held[ticket]
        self._rerank(ticket.address, len(held) + 1, len(held))
        if not held:
            del self._held[ticket.address]
        self._count -= 1
        ticket._held = False

    def _rerank(self, address: str, old: int, new: int) -> None:
        if old:
            rank = self._ranks[old]
            del rank[address]
            if not rank:
                del self._ranks[old]
                if self._top == old and new < old:
                    self._top = new  # the address itself is now at new, or the pool is empty
        if new:
            self._ranks.setdefault(new, {})[address] = None
            self._top = max(self._top, new)

    def _evict_oldest(self, address: str) -> Ticket:
        victim = next(iter(self._held[address]))
        self._remove(victim)
        self._evicted += 1
        return victim

    def _release(self, ticket: Ticket) -> bool:
        with self._lock:
            if not ticket._held:
                return False
            self._remove(ticket)
            return True

    # -- outside the lock -----------------------------------------------------------------

    def _evicted_one(self, victim: Ticket, key: str = "", why: str = "") -> None:
        if key:
            self.throttle(f"evicted-{key}",
                          f"closed the oldest unauthenticated connection from {victim.address} to make room: {why}")
        try:
            victim.on_evict()
        except Exception:  # the admitting thread (often the accept loop) must survive a bad callback
            log.exception("evicting a connection from %s failed", victim.address)
