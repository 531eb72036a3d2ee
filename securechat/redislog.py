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

import argparse
import collections
import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from securechat import options, protocol
from securechat.conn import batched_wakeups
from securechat.roomlog import KINDS, Deliver, Directory, Entry, RoomLog, id_key
from securechat.roomlog import room_key as roomlog_room_key

log = logging.getLogger("securechat.redis")

# Redis answers in well under a millisecond on a LAN; 3 s to connect and 5 s per command only
# trip when it is really gone (or the network is), and then the server degrades to local chat.
CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 5.0

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

# Reconnecting to Redis: quick at first (a restart takes a second), then every 5 s at most, so a
# dead Redis costs each server one attempt per thread every few seconds.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0

# A graceful close waits this long for Redis to take the lines still queued.
CLOSE_FLUSH_SECONDS = 5.0

# Presence: a nick or a room membership lives this long unless the owning server refreshes it
# (three times per TTL). 15 s: a killed server's people leave /who within 15 s, and a refresh
# costs one pipelined round trip every 5 s.
PRESENCE_TTL = 15.0

# How long a resume token stays valid after its server stops refreshing it: the rooms' default
# grace period (--grace passes the server's).
SESSION_GRACE = 60.0

# Directory calls run on a session's thread (a login, /who): Redis answers in under a millisecond,
# so a second means it is gone, and then the directory answers for this server alone.
DIRECTORY_TIMEOUT = 1.0

# Private messages waiting for one server; a person reads them in real time, so this only bounds
# a server that is gone.
INBOX_CAP = 10_000

# The dedupe record of a server's sequence numbers outlives any retry by far.
SEQ_TTL_MS = 7 * 24 * 3600 * 1000

# How often the writer trims each room it wrote to by age (--history-days).
TRIM_EVERY = 60.0

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

# Keeps a nick alive if this server still holds it, or takes it back if it is free (Redis was
# restarted without its data); 0 if another server has it now.
_REFRESH_NICK_LUA = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

# Takes a nick for a resumed session: only if it is free, or still held by the server that gave the
# session (gone, or its client would have resumed there), never from someone who took it since.
# KEYS: the nick; ARGV: new value, ttl ms, the session's origin.
_TAKE_OVER_LUA = """
local v = redis.call('GET', KEYS[1])
if (not v) or string.sub(v, 1, #ARGV[3] + 1) == ARGV[3] .. '\t' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Deletes a nick only if this server holds it.
_RELEASE_NICK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_NOW_MS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Marks a room membership alive until Redis's now + TTL (Redis's clock, so servers' clocks may differ).
# KEYS: who:ROOM, rooms, roomnames; ARGV: nick, ttl ms, room key, room display name.
_TOUCH_LUA = _NOW_MS_LUA + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4])
return 1
"""

# The live members of a sorted set scored by expiry (expired ones are dropped on the way); with
# ARGV[1] non-empty, first marks ARGV[1] alive for ARGV[2] ms. KEYS: the set.
_ALIVE_LUA = _NOW_MS_LUA + """
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# Every live room with how many of its members are on other servers: {display name, count, ...}.
# KEYS: rooms, roomnames; ARGV: the prefix of the who: keys, this server's origin.
_ROOMS_LUA = _NOW_MS_LUA + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local suffix = '\t' .. ARGV[2]
local out = {}
for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local who = ARGV[1] .. key
  redis.call('ZREMRANGEBYSCORE', who, '-inf', now)
  local members = redis.call('ZRANGE', who, 0, -1)
  if #members == 0 then
    redis.call('ZREM', KEYS[1], key)
    redis.call('HDEL', KEYS[2], key)
  else
    local others = 0
    for _, m in ipairs(members) do
      if string.sub(m, -#suffix) ~= suffix then others = others + 1 end
    end
    out[#out + 1] = redis.call('HGET', KEYS[2], key) or key
    out[#out + 1] = others
  end
end
return out
"""


class RedisStartError(Exception):
    """Redis cannot be used: the message is one line for the operator."""


