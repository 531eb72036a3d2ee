"""``securechat serve --redis URL``: its options, and opening the shared room log and nick directory.
"""

from __future__ import annotations

import argparse

from securechat.store.redis_config import SCHEMES, RedisConfig, parse_sentinel_url, redact
from securechat.store.redis_directory import PRESENCE_TTL, SESSION_GRACE, RedisDirectory
from securechat.store.redis_log import HISTORY_LINES, RedisRoomLog
from securechat.wire import options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s options for sharing rooms through Redis."""
    group = parser.add_argument_group(
        "several servers, one chat (Redis)",
        "Servers started with the same --redis share rooms, history, nicknames, /who, /rooms and /msg. "
        "Needs pip install 'securechat[redis]'.")
    group.add_argument("--redis", metavar="URL",
                       help="share rooms through this Redis: redis://HOST:6379/0, or rediss://:PASSWORD@HOST:6380/0 "
                       "for TLS with a password (use both anywhere but loopback: it carries every line); "
                       "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER (rediss+sentinel:// for TLS) finds "
                       "the primary through Sentinel and follows its failovers")
    group.add_argument("--redis-ca", metavar="FILE",
                       help="with rediss:// or rediss+sentinel://: the CA certificate that signed Redis's (and the "
                       "Sentinels') (default: the system's CAs)")
    group.add_argument("--presence-ttl", type=options.duration(), default=PRESENCE_TTL, metavar="SECONDS",
                       help="a killed server's people leave /who within this time (default: %(default)g)")


def usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the Redis options as given (a usage error), or None."""
    if args.redis is None:
        if args.redis_ca is not None:
            return "--redis-ca needs --redis"
        return None
    scheme = args.redis.partition("://")[0] if "://" in args.redis else ""
    if scheme not in SCHEMES:
        return ("--redis wants a redis://, rediss://, redis+sentinel:// or rediss+sentinel:// URL, "
                f"not {redact(args.redis)!r}")
    tls, sentinel = SCHEMES[scheme]
    if args.redis_ca is not None and not tls:
        return "--redis-ca needs a rediss:// or rediss+sentinel:// (TLS) URL"
    if sentinel:
        try:
            parse_sentinel_url(args.redis)
        except ValueError as exc:
            return f"--redis {redact(args.redis)}: {exc}"
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
