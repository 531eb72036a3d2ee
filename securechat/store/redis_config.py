"""Reaching Redis: the URL and key prefix, clients with timeouts, errors in words, and reconnect backoff.

Two kinds of URL: ``redis://`` (``rediss://`` for TLS) names one Redis;
``redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB]`` (``rediss+sentinel://`` for TLS) names the
Sentinels that know which Redis is the primary of the group ``MASTER`` right now: every new
connection asks them, so a server follows a failover without a restart. The URL's user and password
are sent to the Sentinels and to the Redis they name (one password for the deployment), and with
TLS both are verified against ``--redis-ca`` (or the system's CAs).

redis-py is the optional extra ``pip install 'securechat[redis]'``; it is imported here, only when used,
so the base install runs without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

log = logging.getLogger("securechat.redis")


# Redis answers in well under a millisecond on a LAN; 3 s to connect and 5 s per command only
# trip when it is really gone (or the network is), and then the server degrades to local chat.
CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 5.0


# Reconnecting to Redis: quick at first (a restart or a Sentinel failover takes a second or two), then
# every 2 s at most, so a dead Redis costs each server one attempt per thread every 2 s, and delivery
# resumes at most 2 s after Redis (or the new primary) is back.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0

# Through Sentinel an attempt is a question to a Sentinel (it says at once while there is no primary),
# so the servers ask every half second: delivery goes on within half a second of the promotion.
BACKOFF_MAX_SENTINEL = 0.5

# A Sentinel answers from memory in well under a millisecond: one that takes a second to connect or
# answer is down, and the next one in the URL is asked.
SENTINEL_TIMEOUT = 1.0

# Sentinels' default port (redis-sentinel's own default).
SENTINEL_PORT = 26379

# The URL schemes: (TLS, through Sentinel).
SCHEMES = {"redis": (False, False), "rediss": (True, False),
           "redis+sentinel": (False, True), "rediss+sentinel": (True, True)}

# A Sentinel group's name, as sentinel.conf's "sentinel monitor NAME ..." gives it.
_MASTER_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")

# Sentinels in one URL: a deployment has three or five.
MAX_SENTINELS = 16


class RedisStartError(Exception):
    """Redis cannot be used: the message is one line for the operator."""


def redis_module() -> Any:
    """The redis-py module, imported on first use (it is an optional extra)."""
    try:
        import redis
    except ImportError:
        raise RedisStartError("--redis needs redis-py: pip install 'securechat[redis]'") from None
    return redis


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs (one Redis or a list of Sentinels)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hosts}{slash}{path}"


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: the Sentinels, the group, and how to talk to its Redis."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]``; ValueError: what is wrong."""
    scheme, _, rest = url.partition("://")
    tls, sentinel = SCHEMES.get(scheme, (False, False))
    if not sentinel:
        raise ValueError("not a redis+sentinel:// or rediss+sentinel:// URL")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        sentinels.append(_host_port(item.strip()))
    if len(sentinels) > MAX_SENTINELS:
        raise ValueError(f"at most {MAX_SENTINELS} Sentinels in one URL")
    parts = path.split("/") if path else []
    if not parts or not _MASTER_RE.match(parts[0]):
        raise ValueError("name the Sentinel group after the hosts: redis+sentinel://HOST:PORT/MASTER "
                         "(MASTER as in sentinel.conf's 'sentinel monitor MASTER ...')")
    db = 0
    if len(parts) > 2 or (len(parts) == 2 and not (parts[1].isascii() and parts[1].isdigit())):
        raise ValueError("after the group name, only a database number: .../MASTER/0")
    if len(parts) == 2:
        db = int(parts[1])
    return SentinelTarget(tuple(sentinels), parts[0], db, username, password, tls)


