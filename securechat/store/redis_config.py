"""Reaching Redis: the URL and key prefix, clients with timeouts, errors in words, and reconnect backoff.

redis-py is the optional extra ``pip install 'securechat[redis]'``; it is imported here, only when used,
so the base install runs without it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("securechat.redis")


# Redis answers in well under a millisecond on a LAN; 3 s to connect and 5 s per command only
# trip when it is really gone (or the network is), and then the server degrades to local chat.
CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 5.0


# Reconnecting to Redis: quick at first (a restart takes a second), then every 5 s at most, so a
# dead Redis costs each server one attempt per thread every few seconds.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


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

    def client(self, *, timeout: float = COMMAND_TIMEOUT, single: bool = False, binary: bool = False) -> Any:
        """A new client. ``single``: one connection, for a thread that owns it; ``binary``: replies as bytes."""
        redis_mod = redis_module()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "decode_responses": not binary,
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
        redis_mod = redis_module()
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


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a lost or failing Redis raises."""
    return (redis_module().RedisError, OSError)


class Backoff:
    """Delays between reconnection attempts: BACKOFF_FIRST doubling to BACKOFF_MAX."""

    def __init__(self) -> None:
        self.delay = 0.0

    def reset(self) -> None:
        self.delay = 0.0

    def wait(self, stop: threading.Event) -> None:
        self.delay = min(BACKOFF_MAX, self.delay * 2 or BACKOFF_FIRST)
        stop.wait(self.delay)