def _redis() -> Any:
    """The redis-py module, imported on first use (it is an optional extra)."""
    try:
        import redis
    except ImportError:
        raise RedisStartError("--redis needs redis-py: pip install 'securechat[redis]'") from None
    return redis


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _origin_name() -> str:
    """A name for this server process, unique across the cluster and across its own restarts."""
    host = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:32] or "server"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def describe_redis_error(exc: BaseException) -> str:
    """One line on what went wrong talking to Redis."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "wrongpass" in lowered or "invalid username-password" in lowered or "invalid password" in lowered:
        return "Redis refused the password in the URL"
    if "noauth" in lowered or "authentication required" in lowered or "already authenticated" in lowered:
        return "Redis requires a password: put it in the URL (redis://:PASSWORD@host:port/0)"
    if "certificate verify failed" in lowered:
        return f"Redis's TLS certificate is not trusted (pass --redis-ca FILE): {text}"
    if lowered.startswith("timeout"):
        return f"no answer within {CONNECT_TIMEOUT:g} s: is Redis listening there (and rediss:// only if TLS)? ({text})"
    if "wrong version number" in lowered or "record layer failure" in lowered:
        return f"TLS does not match: is the URL rediss:// for a plain Redis port, or the other way round? ({text})"
    return text


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis is and how to talk to it; shared by the room log and the directory."""

    url: str
    ca_file: str | None = None  # rediss://: the CA that signed Redis's certificate (default: the system's)
    prefix: str = "securechat"
    origin: str = ""  # this server's name in the cluster; a fresh unique one when empty

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss"):
            raise RedisStartError(f"--redis wants a redis:// or rediss:// URL, not {redact(self.url)!r}")
        if self.ca_file is not None and scheme != "rediss":
            raise RedisStartError("--redis-ca needs a rediss:// (TLS) URL")
        if self.ca_file is not None and not os.path.exists(self.ca_file):
            raise RedisStartError(f"--redis-ca: file not found: {self.ca_file}")
        if not self.origin:
            object.__setattr__(self, "origin", _origin_name())

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def client(self, *, timeout: float = COMMAND_TIMEOUT, single: bool = False) -> Any:
        """A new client. ``single``: one connection, for a thread that owns it."""
        redis_mod = _redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout,
            "socket_connect_timeout": min(timeout, CONNECT_TIMEOUT),
            # No silent retries inside redis-py: each caller decides (backoff, or answering for
            # this server alone), and a timeout means what it says.
            "retry": Retry(NoBackoff(), 0),
            "socket_keepalive": True,
            "client_name": f"securechat-{self.origin}"[:60],
            # RESP2: the reply shapes every redis-py from 5.0 on parses the same way.
            "protocol": 2,
        }
        if urlsplit(self.url).scheme == "rediss":
            options["ssl_cert_reqs"] = "required"
            options["ssl_check_hostname"] = True
            if self.ca_file:
                options["ssl_ca_certs"] = self.ca_file
        if single:
            options["max_connections"] = 1
        try:
            return redis_mod.Redis.from_url(self.url, **options)
        except ValueError as exc:
            raise RedisStartError(f"--redis {redact(self.url)}: {exc}") from None

    def check(self) -> None:
        """Connect and PING once; RedisStartError with one line if Redis cannot be used."""
        redis_mod = _redis()
        client = self.client(timeout=CONNECT_TIMEOUT)
        try:
            client.ping()
            version = str(client.info("server").get("redis_version", "0"))
        except (redis_mod.RedisError, OSError) as exc:
            raise RedisStartError(f"cannot use Redis at {redact(self.url)}: {describe_redis_error(exc)}") from None
        finally:
            client.close()
        if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < (6, 2):
            # XRANGE with an exclusive "(id" bound and effects-replicated scripts need 6.2.
            raise RedisStartError(f"Redis at {redact(self.url)} is version {version}; securechat needs 6.2 or newer")


def _errors() -> tuple[type[BaseException], ...]:
    """What a lost or failing Redis raises."""
    return (_redis().RedisError, OSError)


