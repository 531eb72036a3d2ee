"""Several servers, one chat: rooms, presence and private messages shared through Redis.

``securechat serve --redis URL`` replaces the embedded room log (SQLite) with :class:`RedisRoomLog`
and adds a cluster-wide nick directory, :class:`RedisDirectory`. Both need redis-py, the optional
extra ``pip install 'securechat[redis]'``; it is imported only here and only when used, so the base
install runs without it.

Layout in Redis (``P`` is the key prefix, ``securechat`` by default):

- ``P:log``: one stream of every line said in any room, by every server (the *firehose*). Each
  server's reader follows it with ``XREAD BLOCK`` from the last id it has seen, so a server that was
  disconnected catches up instead of missing what was said meanwhile (what pub/sub would lose).
- ``P:room:KEY``: each room's own stream, the room's history, written by the same Lua script with
  the *same* id as the firehose entry. The stream id is the message id everywhere: history, replay on
  join and a client's catch-up mean the same thing on every server.
- ``P:seq:ORIGIN``: the last sequence number each server has written, so a batch that is re-sent
  after a lost reply is written once (the script skips what it has already seen).
- ``P:inbox:ORIGIN``: private messages for the people on one server.
- ``P:nick:KEY``: who holds a nick (``ORIGIN<TAB>display``), claimed with ``SET NX PX`` and kept
  alive by the owning server; ``P:who:ROOM`` and ``P:rooms`` (sorted sets scored by expiry time)
  say who is in which room. A server that dies stops refreshing: its people vanish within the TTL.

The Redis server is shared infrastructure that carries every line: use ``rediss://`` (TLS) and a
password in the URL (``rediss://:PASSWORD@host:6380/0``) anywhere but loopback, and run it with
``appendonly yes`` so a Redis restart keeps the history (``appendfsync always`` to lose nothing on a
crash of Redis itself). Redis Cluster is not supported: the script touches several keys at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from securechat.store.redis_config import (
    COMMAND_TIMEOUT,
    Backoff,
    RedisConfig,
    RedisStartError,
    describe_redis_error,
    redact,
    redis_errors,
    redis_module,
)
from securechat.store.roomlog import KINDS, Deliver, Entry, RoomLog
from securechat.wire import protocol
from securechat.wire.conn import batched_wakeups
from securechat.wire.ids import id_key
from securechat.wire.ids import room_key as roomlog_room_key

log = logging.getLogger("securechat.redis")


# How long the reader's XREAD BLOCK waits before it looks at its stop flag again: bounds how long
# close() waits for it. A new line wakes it at once, so this costs no latency; an idle server costs
# Redis ten empty round trips a second.
READ_BLOCK_MS = 100

# Entries taken per XREAD: a few thousand chat lines is a few hundred KiB.
READ_COUNT = 1000

# Lines sent to Redis in one pipelined round trip: large enough that a burst costs a few round
# trips, small enough that one batch is a few hundred KiB at most (4 KiB lines).
WRITE_BATCH = 256

# Lines waiting for Redis on this server: at 10 lines/s per person and 1000 people this is ten
# seconds of a flat-out room, or hours of a normal one; beyond it, during a long Redis outage,
# new lines reach only this server's people (they are delivered, never shared later), and this is
# logged. The appender never waits.
QUEUE_LIMIT = 100_000

# The firehose only has to cover the catch-up of a server that lost Redis for a while: 100,000
# lines (about 20 MB in Redis) is minutes of a flat-out cluster, days of a normal one. Each room's
# stream keeps its history (``history_lines``).
LOG_CAP = 100_000
HISTORY_LINES = 10_000


# A graceful close waits this long for Redis to take the lines still queued.
CLOSE_FLUSH_SECONDS = 5.0


# Private messages waiting for one server; a person reads them in real time, so this only bounds
# a server that is gone.
INBOX_CAP = 10_000

# The dedupe record of a server's sequence numbers outlives any retry by far.
SEQ_TTL_MS = 7 * 24 * 3600 * 1000

# How often the writer trims every room, inbox and the firehose by age (--history-days): a SCAN and
# one pipelined XTRIM a minute; a line outlives its age by at most this.
TRIM_EVERY = 60.0
# Keys asked for per SCAN step while trimming.
TRIM_SCAN_COUNT = 500

# Lengths a line read back from Redis may have: what the protocol allows, with room to spare for
# room names; anything longer did not come from a securechat server.
_MAX_FIELD = protocol.MAX_LINE_BYTES

# Writes the line to the firehose and to its room with the same id, once per (origin, seq).
# KEYS: log, room stream, seq key; ARGV: seq, log cap, room cap (0: none, -1: no history), seq ttl
# ms, then the fields.
_APPEND_LUA = """
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[3]) or '-1')
if seq <= last then return false end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
local cap = tonumber(ARGV[3])
if cap > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', cap, id, unpack(fields))
elseif cap == 0 then
  redis.call('XADD', KEYS[2], id, unpack(fields))
