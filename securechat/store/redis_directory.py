"""Who is online where, across every server on one Redis: nick claims, room membership, resume tokens.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from securechat.store.redis_config import RedisConfig, describe_redis_error, redis_errors
from securechat.store.roomlog import Directory, DirectoryUnavailable
from securechat.wire import protocol
from securechat.wire.ids import room_key as roomlog_room_key

log = logging.getLogger("securechat.redis")


# Presence: a nick or a room membership lives this long unless the owning server refreshes it
# (three times per TTL). 15 s: a killed server's people leave /who within 15 s, and a refresh
# costs one pipelined round trip every 5 s.
PRESENCE_TTL = 15.0

# How long a resume token stays valid after its server stops refreshing it: the rooms' default
# grace period (--grace passes the server's).
SESSION_GRACE = 60.0

# Directory calls run in a session's turn on a worker (a login, /who): Redis answers in under a millisecond,
# so a second means it is gone, and then the directory answers for this server alone.
DIRECTORY_TIMEOUT = 1.0


# Keeps a nick alive if this server still holds it, or takes it back if it is free (Redis was
# restarted without its data); 0 if another server has it now.
_REFRESH_NICK_LUA = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

# Takes over a session and its nick for a resumed session, in one step: only while the session is
# still the server's that gave it (not ended there: its departure announced), and the nick is free or
# still held by that server (gone, or its client would have resumed there), never from someone who
# took it since. KEYS: the nick, the session; ARGV: new value, ttl ms, the session's origin, this
# server's origin, the session's ttl ms.
_TAKE_OVER_LUA = """
if redis.call('HGET', KEYS[2], 'origin') ~= ARGV[3] then return 0 end
local v = redis.call('GET', KEYS[1])
if (not v) or string.sub(v, 1, #ARGV[3] + 1) == ARGV[3] .. '\t' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('HSET', KEYS[2], 'origin', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  return 1
end
return 0
"""

# Records (or refreshes) a session this server gave, unless another server has taken it over.
# KEYS: the session; ARGV: nick, person, origin, ttl ms. 0: it is another server's now.
_SESSION_LUA = """
local holder = redis.call('HGET', KEYS[1], 'origin')
if holder and holder ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'nick', ARGV[1], 'person', ARGV[2], 'origin', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# Ends a session if it is still this server's: the record stays, marked "ended:ORIGIN", until it
# expires, so that no other server takes it over and the server that ended it still announces the
# departure (the room log's append script reads the mark). KEYS: the session; ARGV: origin.
_END_SESSION_LUA = """
if redis.call('HGET', KEYS[1], 'origin') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'origin', 'ended:' .. ARGV[1])
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


class RedisDirectory(Directory):
    """Who is online where, across every server on one Redis (the rooms' :class:`Directory`).

    - Nicks are unique across servers: :meth:`claim` is ``SET NX PX``; the owning server refreshes
      its nicks every TTL/3 and releases them only if it still holds them (Lua compare-and-delete),
      so a server that dies loses its nicks within the TTL, and a slow one never deletes a nick
      someone else has taken since.
    - Room memberships and the online list are sorted sets scored by expiry (Redis's clock, so the
      servers' clocks may differ), members ``nick<TAB>origin``: :meth:`members`, :meth:`rooms` and
      :meth:`everyone` report the other servers' people, and a dead server's vanish within the TTL.

    Calls are blocking round trips on the caller's thread (a worker, never a loop), bounded by a short timeout;
    while Redis is known to be unreachable they answer at once for this server alone: nobody is
    reported elsewhere, and a claim raises DirectoryUnavailable (a nick is never granted without
    Redis, so two servers never hand out one nick).
    - A session resumed on another server is taken over there in one step with its nick
      (:meth:`take_over`); from then on this server neither refreshes nor ends it, and drops the
      nick and memberships it held for it (:meth:`refresh` finds them gone).
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
        self._adopting: dict[str, tuple[str, str]] = {}  # nick key -> (origin, token) of a session resumed here
        # Claims whose answer was lost (Redis may have carried them out): given back when it is reachable.
        self._doubtful: dict[str, str] = {}  # nick key -> the value this server may have set
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
                             ("touch", _TOUCH_LUA), ("alive", _ALIVE_LUA), ("rooms", _ROOMS_LUA),
                             ("session", _SESSION_LUA), ("end", _END_SESSION_LUA)):
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
        with contextlib.suppress(*redis_errors()):
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
        except redis_errors() as exc:
            self._ok = False
            log.warning("nick directory: Redis unreachable (%s): this server answers for itself until it is back",
                        describe_redis_error(exc))
            raise DirectoryUnavailable(describe_redis_error(exc)) from None

    # -- the Directory seam ----------------------------------------------------------------

    def claim(self, nick: str) -> bool:
        """Take ``nick`` for this server; False if another server holds it; DirectoryUnavailable if Redis
        cannot be asked."""
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
        except DirectoryUnavailable:
            with self._lock:  # refused here, but Redis may have set it before the answer was lost
                if key not in self._nicks:
                    self._doubtful[key] = value
            raise
        with contextlib.suppress(DirectoryUnavailable):  # the heartbeat lists it online in a moment anyway
            self._call(lambda: self._scripts["alive"](keys=[self.config.key("online")],
                                                       args=[self._member(nick), self.ttl_ms]))
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
            for token in tokens:  # unless another server has taken it over since
                self._scripts["end"](keys=[self.config.session_key(token)], args=[self.origin], client=pipe)
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

    def _write_session(self, pipe: Any, token: str, display: str, person: str) -> None:
        self._scripts["session"](keys=[self.config.session_key(token)],
                                 args=[display, person, self.origin, self.session_ttl_ms], client=pipe)

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
            record = self._call(lambda: self._client.hgetall(self.config.session_key(token)))
        except DirectoryUnavailable:
            return None
        origin = str(record.get("origin", ""))
        if not record or origin == self.origin or origin.startswith("ended:") or \
                record.get("person", "") != (person or ""):
            return None
        nick = str(record.get("nick", ""))
        if protocol.nick_error(nick) is not None:
            return None
        with self._lock:
            self._adopting[self.nick_key(nick)] = (origin, token)
        return nick

    def take_over(self, nick: str) -> bool:
        """Claim the nick of a session found by :meth:`session_nick`: if it is free, or still held by
        the server that gave the session; False if someone else took it since."""
        key = self.nick_key(nick)
        with self._lock:
            adopting = self._adopting.pop(key, None)
        if adopting is None:
            return False
        origin, token = adopting
        try:
            taken = self._call(lambda: self._scripts["take"](
                keys=[self.config.key("nick", key), self.config.session_key(token)],
                args=[self._value(nick), self.ttl_ms, origin, self.origin, self.session_ttl_ms]))
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
        self._give_back_doubtful()
        lost = [(key, display) for (key, display), ok in zip(nicks, results[:len(nicks)], strict=True) if not ok]
        gone = [token for (token, _, _), ok in zip(sessions, results[len(results) - len(sessions):], strict=True)
                if not ok]
        if lost or gone:
            self._forget(lost, gone)

    def _give_back_doubtful(self) -> None:
        """Release the nicks of claims refused while Redis was unreachable (if Redis did set them, and they are
        still this server's), so that a nick refused to everyone is not held for nobody until its TTL."""
        with self._lock:
            doubtful = {k: v for k, v in self._doubtful.items() if k not in self._nicks}
            self._doubtful.clear()
        if doubtful:
            pipe = self._client.pipeline(transaction=False)
            for key, value in doubtful.items():
                self._scripts["release"](keys=[self.config.key("nick", key)], args=[value], client=pipe)
            pipe.execute()

    def _forget(self, lost: list[tuple[str, str]], gone: list[str]) -> None:
        """Nicks and sessions another server has taken over (resumed there, perhaps ended there since): stop
        refreshing them, give back the nick if the refresh took it again, and take their memberships out of
        the lists at once, so nobody is counted twice."""
        with self._lock:
            for token in gone:
                key, _ = self._sessions.pop(token, ("", ""))
                if key in self._nicks and all(k != key for k, _ in lost):
                    lost.append((key, self._nicks[key]))
            rooms = []
            for key, display in lost:
                if self._nicks.get(key) == display:
                    del self._nicks[key]
                for room, people in list(self._members.items()):
                    if people.pop(key, None) is not None:
                        rooms.append((room, display))
                    if not people:
                        del self._members[room]
        for _, display in lost:
            log.info("nick %s is held by another server now (its session resumed there)", display)
        with contextlib.suppress(*redis_errors()):
            pipe = self._client.pipeline(transaction=False)
            for room, display in rooms:
                pipe.zrem(self.config.key("who", room), self._member(display))
            for key, display in lost:
                pipe.zrem(self.config.key("online"), self._member(display))
                self._scripts["release"](keys=[self.config.key("nick", key)], args=[self._value(display)],
                                         client=pipe)
            pipe.execute()

    def _heartbeat_loop(self) -> None:
        errors = redis_errors()
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

