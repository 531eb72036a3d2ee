"""The CA's ledger as every server of a ``--redis`` cluster reads it: revoked certificates, names given out.

The ledger itself (:mod:`securechat.pki.ledger`) is an SQLite file beside ``ca.key``, on one machine. The
server that runs there with ``--redis`` *publishes* what servers enforce (its snapshot) into Redis; every
server of the cluster, those without ``ca.key`` included, reads it back and enforces it, so a revoked
certificate is refused and its live session cut everywhere, and a name bound to a certificate is no
guest's on any server.

Layout (``P`` is the key prefix):

- ``P:ledger:version``: the ledger's generation the copy was taken at; readers poll it (one ``GET``) and
  read the rest only when it changed;
- ``P:ledger:revoked`` and ``P:ledger:superseded``: sets of certificate serials (hex);
- ``P:ledger:names``: hash of folded name -> ``state<TAB>until<TAB>spelling``;
- ``P:ledger:publisher``: who publishes, a lease its holder renews every poll: a second server holding a
  ``ca.key`` (and so a ledger of its own) on the same Redis is told, and does not publish over it.

A publication replaces all four in one ``MULTI``/``EXEC``, and a reader takes all four in one too: a
reader sees one generation whole, never half of one and half of the next. Without its keys (a Redis
that lost its data) a reader keeps what it read last, and the publisher, which compares versions every
poll, writes it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from securechat.store.redis_config import RedisConfig, describe_redis_error, redact, redis_errors

# The ledger is read on the watcher's thread and at a certificate holder's login: Redis answers in
# under a millisecond, so a second means it is gone (the last copy read stays in force meanwhile).
LEDGER_TIMEOUT = 1.0

# Takes or renews the publisher's lease; returns the other holder, or false. KEYS: the lease; ARGV: me, ttl ms.
_CLAIM_LUA = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return v
"""


@dataclass(frozen=True)
class PublishedLedger:
    """One generation of the ledger as published (see the module docstring)."""

    generation: int
    revoked: frozenset[str]
    superseded: frozenset[str]
    held: dict[str, tuple[str, str, float | None]]  # folded name -> (spelling, state, until)


class RedisLedger:
    """Publishes and reads the ledger's copy in Redis; one short round trip a call, never retried inside."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.where = redact(config.url)  # for messages: never the password
        self._client: Any = None
        self._keys = {part: config.key("ledger", part)
                      for part in ("version", "revoked", "superseded", "names", "publisher")}

    def _redis(self) -> Any:
        if self._client is None:
            self._client = self.config.client(timeout=LEDGER_TIMEOUT)
        return self._client

    @staticmethod
    def errors() -> tuple[type[BaseException], ...]:
        """What a call raises when Redis is unreachable (for the callers' ``except``)."""
        return redis_errors()

    @staticmethod
    def describe(exc: BaseException) -> str:
        return describe_redis_error(exc)

    def version(self) -> int | None:
        """The generation published, or None when nothing is (never published, or Redis lost it)."""
        value = self._redis().get(self._keys["version"])
        return int(value) if value is not None and str(value).isdigit() else None

    def read(self) -> PublishedLedger | None:
        """The whole copy, taken atomically; None when nothing is published."""
        pipe = self._redis().pipeline(transaction=True)
        pipe.get(self._keys["version"])
        pipe.smembers(self._keys["revoked"])
        pipe.smembers(self._keys["superseded"])
        pipe.hgetall(self._keys["names"])
        version, revoked, superseded, names = pipe.execute()
        if version is None or not str(version).isdigit():
            return None
        held: dict[str, tuple[str, str, float | None]] = {}
        for key, value in names.items():
            state, until, spelling = (str(value).split("\t", 2) + ["", ""])[:3]
            try:
                held[str(key)] = (spelling, state, float(until) if until else None)
            except ValueError:
                continue  # not ours: whoever can write to Redis can write anything
        return PublishedLedger(int(version), frozenset(map(str, revoked)), frozenset(map(str, superseded)), held)

    def claim(self, me: str, ttl: float) -> str | None:
        """Take (or keep) the publisher's lease for ``ttl`` seconds: None, or who else holds it."""
        other = self._redis().eval(_CLAIM_LUA, 1, self._keys["publisher"], me, int(ttl * 1000))
        return str(other) if other else None

    def publish(self, ledger: PublishedLedger) -> None:
        """Replace the copy with ``ledger``, atomically."""
        pipe = self._redis().pipeline(transaction=True)
        pipe.delete(self._keys["revoked"], self._keys["superseded"], self._keys["names"])
        if ledger.revoked:
            pipe.sadd(self._keys["revoked"], *sorted(ledger.revoked))
        if ledger.superseded:
            pipe.sadd(self._keys["superseded"], *sorted(ledger.superseded))
        if ledger.held:
            pipe.hset(self._keys["names"], mapping={
                key: f"{state}\t{'' if until is None else repr(until)}\t{spelling}"
                for key, (spelling, state, until) in ledger.held.items()})
        pipe.set(self._keys["version"], str(ledger.generation))
        pipe.execute()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __repr__(self) -> str:
        return f"<RedisLedger {self.config.key('ledger')}>"