class _Backoff:
    """Delays between reconnection attempts: BACKOFF_FIRST doubling to BACKOFF_MAX."""

    def __init__(self) -> None:
        self.delay = 0.0

    def reset(self) -> None:
        self.delay = 0.0

    def wait(self, stop: threading.Event) -> None:
        self.delay = min(BACKOFF_MAX, self.delay * 2 or BACKOFF_FIRST)
        stop.wait(self.delay)


class _Pending:
    """One of this server's lines on its way through Redis."""

    __slots__ = ("seq", "entry", "store", "echoed")

    def __init__(self, seq: int, entry: Entry, store: bool) -> None:
        self.seq = seq
        self.entry = entry  # with a provisional id, used only if it must be delivered locally
        self.store = store  # False: a private message routed to its recipient's server, kept nowhere
        self.echoed = False  # delivered locally already (Redis was unreachable): skip it when read back


class RedisRoomLog(RoomLog):
    """A :class:`~securechat.roomlog.RoomLog` shared by every server on one Redis.

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
        errors = _errors()
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
        except _errors() as exc:
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
        errors = _errors()
        client = self.config.client(single=True)
        # EVALSHA straight into the pipeline: redis-py's Script objects would ask SCRIPT EXISTS
        # before every pipeline, a second round trip per batch. NOSCRIPT (Redis restarted) reloads.
        shas: dict[str, str] = {}
        no_script = _redis().exceptions.NoScriptError
        backoff = _Backoff()
        deadline: float | None = None
        trimmed = time.monotonic()
        written_rooms: set[str] = set()
        batch: list[_Pending] = []
        marks: dict[str, dict[str, str]] = {}
        while True:
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
            if self.history_seconds and time.monotonic() - trimmed > TRIM_EVERY:
                trimmed = time.monotonic()
                self._trim(client, written_rooms)
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + CLOSE_FLUSH_SECONDS
                if time.monotonic() > deadline:
                    break
            try:
                if not shas:
                    shas = {"append": client.script_load(_APPEND_LUA), "route": client.script_load(_ROUTE_LUA)}
                pipe = client.pipeline(transaction=False)
                for pending in batch:
                    self._queue_write(pipe, pending, shas, written_rooms)
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

    def _queue_write(self, pipe: Any, pending: _Pending, shas: dict[str, str], rooms: set[str]) -> None:
        """Add one line's script call to the pipeline."""
        entry = pending.entry
        fields = ["r", entry.room, "k", entry.kind, "s", entry.sender, "t", entry.text, "g", entry.target,
                  "o", self.origin, "q", pending.seq, "ts", repr(entry.ts)]
        if not pending.store:
            pipe.evalsha(shas["route"], 2, self.config.key("nick", self.nick_key(entry.target)), self._seq_key,
                         pending.seq, SEQ_TTL_MS, self.config.key("inbox", ""), INBOX_CAP, *fields)
            return
        room_stream = self.config.key("room", self.room_key(entry.room))
        rooms.add(room_stream)
        pipe.evalsha(shas["append"], 3, self._log_key, room_stream, self._seq_key,
                     pending.seq, self.log_cap, self.history_lines if self.history else -1, SEQ_TTL_MS, *fields)

    def _trim(self, client: Any, rooms: set[str]) -> None:
        """Drop history older than history_seconds from the rooms this server wrote to."""
        cutoff = int((time.time() - self.history_seconds) * 1000)
        with contextlib.suppress(*_errors()):
            pipe = client.pipeline(transaction=False)
            for key in rooms:
                pipe.xtrim(key, minid=f"{cutoff}-0", approximate=True)
            pipe.execute()
            rooms.clear()

    # -- reader ----------------------------------------------------------------------------

    def _read_loop(self, start_id: str) -> None:
        errors = _errors()
        client = self.config.client(timeout=COMMAND_TIMEOUT + READ_BLOCK_MS / 1000, single=True)
        positions = {self._log_key: start_id, self._inbox_key: "0-0"}
        backoff = _Backoff()
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
        except _errors() as exc:
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


