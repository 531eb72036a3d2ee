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
from typing import Any

from securechat.store.redis_config import (
    BACKOFF_FIRST,
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
# seconds of a flat-out room, or hours of a normal one. While Redis is unreachable lines wait here
# (nobody sees them until Redis has given them their ids); beyond this bound a new line is refused
# and its sender told so. The appender never waits.
QUEUE_LIMIT = 100_000

# The firehose only has to cover the catch-up of a server that lost Redis for a while: 100,000
# lines (about 20 MB in Redis) is minutes of a flat-out cluster, days of a normal one. Each room's
# stream keeps its history (``history_lines``).
LOG_CAP = 100_000
HISTORY_LINES = 10_000


# A graceful close waits this long for Redis to take the lines still queued.
CLOSE_FLUSH_SECONDS = 5.0

# A line written but not read back after this long is sent again (written once: the script skips what
# it has): the primary that took it died before its replica had it. Far beyond the reader's usual lag
# (milliseconds), so a busy cluster does not resend what is merely on its way.
SEND_AGAIN_AFTER = 5.0

# How often the reader checks, through Sentinel, that the replica it follows is in sync (one INFO).
FOLLOW_CHECK_EVERY = 5.0

# A history read (a join's replay, a resume's catch-up) retries this long while Redis is unreachable:
# a restart or a Sentinel failover with short timeouts is over by then. Beyond, it reads nothing and
# says so in the log.
READ_WAIT = 3.0

# Delivery paused this long (Redis unreachable) before the room code is told, so that it can tell its
# people why nothing arrives; a failover with short Sentinel timeouts is over before.
PAUSE_NOTICE_AFTER = 2.0

# Servers whose last sequence number the reader remembers per stream, to skip a line written twice
# (a batch re-sent after a failover): each server process is one origin; a cluster has dozens.
MAX_ORIGINS = 1000


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

# Each server's lines reach Redis once and in its order: its sequence numbers, each written at most
# once and never past a gap (a pipeline half refused, by NOSCRIPT after a Redis restart, say, must not
# let a later line in before an earlier one, which would then be skipped for good). ``floor`` is the
# sender's oldest line not yet read back: a gap below it cannot be filled by anyone, and is crossed.
# SEQ_KEY names the sequence-number key; ARGV: seq, floor, the key's ttl ms. False: written already.
_SEQ_LUA = """
local seq, floor = tonumber(ARGV[1]), tonumber(ARGV[2])
local last = tonumber(redis.call('GET', SEQ_KEY) or '-1')
if seq <= last then return false end
if seq > last + 1 and last + 1 >= floor then return redis.error_reply('SEQGAP ' .. last) end
redis.call('SET', SEQ_KEY, ARGV[1], 'PX', ARGV[3])
"""

# Writes the line to the firehose and to its room with the same id, once per (origin, seq).
# KEYS: log, room stream, seq key[, session]; ARGV: seq, floor, seq ttl ms, log cap, room cap (0: none,
# -1: no history), then the fields. With a session key (a departure that ends a resumable session):
# written only if no other server has taken the session over (its record names this server, or says
# this server ended it), and the session ends with it (so it cannot be taken over afterwards): a
# departure is announced once, or the person goes on elsewhere, never both.
_APPEND_LUA = _SEQ_LUA.replace("SEQ_KEY", "KEYS[3]") + """
local fields = {}
local origin = ''
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
for i = 6, #ARGV - 1, 2 do if ARGV[i] == 'o' then origin = ARGV[i + 1] end end
if KEYS[4] then
  local holder = redis.call('HGET', KEYS[4], 'origin')
  if holder and holder ~= origin and holder ~= 'ended:' .. origin then return false end
  if holder then redis.call('HSET', KEYS[4], 'origin', 'ended:' .. origin) end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
local cap = tonumber(ARGV[5])
if cap > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', cap, id, unpack(fields))
elseif cap == 0 then
  redis.call('XADD', KEYS[2], id, unpack(fields))
end
return id
"""

# A private message for someone online (not stored): to the inbox of the server holding the nick,
# once per (origin, seq). KEYS: the nick's key, seq key; ARGV: seq, floor, seq ttl ms, inbox key
# prefix, inbox cap, then fields. Returns the holder's origin, or false (nobody holds it, or seen
# already). The recipient's name is written as the holder spells it.
_ROUTE_LUA = _SEQ_LUA.replace("SEQ_KEY", "KEYS[2]") + """
local holder = redis.call('GET', KEYS[1])
if not holder then return false end
local origin, display = string.match(holder, '^([^\t]*)\t(.*)$')
if not origin then return false end
local fields = {}
for i = 6, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  -- the recipient as its holder spells it, whatever case the sender typed
  if name == 'g' then value = display elseif name == 'r' then value = '@' .. display end
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('XADD', ARGV[4] .. origin, 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
return origin
"""


class _Pending:
    """One of this server's lines on its way through Redis."""

    __slots__ = ("seq", "entry", "store", "session", "written", "written_at")

    def __init__(self, seq: int, entry: Entry, store: bool, session: str) -> None:
        self.seq = seq
        self.entry = entry  # its id is "" until Redis gives it one
        self.store = store  # False: a private message routed to its recipient's server, kept nowhere
        self.session = session  # a departure's session key: written only if the session is still ours
        self.written = False  # Redis took it; it stays pending until the reader sees it come back
        self.written_at = 0.0  # when (time.monotonic())


class RedisRoomLog(RoomLog):
    """A :class:`~securechat.store.roomlog.RoomLog` shared by every server on one Redis.

    ``append`` puts the line in a bounded queue; a writer thread sends queued lines in pipelined
    batches, and a reader thread follows the firehose and calls ``deliver`` for every line of every
    room, this server's included, in the firehose's order: one order per room on every server.

    **Exactly once, in order: a line is delivered to nobody before Redis has given it its final id**,
    so every id a client, a read position or a resume ever sees is a stream id that means the same on
    every server, through a Redis restart, a network cut or a Sentinel failover:

    - While Redis is unreachable nothing is delivered: lines wait in the queue, in order, and go out
      when it is back (a restart or a failover: a second or two). The room code is told when delivery
      has been paused for PAUSE_NOTICE_AFTER seconds, and when it resumes.
    - A line is done only when the reader has read it back; until then it is kept, and after an error
      (or SEND_AGAIN_AFTER seconds) the writer sends again, in order, every line not read back. The
      scripts write each (server, sequence number) once and never past a gap the server can still
      fill, so a resent line that did reach Redis is not written twice, a pipeline refused half-way
      cannot reorder lines, and one lost with a primary that died before its replica had it is
      written again on the new primary.
    - Through Sentinel the reader follows a *replica* while one is in sync: a line is delivered only
      once a replica has it, so the primary's death cannot take back a line someone has seen (the
      replica Sentinel promotes is the most up to date). History is read from the primary, but only
      up to the last id the reader has delivered (newer lines arrive live).
    - The reader also skips a (server, sequence number) it has delivered already, whatever its id.
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
        self._on_pause: Callable[[bool], None] | None = None
        # Guards the queue and the pending lines (never held while delivering or talking to Redis).
        self._lock = threading.Lock()
        # Lines not sent yet, in sequence order; every line sent but not read back is older than all of
        # them. Only the writer takes from the left (append adds at the right), so a batch stays its front.
        self._queue: collections.deque[_Pending] = collections.deque()
        self._pending: dict[int, _Pending] = {}  # by seq: appended, not yet read back, in seq order
        self._rewind = False  # send again every line not read back (the writer does it, between batches)
        self._seq = 0
        self._refused = 0  # lines refused in a row because the queue was full
        self._writer_ok = True
        self._reader_ok = True
        self._paused_since: float | None = None  # when Redis became unreachable (None: it is not)
        self._pause_told = False
        # The newest firehose id delivered: history reads stop there (newer lines come live).
        self._watermark: str | None = None
        self._seen: dict[str, dict[str, int]] = {}  # stream -> origin -> last sequence number delivered
        self._marks: dict[str, dict[str, str]] = {}  # person -> read positions not yet written
        self._stop = threading.Event()
        self._wake = threading.Event()
        # The reader got an answer from Redis again (or close() was called): the writer need not sit out
        # the rest of its backoff, so a server's own lines go out as soon as others' come in.
        self._answering = threading.Event()
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
        self._watermark = start_id if top else None
        self._threads = [
            threading.Thread(target=self._read_loop, args=(start_id,), name="securechat-redis-reader", daemon=True),
            threading.Thread(target=self._write_loop, name="securechat-redis-writer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def watch(self, on_pause: Callable[[bool], None]) -> None:
        """``on_pause(True)`` once delivery has been paused for PAUSE_NOTICE_AFTER s, ``on_pause(False)`` when
        it resumes (called on the log's threads)."""
        self._on_pause = on_pause

    def append(self, room: str, kind: str, sender: str, text: str, target: str = "", *, store: bool = True,
               session: str = "") -> bool:
        """Queue a line for Redis; never blocks on it. False (nothing queued) when QUEUE_LIMIT lines wait already.

        ``store=False`` (a private message to someone online): it goes to the inbox stream of the
        server holding ``target``, and is kept in no room's history. ``session``: see RoomLog.append.
        """
        with self._lock:
            if len(self._queue) >= self.queue_limit:
                self._refused += 1
                refused = self._refused
            else:
                self._refused = refused = 0
                self._seq += 1
                entry = Entry(room, "", time.time(), kind, sender, text, target, self.origin)
                pending = _Pending(self._seq, entry, store or kind != "private",
                                   self.config.session_key(session) if session else "")
                self._queue.append(pending)
                self._pending[pending.seq] = pending
        if refused:
            if refused == 1:
                log.error("%d lines are waiting for Redis: new lines are refused until it takes them", self.queue_limit)
            return False
        self._wake.set()
        return True

    def read_after(self, room: str, after_id: str | None, limit: int) -> list[Entry]:
        """Stored entries of ``room`` after ``after_id`` (up to the last one delivered here), oldest first."""
        start = "-" if after_id is None else f"({after_id}"
        return self._read_range(room, lambda c, k, top: c.xrange(k, start, top, count=limit))

    def read_before(self, room: str, before_id: str | None, limit: int) -> list[Entry]:
        """The last ``limit`` stored entries of ``room`` before ``before_id``, oldest first."""

        def query(client: Any, key: str, top: str) -> list[Any]:
            end = top if before_id is None or (top != "+" and id_key(top) < id_key(before_id)) else f"({before_id}"
            return list(reversed(client.xrevrange(key, end, "-", count=limit)))

        return self._read_range(room, query)

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
        self._answering.set()
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
    def paused(self) -> bool:
        """True while Redis is unreachable: lines wait, nothing is delivered."""
        return self._paused_since is not None

    @property
    def queued(self) -> int:
        """Lines waiting for Redis."""
        return len(self._queue)

    def _set_health(self, *, writer: bool | None = None, reader: bool | None = None, why: str = "") -> None:
        tell: bool | None = None
        with self._lock:
            if writer is not None:
                self._writer_ok = writer
            if reader is not None:
                self._reader_ok = reader
            if not (self._writer_ok and self._reader_ok):
                if self._paused_since is None:
                    self._paused_since = time.monotonic()
                    log.warning("Redis unreachable (%s): lines wait, in order, and are delivered when it is back", why)
                elif not self._pause_told and time.monotonic() - self._paused_since >= PAUSE_NOTICE_AFTER:
                    self._pause_told = tell = True
            elif self._paused_since is not None:
                log.warning("Redis is back after %.1f s: delivery goes on", time.monotonic() - self._paused_since)
                self._paused_since = None
                if self._pause_told:
                    self._pause_told, tell = False, False
        if tell is not None and self._on_pause is not None:
            self._on_pause(tell)

    def _send_again(self) -> None:
        """Have the writer send again every line written but not read back (the script writes it once)."""
        with self._lock:
            self._rewind = True
        self._wake.set()

    def _next_batch(self) -> tuple[list[_Pending], int]:
        """The writer's next lines (lock held), after a rewind if one was asked for; and the oldest one pending."""
        if self._rewind or (self._pending and not self._queue and
                            time.monotonic() - next(iter(self._pending.values())).written_at > SEND_AGAIN_AFTER):
            # A primary that died before its replica had them took lines with it, and the reader never
            # sees them: everything not read back is sent again, in order, before anything newer.
            self._rewind = False
            again = [p for p in self._pending.values() if p.written]
            for pending in reversed(again):
                pending.written = False
                self._queue.appendleft(pending)
        batch = [self._queue[i] for i in range(min(WRITE_BATCH, len(self._queue)))]
        floor = next(iter(self._pending)) if self._pending else 0
        return batch, floor

    # -- writer ----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        errors = redis_errors()
        client = self.config.client(single=True)
        # EVALSHA straight into the pipeline: redis-py's Script objects would ask SCRIPT EXISTS
        # before every pipeline, a second round trip per batch. NOSCRIPT (Redis restarted) reloads.
        shas: dict[str, str] = {}
        no_script = redis_module().exceptions.NoScriptError
        backoff = Backoff(self.config.backoff_max)
        deadline: float | None = None
        trimmed = time.monotonic() - TRIM_EVERY  # the first pass at once: a restart must not wait a minute
        while True:
            if self.history_seconds and time.monotonic() - trimmed > TRIM_EVERY:
                trimmed = time.monotonic()
                self._trim(client)
            with self._lock:
                batch, floor = self._next_batch()
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
                    self._queue_write(pipe, pending, floor, shas)
                for person, positions in marks.items():
                    key = self.config.key("marks", person)
                    pipe.delete(key)
                    if positions:
                        pipe.hset(key, mapping=positions)
                # Each reply on its own: a pipeline can be refused half-way (NOSCRIPT, a gap).
                results = pipe.execute(raise_on_error=False)
                refused = next((r for r in results if isinstance(r, Exception)), None)
                if refused is not None:
                    raise refused
            except errors as exc:
                with self._lock:
                    for person, positions in marks.items():
                        self._marks.setdefault(person, positions)  # unless newer ones came meanwhile
                self._send_again()  # whatever part of the batch Redis took is skipped when sent again
                if isinstance(exc, no_script):  # a restarted Redis: load the scripts, send again (written once)
                    shas = {}
                    continue
                if str(exc).startswith("SEQGAP"):  # an older line must go first: the rewind sends it
                    continue
                self._set_health(writer=False, why=describe_redis_error(exc))
                if deadline is None:
                    backoff.wait(self._answering)
                    self._answering.clear()
                else:  # stopping: flush for up to CLOSE_FLUSH_SECONDS, at the backoff's pace
                    backoff.wait(threading.Event())
                continue
            now = time.monotonic()
            with self._lock:
                for pending, result in zip(batch, results, strict=False):
                    self._queue.popleft()  # the batch is the queue's front: only this thread takes from it
                    pending.written, pending.written_at = True, now
                    if not pending.store and result != self.origin:
                        # Routed to another server's inbox (or to nobody): it never comes back here.
                        self._pending.pop(pending.seq, None)
                    elif pending.session and result is None:
                        self._pending.pop(pending.seq, None)  # a departure from a session resumed elsewhere
            self.written += len(batch)
            if backoff.delay:
                backoff.reset()
            self._set_health(writer=True)
        client.close()

    def _queue_write(self, pipe: Any, pending: _Pending, floor: int, shas: dict[str, str]) -> None:
        """Add one line's script call to the pipeline (``floor``: the oldest line not read back)."""
        entry = pending.entry
        fields = ["r", entry.room, "k", entry.kind, "s", entry.sender, "t", entry.text, "g", entry.target,
                  "o", self.origin, "q", pending.seq, "ts", repr(entry.ts)]
        if not pending.store:
            pipe.evalsha(shas["route"], 2, self.config.key("nick", self.nick_key(entry.target)), self._seq_key,
                         pending.seq, floor, SEQ_TTL_MS, self.config.key("inbox", ""), INBOX_CAP, *fields)
            return
        room_stream = self.config.key("room", self.room_key(entry.room))
        keys = [self._log_key, room_stream, self._seq_key, *([pending.session] if pending.session else [])]
        pipe.evalsha(shas["append"], len(keys), *keys, pending.seq, floor, SEQ_TTL_MS,
                     self.log_cap, self.history_lines if self.history else -1, *fields)

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
        timeout = COMMAND_TIMEOUT + READ_BLOCK_MS / 1000
        primary = self.config.client(timeout=timeout, single=True)
        # Through Sentinel, a replica's copy when it follows the primary: a line is delivered once it
        # survives the primary's death. A replica still syncing (or cut off from the primary) would only
        # be late: then the primary's, as without a replica (a dying primary could take nothing a
        # replica in sync has not got anyway).
        replica = self.config.client(timeout=timeout, single=True, replica=True) if self.config.sentinel else None
        client, chosen = primary, 0.0
        positions = {self._log_key: start_id, self._inbox_key: "0-0"}
        backoff = Backoff(self.config.backoff_max)
        resumed = False
        while not self._stop.is_set():
            try:
                if replica is not None and (resumed or time.monotonic() - chosen > FOLLOW_CHECK_EVERY):
                    client, chosen = (replica if _in_sync(replica) else primary), time.monotonic()
                if resumed:
                    self._check_gap(client, positions[self._log_key])
                    resumed = False
                reply = client.xread(positions, count=READ_COUNT, block=READ_BLOCK_MS)
            except errors as exc:
                self._set_health(reader=False, why=describe_redis_error(exc))
                self._send_again()  # a failover, perhaps: what the old primary took has to be written again
                backoff.wait(self._stop)
                resumed = True
                continue
            if backoff.delay:
                backoff.reset()
                self._answering.set()
            self._set_health(reader=True)
            with batched_wakeups():  # each loop thread is woken once per batch, not once per line
                for stream, items in reply or ():
                    for entry_id, fields in items:
                        positions[stream] = entry_id
                        self._receive(stream, entry_id, fields)
        for each in (primary, replica):
            if each is not None:
                each.close()

    def _check_gap(self, client: Any, last_seen: str) -> None:
        """Log if the firehose was trimmed past what this server had read while disconnected."""
        info = client.xinfo_stream(self._log_key) if client.exists(self._log_key) else {}
        deleted = str(info.get("max-deleted-entry-id", "0-0"))
        if id_key(deleted) > id_key(last_seen):
            log.error("the Redis log was trimmed past this server's position while it was disconnected: some lines "
                      "said on other servers were not delivered here (raise the firehose cap)")

    def _receive(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        entry = _decode(entry_id, fields)
        if entry is None:
            log.warning("skipped a malformed entry %s in the Redis log", entry_id)
            return
        seq = _int(fields.get("q"))
        if seq >= 0:
            seen = self._seen.setdefault(stream, {})
            if seq <= seen.get(entry.origin, -1):
                log.warning("skipped %s: a line written twice (server %s, line %d)", entry_id, entry.origin, seq)
                return
            seen.pop(entry.origin, None)
            seen[entry.origin] = seq  # the newest at the end: the oldest server is forgotten first
            if len(seen) > MAX_ORIGINS:
                del seen[next(iter(seen))]
        if entry.origin == self.origin:
            with self._lock:
                self._pending.pop(seq, None)
        if stream == self._log_key:
            self._watermark = entry_id
        assert self._deliver is not None
        try:
            self._deliver(entry)
        except Exception:  # the room code's bug must not stop delivery for everyone
            log.exception("delivering %s failed", entry_id)

    # -- history ---------------------------------------------------------------------------

    def _read_range(self, room: str, query: Callable[[Any, str, str], list[Any]]) -> list[Entry]:
        """Run ``query(client, room stream, newest id to return)``, retrying up to READ_WAIT while Redis is away."""
        assert self._client is not None, "start() first"
        deadline = time.monotonic() + READ_WAIT
        delay = BACKOFF_FIRST
        while True:
            try:
                items = query(self._client, self.config.key("room", self.room_key(room)), self._watermark or "+")
                break
            except redis_errors() as exc:
                if time.monotonic() + delay > deadline or self._stop.is_set():
                    if not self._history_warned:
                        self._history_warned = True
                        log.error("history unavailable while Redis is unreachable: %s", describe_redis_error(exc))
                    raise HistoryUnavailable(describe_redis_error(exc)) from None
                time.sleep(delay)
                delay = min(delay * 2, READ_WAIT / 4)
        self._history_warned = False
        return [e for e in (_decode(i, f) for i, f in items) if e is not None]


class HistoryUnavailable(Exception):
    """Redis stayed unreachable for READ_WAIT seconds: the history could not be read."""


def _in_sync(replica: Any) -> bool:
    """True when ``replica`` is a replica following its primary (not syncing, not cut off, not promoted)."""
    info = replica.info("replication")
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


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