def _host_port(item: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` of one Sentinel."""
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"bad Sentinel address {item!r}: [IPv6]:PORT")
        port_text = tail[1:] if tail else ""
    elif item.count(":") > 1:
        raise ValueError(f"bad Sentinel address {item!r}: write an IPv6 address as [ADDRESS]:PORT")
    else:
        host, _, port_text = item.partition(":")
    if not host or not re.fullmatch(r"[A-Za-z0-9._:-]{1,253}", host):
        raise ValueError(f"bad Sentinel address {item!r}: HOST:PORT, with HOST a name or an address")
    if not port_text:
        return host, SENTINEL_PORT
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"bad Sentinel address {item!r}: the port must be 1-65535")
    return host, int(port_text)


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
    if lowered.startswith("no master found for"):
        return f"no Sentinel names a primary for the group right now (down, or failing over?): {text}"
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
        scheme = self.url.partition("://")[0] if "://" in self.url else ""
        if scheme not in SCHEMES:
            raise RedisStartError("--redis wants a redis://, rediss://, redis+sentinel:// or rediss+sentinel:// URL, "
                                  f"not {redact(self.url)!r}")
        if self.ca_file is not None and not self.tls:
            raise RedisStartError("--redis-ca needs a rediss:// or rediss+sentinel:// (TLS) URL")
        if self.ca_file is not None and not os.path.exists(self.ca_file):
            raise RedisStartError(f"--redis-ca: file not found: {self.ca_file}")
        if self.sentinel:
            try:
                parse_sentinel_url(self.url)
            except ValueError as exc:
                raise RedisStartError(f"--redis {redact(self.url)}: {exc}") from None
        if not self.origin:
            object.__setattr__(self, "origin", _origin_name())

    @property
    def tls(self) -> bool:
        """True for rediss:// and rediss+sentinel://."""
        return SCHEMES[self.url.partition("://")[0]][0]

    @property
    def sentinel(self) -> bool:
        """True when the URL names Sentinels rather than one Redis."""
        return SCHEMES[self.url.partition("://")[0]][1]

    @property
    def backoff_max(self) -> float:
        """The longest wait between reconnection attempts (shorter through Sentinel: asking is cheap)."""
        return BACKOFF_MAX_SENTINEL if self.sentinel else BACKOFF_MAX

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def session_key(self, token: str) -> str:
        """Where a resume token's session is recorded; hashed: whoever can list Redis's keys cannot lift a token."""
        return self.key("session", hashlib.sha256(token.encode()).hexdigest()[:32])

    def _options(self, timeout: float) -> dict[str, Any]:
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
        if self.tls:
            options["ssl_cert_reqs"] = "required"
            options["ssl_check_hostname"] = True
            if self.ca_file:
                options["ssl_ca_certs"] = self.ca_file
        return options

    def client(self, *, timeout: float = COMMAND_TIMEOUT, single: bool = False, replica: bool = False,
               binary: bool = False) -> Any:
        """A new client. ``single``: one connection, for a thread that owns it. ``replica`` (Sentinel
        only): connected to a replica of the primary when there is one (else to the primary).
        ``binary``: replies as bytes (file contents)."""
        redis_mod = redis_module()
        options = self._options(timeout)
        options["decode_responses"] = not binary
        if single:
            options["max_connections"] = 1
        if not self.sentinel:
            try:
                return redis_mod.Redis.from_url(self.url, **options)
            except ValueError as exc:
                raise RedisStartError(f"--redis {redact(self.url)}: {exc}") from None
        from redis.sentinel import Sentinel

        target = parse_sentinel_url(self.url)
        auth = {"username": target.username, "password": target.password}
        # Sentinels: the same TLS and password, short timeouts, no client name (they are not Redis).
        to_sentinels = {k: v for k, v in self._options(SENTINEL_TIMEOUT).items() if k != "client_name"}
        to_sentinels.pop("decode_responses")
        if self.tls:
            to_sentinels["ssl"] = True
        manager = Sentinel(list(target.sentinels), sentinel_kwargs={**to_sentinels, **auth}, db=target.db,
                           ssl=self.tls, **auth, **options)
        client = (manager.slave_for if replica else manager.master_for)(target.master)
        closing = client.close

        def close() -> None:  # the Sentinels' connections go with the client's
            closing()
            manager.close()

        client.close = close
        return client

    def check(self) -> None:
        """Connect and PING once; RedisStartError with one line if Redis cannot be used."""
        redis_mod = redis_module()
        if self.sentinel:
            self._check_sentinels()
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

    def _check_sentinels(self) -> None:
        """Ask each Sentinel for the group; RedisStartError saying why none names a primary."""
        redis_mod = redis_module()
        target = parse_sentinel_url(self.url)
        heard: list[str] = []
        for host, port in target.sentinels:
            options = {k: v for k, v in self._options(SENTINEL_TIMEOUT).items() if k != "client_name"}
            sentinel = redis_mod.Redis(host, port, ssl=self.tls, username=target.username,
                                       password=target.password, **options)
            try:
                masters = sentinel.sentinel_masters()
            except (redis_mod.RedisError, OSError) as exc:
                heard.append(f"{host}:{port}: {describe_redis_error(exc)}")
                continue
            finally:
                sentinel.close()
            state = masters.get(target.master)
            if state is None:
                heard.append(f"{host}:{port} knows no group named {target.master!r}")
            elif state.get("is_sdown") or state.get("is_odown") or not state.get("is_master", True):
                heard.append(f"{host}:{port} says the primary of {target.master!r} is down")
            else:
                return
        raise RedisStartError(f"cannot use Redis through the Sentinels at {redact(self.url)}: no Sentinel names "
                              f"a primary for {target.master!r} ({'; '.join(heard)})")


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a lost or failing Redis raises."""
    return (redis_module().RedisError, OSError)


class Backoff:
    """Delays between reconnection attempts: BACKOFF_FIRST doubling to ``most``."""

    def __init__(self, most: float = BACKOFF_MAX) -> None:
        self.delay = 0.0
        self.most = most

    def reset(self) -> None:
        self.delay = 0.0

    def wait(self, stop: threading.Event) -> None:
        self.delay = min(self.most, self.delay * 2 or BACKOFF_FIRST)
        stop.wait(self.delay)