class RedisDirectory(Directory):
    """Who is online where, across every server on one Redis (the rooms' :class:`Directory`).

    - Nicks are unique across servers: :meth:`claim` is ``SET NX PX``; the owning server refreshes
      its nicks every TTL/3 and releases them only if it still holds them (Lua compare-and-delete),
      so a server that dies loses its nicks within the TTL, and a slow one never deletes a nick
      someone else has taken since.
    - Room memberships and the online list are sorted sets scored by expiry (Redis's clock, so the
      servers' clocks may differ), members ``nick<TAB>origin``: :meth:`members`, :meth:`rooms` and
      :meth:`everyone` report the other servers' people, and a dead server's vanish within the TTL.

    Calls are blocking round trips on the caller's (session) thread, bounded by a short timeout;
    while Redis is known to be unreachable they answer at once for this server alone: a claim is
    granted (local chat goes on; the refresh takes the nick in Redis when it is back, and logs if
    another server took it meanwhile), and nobody is reported elsewhere.
    """

    def __init__(self, config: RedisConfig, *, ttl: float = PRESENCE_TTL, grace: float = SESSION_GRACE,
                 nick_key: Callable[[str], str] = protocol.nick_key,
                 room_key: Callable[[str], str] = roomlog_room_key) -> None:
        self.config = config
        self.origin = config.origin
        self.ttl_ms = max(1000, int(ttl * 1000))
        self.nick_key = nick_key
        self.room_key = room_key
        self._lock = threading.Lock()
        self._nicks: dict[str, str] = {}  # nick key -> display, held by this server
        self._members: dict[str, dict[str, str]] = {}  # room key -> {nick key: display}
        self._room_names: dict[str, str] = {}  # room key -> display
        self._sessions: dict[str, tuple[str, str]] = {}  # resume token -> (nick key, person)
        self._adopting: dict[str, str] = {}  # nick key -> origin of the session being resumed here
        self._draining = False  # the server is stopping: sessions stay resumable elsewhere
        # A session record outlives its server by the grace period (plus the time to notice it died).
        self.session_ttl_ms = int((grace + ttl) * 1000)
        self._ok = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    def _value(self, display: str) -> str:
        return f"{self.origin}\t{display}"

    def _member(self, display: str) -> str:
        return f"{display}\t{self.origin}"

    def _others(self, members: list[str]) -> list[str]:
        """Display nicks of the ``nick<TAB>origin`` members that are not this server's."""
        out = []
        for member in members:
            display, _, origin = member.rpartition("\t")
            if origin != self.origin and display:
                out.append(protocol.sanitize(display))
        return out

    def start(self) -> None:
        """Connect and start the refresh thread (RedisStartError if Redis cannot be used)."""
        self.config.check()
        self._client = self.config.client(timeout=DIRECTORY_TIMEOUT)
        for name, source in (("refresh", _REFRESH_NICK_LUA), ("release", _RELEASE_NICK_LUA), ("take", _TAKE_OVER_LUA),
                             ("touch", _TOUCH_LUA), ("alive", _ALIVE_LUA), ("rooms", _ROOMS_LUA)):
            self._scripts[name] = self._client.register_script(source)
        self._thread = threading.Thread(target=self._heartbeat_loop, name="securechat-redis-presence", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """The server is about to stop: from now on, released nicks keep their resume records, so
        its clients (``connect a,b``) resume on another server (the records expire after the grace
        period)."""
        self._draining = True

    def close(self) -> None:
        """Stop refreshing and release this server's nicks and memberships."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(DIRECTORY_TIMEOUT + 1)
        with self._lock:
            nicks = dict(self._nicks)
            members = {room: dict(m) for room, m in self._members.items()}
        if self._client is None:
            return
        with contextlib.suppress(*_errors()):
            pipe = self._client.pipeline(transaction=False)
            for room, people in members.items():
                if people:
                    pipe.zrem(self.config.key("who", room), *(self._member(d) for d in people.values()))
            if nicks:
                pipe.zrem(self.config.key("online"), *(self._member(d) for d in nicks.values()))
            for key, display in nicks.items():
                self._scripts["release"](keys=[self.config.key("nick", key)], args=[self._value(display)], client=pipe)
            pipe.execute()
        self._client.close()

    @property
    def available(self) -> bool:
        """False while Redis is known to be unreachable."""
        return self._ok

    def _call(self, fn: Callable[[], Any]) -> Any:
        """One round trip; DirectoryUnavailable (at once while Redis is known to be down)."""
        if not self._ok or self._stop.is_set():
            raise DirectoryUnavailable("Redis is unreachable")
        try:
            return fn()
        except _errors() as exc:
            self._ok = False
            log.warning("nick directory: Redis unreachable (%s): this server answers for itself until it is back",
                        describe_redis_error(exc))
            raise DirectoryUnavailable(describe_redis_error(exc)) from None

    # -- the Directory seam ----------------------------------------------------------------

    def claim(self, nick: str) -> bool:
        """Take ``nick`` for this server; False if another server holds it."""
        key = self.nick_key(nick)
        redis_key = self.config.key("nick", key)
        value = self._value(nick)
        client = self._client
        try:
            if not self._call(lambda: client.set(redis_key, value, nx=True, px=self.ttl_ms)):
                holder = self._call(lambda: client.get(redis_key)) or ""
                if not holder.startswith(f"{self.origin}\t"):
                    return False
                self._call(lambda: client.set(redis_key, value, px=self.ttl_ms))  # ours: the new spelling
            self._call(lambda: self._scripts["alive"](keys=[self.config.key("online")],
                                                       args=[self._member(nick), self.ttl_ms]))
        except DirectoryUnavailable:
            pass  # granted locally; the refresh claims it in Redis when it is back
        with self._lock:
            self._nicks[key] = nick
        return True

    def release(self, nick: str) -> None:
        """Give ``nick`` up (if this server still holds it) and leave every room with it."""
        key = self.nick_key(nick)
        with self._lock:
            display = self._nicks.pop(key, nick)
            rooms = [room for room, people in self._members.items() if people.pop(key, None) is not None]
            for room in rooms:
                if not self._members[room]:
                    del self._members[room]
            # The session is over (quit, or its grace period ran out): nobody may resume it. Not when
            # this server is stopping: its people may resume on another server of the chat.
            tokens = [token for token, (k, _) in self._sessions.items() if k == key]
            for token in tokens:
                del self._sessions[token]
            if self._draining:
                tokens = []

        def run() -> None:
            pipe = self._client.pipeline(transaction=False)
            for token in tokens:
                pipe.delete(self._session_key(token))
            for room in rooms:
                pipe.zrem(self.config.key("who", room), self._member(display))
            pipe.zrem(self.config.key("online"), self._member(display))
            self._scripts["release"](keys=[self.config.key("nick", key)], args=[self._value(display)], client=pipe)
            pipe.execute()

        with contextlib.suppress(DirectoryUnavailable):
            self._call(run)

    def online(self, nick: str) -> bool:
        """True when another server holds ``nick``."""
        where = self.locate(nick)
        return where is not None and where[0] != self.origin

    def joined(self, room: str, nick: str) -> None:
        """``nick`` (held by this server) is in ``room`` now."""
        room_key, key = self.room_key(room), self.nick_key(nick)
        with self._lock:
            self._members.setdefault(room_key, {})[key] = nick
            self._room_names.setdefault(room_key, room)
        with contextlib.suppress(DirectoryUnavailable):
            self._call(lambda: self._touch(self._client, room_key, nick))

    def parted(self, room: str, nick: str) -> None:
        """``nick`` left ``room``."""
        room_key, key = self.room_key(room), self.nick_key(nick)
        with self._lock:
            people = self._members.get(room_key, {})
            display = people.pop(key, nick)
            if not people:
                self._members.pop(room_key, None)
                self._room_names.pop(room_key, None)
        with contextlib.suppress(DirectoryUnavailable):
            self._call(lambda: self._client.zrem(self.config.key("who", room_key), self._member(display)))

    def members(self, room: str) -> list[str]:
        """The people in ``room`` on the other servers (none known while Redis is away)."""
        try:
            found = self._call(lambda: self._scripts["alive"](keys=[self.config.key("who", self.room_key(room))],
                                                               args=["", 0]))
        except DirectoryUnavailable:
            return []
        return sorted(self._others(found), key=str.casefold)

    def rooms(self) -> dict[str, int]:
        """Room display name -> how many people are in it on the other servers."""
        try:
            flat = self._call(lambda: self._scripts["rooms"](
                keys=[self.config.key("rooms"), self.config.key("roomnames")],
                args=[self.config.key("who", ""), self.origin]))
        except DirectoryUnavailable:
            return {}
        out: dict[str, int] = {}
        for i in range(0, len(flat) - 1, 2):
            if int(flat[i + 1]) > 0:
                out[protocol.sanitize(str(flat[i]))] = int(flat[i + 1])
        return out

    def everyone(self) -> list[str]:
        """Nicks online on the other servers."""
        try:
            found = self._call(lambda: self._scripts["alive"](keys=[self.config.key("online")], args=["", 0]))
        except DirectoryUnavailable:
            return []
        return sorted(self._others(found), key=str.casefold)

    # -- resuming on another server ----------------------------------------------------------

    def _session_key(self, token: str) -> str:
        # Hashed: whoever can list Redis's keys cannot lift a token from them.
        return self.config.key("session", hashlib.sha256(token.encode()).hexdigest()[:32])

    def _write_session(self, pipe: Any, token: str, display: str, person: str) -> None:
        key = self._session_key(token)
        pipe.hset(key, mapping={"nick": display, "person": person, "origin": self.origin})
        pipe.pexpire(key, self.session_ttl_ms)

    def remember_session(self, token: str, nick: str, person: str | None) -> None:
        """Record ``token`` -> ``nick`` so another server can resume the session if this one dies."""
        with self._lock:
            self._sessions[token] = (self.nick_key(nick), person or "")

        def run() -> None:
            pipe = self._client.pipeline(transaction=False)
            self._write_session(pipe, token, nick, person or "")
            pipe.execute()

        with contextlib.suppress(DirectoryUnavailable):
            self._call(run)

    def session_nick(self, token: str, person: str | None) -> str | None:
        """The nick of a session another server gave ``token`` (under mutual TLS, the same person's)."""
        try:
            record = self._call(lambda: self._client.hgetall(self._session_key(token)))
        except DirectoryUnavailable:
            return None
        if not record or record.get("origin") == self.origin or record.get("person", "") != (person or ""):
            return None
        nick = str(record.get("nick", ""))
        if protocol.nick_error(nick) is not None:
            return None
        with self._lock:
            self._adopting[self.nick_key(nick)] = str(record.get("origin", ""))
        return nick

    def take_over(self, nick: str) -> bool:
        """Claim the nick of a session found by :meth:`session_nick`: if it is free, or still held by
        the server that gave the session; False if someone else took it since."""
        key = self.nick_key(nick)
        with self._lock:
            origin = self._adopting.pop(key, None)
        if origin is None:
            return False
        try:
            taken = self._call(lambda: self._scripts["take"](keys=[self.config.key("nick", key)],
                                                              args=[self._value(nick), self.ttl_ms, origin]))
            if not taken:
                return False
            self._call(lambda: self._scripts["alive"](keys=[self.config.key("online")],
                                                       args=[self._member(nick), self.ttl_ms]))
        except DirectoryUnavailable:
            return False
        with self._lock:
            self._nicks[key] = nick
        return True

    def locate(self, nick: str) -> tuple[str, str] | None:
        """(server origin, display nick) of whoever holds ``nick``, or None (also while Redis is away)."""
        try:
            value = self._call(lambda: self._client.get(self.config.key("nick", self.nick_key(nick))))
        except DirectoryUnavailable:
            return None
        if not value or "\t" not in value:
            return None
        origin, _, display = value.partition("\t")
        return origin, display

    # -- heartbeat -------------------------------------------------------------------------

    def _touch(self, pipe: Any, room_key: str, nick: str) -> Any:
        return self._scripts["touch"](
            keys=[self.config.key("who", room_key), self.config.key("rooms"), self.config.key("roomnames")],
            args=[self._member(nick), self.ttl_ms, room_key, self._room_names.get(room_key, room_key)], client=pipe)

    def refresh(self) -> None:
        """Refresh every nick and membership this server holds (one pipelined round trip)."""
        with self._lock:
            nicks = list(self._nicks.items())
            members = [(room, display) for room, people in self._members.items() for display in people.values()]
            sessions = [(token, self._nicks[k], person) for token, (k, person) in self._sessions.items()
                        if k in self._nicks]
        pipe = self._client.pipeline(transaction=False)
        for key, display in nicks:
            self._scripts["refresh"](keys=[self.config.key("nick", key)], args=[self._value(display), self.ttl_ms],
                                     client=pipe)
        for _, display in nicks:
            self._scripts["alive"](keys=[self.config.key("online")], args=[self._member(display), self.ttl_ms],
                                   client=pipe)
        for room, display in members:
            self._touch(pipe, room, display)
        pipe.expire(self.config.key("inbox", self.origin), max(1, self.ttl_ms // 1000) * 4)
        for token, display, person in sessions:
            self._write_session(pipe, token, display, person)
        results = pipe.execute()
        for (_, display), ok in zip(nicks, results[:len(nicks)], strict=True):
            if not ok:
                log.warning("nick %s was taken on another server while this one was cut off from Redis; "
                            "both have it until one leaves", display)

    def _heartbeat_loop(self) -> None:
        errors = _errors()
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval if self._ok else min(interval, 0.5)):
            try:
                self.refresh()
            except errors as exc:
                if self._ok:
                    log.warning("nick directory: Redis unreachable: %s", describe_redis_error(exc))
                self._ok = False
                continue
            except Exception:  # a bug must not stop the refreshes: this server's people would vanish
                log.exception("nick directory: refresh failed")
                continue
            if not self._ok:
                log.warning("nick directory: Redis is back")
            self._ok = True


class DirectoryUnavailable(Exception):
    """Redis is unreachable: the directory cannot answer for the cluster right now."""


# -- securechat serve --redis ----------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s options for sharing rooms through Redis."""
    group = parser.add_argument_group(
        "several servers, one chat (Redis)",
        "Servers started with the same --redis share rooms, history, nicknames, /who, /rooms and /msg. "
        "Needs pip install 'securechat[redis]'.")
    group.add_argument("--redis", metavar="URL",
                       help="share rooms through this Redis: redis://HOST:6379/0, or rediss://:PASSWORD@HOST:6380/0 "
                       "for TLS with a password (use both anywhere but loopback: it carries every line)")
    group.add_argument("--redis-ca", metavar="FILE",
                       help="with rediss://: the CA certificate that signed Redis's (default: the system's CAs)")
    group.add_argument("--presence-ttl", type=options.duration(), default=PRESENCE_TTL, metavar="SECONDS",
                       help="a killed server's people leave /who within this time (default: %(default)g)")


def usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the Redis options as given (a usage error), or None."""
    if args.redis is None:
        if args.redis_ca is not None:
            return "--redis-ca needs --redis"
        return None
    if urlsplit(args.redis).scheme not in ("redis", "rediss"):
        return f"--redis wants a redis:// or rediss:// URL, not {redact(args.redis)!r}"
    if args.redis_ca is not None and urlsplit(args.redis).scheme != "rediss":
        return "--redis-ca needs a rediss:// (TLS) URL"
    if args.presence_ttl < 1:
        return "--presence-ttl must be at least 1 second"
    return None


def open_from_args(args: argparse.Namespace) -> tuple[RedisRoomLog, RedisDirectory] | None:
    """The shared room log and directory ``--redis`` asks for (None without it); the directory is started.

    Raises RedisStartError (one line) if Redis cannot be used.
    """
    if not getattr(args, "redis", None):
        return None
    config = RedisConfig(args.redis, ca_file=args.redis_ca)
    config.check()
    roomlog = RedisRoomLog(config, history_lines=getattr(args, "history_lines", HISTORY_LINES),
                           history_seconds=getattr(args, "history_days", 0.0) * 86400.0,
                           history=not getattr(args, "no_history", False))
    directory = RedisDirectory(config, ttl=args.presence_ttl, grace=getattr(args, "grace", SESSION_GRACE))
    directory.start()
    return roomlog, directory