end
return id
"""

# A private message for someone online (not stored): to the inbox of the server holding the nick,
# once per (origin, seq). KEYS: the nick's key, seq key; ARGV: seq, seq ttl ms, inbox key prefix,
# inbox cap, then fields. Returns the holder's origin, or false (nobody holds it, or seen already).
# The recipient's name is written as the holder spells it.
_ROUTE_LUA = """
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
if seq <= last then return false end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local holder = redis.call('GET', KEYS[1])
if not holder then return false end
local origin, display = string.match(holder, '^([^\t]*)\t(.*)$')
if not origin then return false end
local fields = {}
for i = 5, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  -- the recipient as its holder spells it, whatever case the sender typed
  if name == 'g' then value = display elseif name == 'r' then value = '@' .. display end
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('XADD', ARGV[3] .. origin, 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
return origin
"""


class _Pending:
    """One of this server's lines on its way through Redis."""

    __slots__ = ("seq", "entry", "store", "echoed")

    def __init__(self, seq: int, entry: Entry, store: bool) -> None:
        self.seq = seq
        self.entry = entry  # with a provisional id, used only if it must be delivered locally
        self.store = store  # False: a private message routed to its recipient's server, kept nowhere
        self.echoed = False  # delivered locally already (Redis was unreachable): skip it when read back


class RedisRoomLog(RoomLog):
    """A :class:`~securechat.store.roomlog.RoomLog` shared by every server on one Redis.

    ``append`` puts the line in a bounded queue; a writer thread sends queued lines in pipelined
    batches, and a reader thread follows the firehose and calls ``deliver`` for every line of every
    room, this server's included, in the firehose's order: one order per room on every server.

    While Redis is unreachable (restart, network), the server *degrades*: its own lines (those on
    their way and every new one) are delivered locally at once, with provisional ids, and stay
    queued; when Redis is back they are written, the other servers get them, and this server skips
    them when they come back. Lines said on other servers meanwhile arrive when the reader
    reconnects, resuming from the last id it saw: nothing lost, nothing twice, each sender's order
    kept. Provisional ids are not stream ids, so a client that reconnects with one may be replayed a
    few lines twice or miss them: the one approximation, and only during an outage.
    """

    def __init__(
        self,
        config: RedisConfig,
        *,
        history_lines: int = HISTORY_LINES,
        history_seconds: float = 0.0,
        history: bool = True,
        room_key: Callable[[str], str] = roomlog_room_key,
        nick_key: Callable[[str], str] = protocol.nick_key,
        queue_limit: int = QUEUE_LIMIT,
        log_cap: int = LOG_CAP,
    ) -> None:
        self.config = config
        self.origin = config.origin
        self.history_lines = max(0, history_lines)  # 0: no limit by count
        self.history_seconds = history_seconds  # 0: no limit by age
        self.history = history  # False (--no-history): rooms' streams are not written at all
        self.room_key = room_key
        self.nick_key = nick_key
        self.queue_limit = queue_limit
        self.log_cap = log_cap
        self._deliver: Deliver | None = None
        # One lock orders everything about this server's own lines: append, the switch to local
        # delivery and the reader's skipping of lines already shown. Reentrant: deliver may append.
        self._lock = threading.RLock()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._pending: dict[int, _Pending] = {}  # by seq: appended, not yet read back
        self._echoed = 0  # how many of _pending were delivered locally (while Redis was away)
        self._seq = 0
        self._last = (0, 0)  # the newest id delivered, stream or provisional
        self._degraded = False
        self._writer_ok = True
        self._reader_ok = True
        self._unshared = 0  # lines delivered only here because the queue was full
        self._marks: dict[str, dict[str, str]] = {}  # person -> read positions not yet written
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client: Any = None
        self._history_warned = False
        self._log_key = config.key("log")
        self._inbox_key = config.key("inbox", self.origin)
        self._seq_key = config.key("seq", self.origin)
        self.written = 0  # lines written to Redis by this server (for tests and the benchmark)

    # -- RoomLog ---------------------------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        """Connect, start following from the firehose's current end, start the threads.

        Raises RedisStartError (one line) if Redis cannot be used.
        """
        self.config.check()
        self._deliver = deliver
        self._client = self.config.client()
        errors = redis_errors()
        try:
            top = self._client.xrevrange(self._log_key, "+", "-", count=1)
        except errors as exc:
            raise RedisStartError(f"cannot use Redis at {redact(self.config.url)}: "
                                  f"{describe_redis_error(exc)}") from None
        start_id = top[0][0] if top else "0-0"
        self._last = max(self._last, id_key(start_id))
        self._threads = [
            threading.Thread(target=self._read_loop, args=(start_id,), name="securechat-redis-reader", daemon=True),
            threading.Thread(target=self._write_loop, name="securechat-redis-writer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def append(self, room: str, kind: str, sender: str, text: str, target: str = "", *, store: bool = True) -> None:
        """Queue a line for Redis; never blocks on it (see the class docstring for outages).

        ``store=False`` (a private message to someone online): it goes to the inbox stream of the
        server holding ``target``, and is kept in no room's history.
        """
        with self._lock:
            self._seq += 1
            entry = Entry(room, "", time.time(), kind, sender, text, target, self.origin)
            pending = _Pending(self._seq, entry, store or kind != "private")
            if len(self._queue) >= self.queue_limit:
                # Redis has not taken lines for a long while: deliver here, never share this one.
                self._degrade("the queue of lines for Redis is full")
                self._unshared += 1
                if self._unshared == 1:
                    log.error("%d lines are waiting for Redis: new lines reach only this server's people until "
                              "it catches up", self.queue_limit)
                self._echo(pending)
                return
            self._queue.append(pending)
            self._pending[pending.seq] = pending
            if self._degraded:
                self._echo(pending)
        self._wake.set()

    def read_after(self, room: str, after_id: str | None, limit: int) -> list[Entry]:
        """Stored entries of ``room`` after ``after_id``, oldest first ([] while Redis is unreachable)."""
        start = "-" if after_id is None else f"({after_id}"
        return self._read_range(room, lambda c, k: c.xrange(k, start, "+", count=limit))

    def read_before(self, room: str, before_id: str | None, limit: int) -> list[Entry]:
        """The last ``limit`` stored entries of ``room`` before ``before_id``, oldest first."""
        end = "+" if before_id is None else f"({before_id}"
        return self._read_range(room, lambda c, k: list(reversed(c.xrevrange(k, end, "-", count=limit))))

    def marks(self, person: str) -> dict[str, str]:
        """A person's read positions (mutual TLS), kept in Redis for every server."""
        with self._lock:
            waiting = self._marks.get(person)
        if waiting is not None:
            return dict(waiting)
        assert self._client is not None, "start() first"
        try:
            return dict(self._client.hgetall(self.config.key("marks", person)))
        except redis_errors() as exc:
            log.error("read positions unavailable while Redis is unreachable: %s", describe_redis_error(exc))
            return {}

    def set_marks(self, person: str, marks: dict[str, str]) -> None:
        """Replace a person's read positions; written by the writer thread, never blocking."""
        with self._lock:
            self._marks[person] = dict(marks)
        self._wake.set()

    def close(self) -> None:
        """Write what is queued (for up to CLOSE_FLUSH_SECONDS if Redis is away), then stop."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(CLOSE_FLUSH_SECONDS + READ_BLOCK_MS / 1000 + COMMAND_TIMEOUT)
        with self._lock:
            lost = len(self._queue)
        if lost:
            log.error("%d lines could not be written to Redis before stopping", lost)
        if self._client is not None:
            self._client.close()

    # -- state -----------------------------------------------------------------------------

    @property
    def stores(self) -> bool:
        """False under --no-history: nothing is kept, nothing replayed."""
        return self.history

    @property
    def degraded(self) -> bool:
        """True while lines are delivered locally because Redis is unreachable."""
        return self._degraded

    @property
    def queued(self) -> int:
        """Lines waiting for Redis."""
        return len(self._queue)

    def _provisional_id(self) -> str:
        ms = max(int(time.time() * 1000), self._last[0])
        seq = self._last[1] + 1 if ms == self._last[0] else 0
        self._last = (ms, seq)
        return f"{ms}-{seq}"

    def _echo(self, pending: _Pending) -> None:
        """Deliver one of this server's lines locally, now (lock held)."""
        pending.echoed = True
        if pending.seq in self._pending:
            self._echoed += 1  # one more to skip when it comes back from Redis
        assert self._deliver is not None
        self._deliver(replace(pending.entry, id=self._provisional_id()))

    def _degrade(self, why: str) -> None:
        """Switch to local delivery: first every own line not delivered yet, in order (lock held)."""
        if self._degraded:
            return
        self._degraded = True
        log.warning("Redis unreachable (%s): local chat goes on; lines are shared when it is back", why)
        for pending in self._pending.values():
            if not pending.echoed:
                self._echo(pending)

    def _set_health(self, *, writer: bool | None = None, reader: bool | None = None, why: str = "") -> None:
        with self._lock:
            if writer is not None:
                self._writer_ok = writer
            if reader is not None:
                self._reader_ok = reader
            if not (self._writer_ok and self._reader_ok):
                self._degrade(why)
            elif self._degraded and not self._echoed:
                # Everything shown locally has come back from Redis: one order again.
                self._degraded = False
                self._unshared = 0
                log.warning("Redis is back: lines are shared again")

    # -- writer ----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        errors = redis_errors()
        client = self.config.client(single=True)
        # EVALSHA straight into the pipeline: redis-py's Script objects would ask SCRIPT EXISTS
        # before every pipeline, a second round trip per batch. NOSCRIPT (Redis restarted) reloads.
        shas: dict[str, str] = {}
        no_script = redis_module().exceptions.NoScriptError
        backoff = Backoff()
        deadline: float | None = None
        trimmed = time.monotonic() - TRIM_EVERY  # the first pass at once: a restart must not wait a minute
        batch: list[_Pending] = []
        marks: dict[str, dict[str, str]] = {}
        while True:
            if self.history_seconds and time.monotonic() - trimmed > TRIM_EVERY:
                trimmed = time.monotonic()
                self._trim(client)
            if not batch and not marks:
                with self._lock:
                    batch = [self._queue[i] for i in range(min(WRITE_BATCH, len(self._queue)))]
                    marks, self._marks = self._marks, {}
                if not batch and not marks:
                    if self._stop.is_set():
                        break
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + CLOSE_FLUSH_SECONDS
                if time.monotonic() > deadline:
                    break
            try:
                if not shas:
                    shas = {"append": client.script_load(_APPEND_LUA), "route": client.script_load(_ROUTE_LUA)}
                pipe = client.pipeline(transaction=False)
                for pending in batch:
                    self._queue_write(pipe, pending, shas)
                for person, positions in marks.items():
                    key = self.config.key("marks", person)
                    pipe.delete(key)
                    if positions:
                        pipe.hset(key, mapping=positions)
                results = pipe.execute()
            except errors as exc:
                if isinstance(exc, no_script):  # a restarted Redis: load the scripts, send again (written once)
                    shas = {}
                    continue
                self._set_health(writer=False, why=describe_redis_error(exc))
                backoff.wait(self._stop if deadline is None else threading.Event())
                continue
            with self._lock:
                for pending, result in zip(batch, results, strict=False):
                    self._queue.popleft()
                    if not pending.store and result != self.origin:
                        # Routed to another server's inbox (or to nobody): it never comes back here.
                        if self._pending.pop(pending.seq, None) is not None and pending.echoed:
                            self._echoed -= 1
                for person, positions in marks.items():
                    self._marks.setdefault(person, positions)  # unless newer ones came meanwhile
                    if self._marks[person] is positions:
                        del self._marks[person]
            self.written += len(batch)
            batch, marks = [], {}
            if backoff.delay:
                backoff.reset()
            self._set_health(writer=True)
        client.close()

    def _queue_write(self, pipe: Any, pending: _Pending, shas: dict[str, str]) -> None:
        """Add one line's script call to the pipeline."""
        entry = pending.entry
        fields = ["r", entry.room, "k", entry.kind, "s", entry.sender, "t", entry.text, "g", entry.target,
                  "o", self.origin, "q", pending.seq, "ts", repr(entry.ts)]
        if not pending.store:
            pipe.evalsha(shas["route"], 2, self.config.key("nick", self.nick_key(entry.target)), self._seq_key,
                         pending.seq, SEQ_TTL_MS, self.config.key("inbox", ""), INBOX_CAP, *fields)
            return
        room_stream = self.config.key("room", self.room_key(entry.room))
        pipe.evalsha(shas["append"], 3, self._log_key, room_stream, self._seq_key,
                     pending.seq, self.log_cap, self.history_lines if self.history else -1, SEQ_TTL_MS, *fields)

    def _trim(self, client: Any) -> None:
        """Forget every line older than history_seconds: in every room (quiet ones too, whoever wrote
        them), every stored and routed private message, and the firehose.

        Exact, by id (a stream id is its line's time in ms): ``XTRIM MINID`` without ``~``, which would
        keep any partly filled node, that is every line of a quiet room. Every server does it; it is
        idempotent.
        """
        cutoff = f"{int((time.time() - self.history_seconds) * 1000)}-0"
        with contextlib.suppress(*redis_errors()):
            keys = [self._log_key]
            for pattern in (self.config.key("room", "*"), self.config.key("inbox", "*")):
                keys += client.scan_iter(match=pattern, count=TRIM_SCAN_COUNT, _type="stream")
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.xtrim(key, minid=cutoff, approximate=False)
            pipe.execute()

    # -- reader ----------------------------------------------------------------------------

    def _read_loop(self, start_id: str) -> None:
        errors = redis_errors()
        client = self.config.client(timeout=COMMAND_TIMEOUT + READ_BLOCK_MS / 1000, single=True)
        positions = {self._log_key: start_id, self._inbox_key: "0-0"}
        backoff = Backoff()
        resumed = False
        while not self._stop.is_set():
            try:
                if resumed:
                    self._check_gap(client, positions[self._log_key])
                    resumed = False
                reply = client.xread(positions, count=READ_COUNT, block=READ_BLOCK_MS)
            except errors as exc:
                self._set_health(reader=False, why=describe_redis_error(exc))
                backoff.wait(self._stop)
                resumed = True
                continue
            if backoff.delay:
                backoff.reset()
            with batched_wakeups():  # each member's thread is woken once per batch, not once per line
                for stream, items in reply or ():
                    for entry_id, fields in items:
                        positions[stream] = entry_id
                        self._receive(entry_id, fields)
            self._set_health(reader=True)
        client.close()

    def _check_gap(self, client: Any, last_seen: str) -> None:
        """Log if the firehose was trimmed past what this server had read while disconnected."""
        info = client.xinfo_stream(self._log_key) if client.exists(self._log_key) else {}
        deleted = str(info.get("max-deleted-entry-id", "0-0"))
        if id_key(deleted) > id_key(last_seen):
            log.error("the Redis log was trimmed past this server's position while it was disconnected: some lines "
                      "said on other servers were not delivered here (raise the firehose cap)")

    def _receive(self, entry_id: str, fields: dict[str, str]) -> None:
        entry = _decode(entry_id, fields)
        if entry is None:
            log.warning("skipped a malformed entry %s in the Redis log", entry_id)
            return
        with self._lock:
            if entry.room[:1] != "@":  # inbox ids come from another stream
                self._last = max(self._last, id_key(entry_id))
            if entry.origin == self.origin:
                pending = self._pending.pop(_int(fields.get("q")), None)
                if pending is not None and pending.echoed:
                    self._echoed -= 1
                    return  # shown here while Redis was away
            assert self._deliver is not None
            try:
                self._deliver(entry)
            except Exception:  # the room code's bug must not stop delivery for everyone
                log.exception("delivering %s failed", entry_id)

    # -- history ---------------------------------------------------------------------------

    def _read_range(self, room: str, query: Callable[[Any, str], list[Any]]) -> list[Entry]:
        assert self._client is not None, "start() first"
        try:
            items = query(self._client, self.config.key("room", self.room_key(room)))
        except redis_errors() as exc:
            if not self._history_warned:
                self._history_warned = True
                log.error("history unavailable while Redis is unreachable: %s", describe_redis_error(exc))
            return []
        self._history_warned = False
        return [e for e in (_decode(i, f) for i, f in items) if e is not None]


def _int(value: str | None) -> int:
    try:
        return int(value or "")
    except ValueError:
        return -1


def _decode(entry_id: str, fields: dict[str, str]) -> Entry | None:
    """An Entry from a stream entry's fields, or None if it is not one of ours.

    Whoever can write to Redis can write anything; what reaches a terminal is sanitised again.
    """
    kind = fields.get("k", "")
    room = fields.get("r", "")
    if kind not in KINDS or not room or any(len(v) > _MAX_FIELD for v in fields.values()):
        return None
    try:
        ts = float(fields.get("ts", "0"))
    except ValueError:
        ts = 0.0
    return Entry(
        room=protocol.sanitize(room),
        id=entry_id,
        ts=ts,
        kind=kind,
        sender=protocol.sanitize(fields.get("s", "")),
        text=protocol.sanitize(fields.get("t", "")),
        target=protocol.sanitize(fields.get("g", "")),
        origin=fields.get("o", ""),
    )
