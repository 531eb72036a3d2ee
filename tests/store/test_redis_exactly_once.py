"""Exactly once through Redis's faults, at the room log's level: replicas, a dying primary, lines written twice.

Real redis-server, replica and redis-sentinel processes (``tests/redis_server.py``); RedisRoomLog and
RedisDirectory objects in this process are the servers of a cluster (as in test_redislog.py).
"""

from __future__ import annotations

import signal
import time

import pytest
import redis as redis_py

from securechat.store.redis_config import RedisConfig, RedisStartError, SentinelTarget, parse_sentinel_url, redact
from securechat.store.redis_directory import RedisDirectory
from securechat.wire.ids import room_key
from tests.redis_server import SentinelGroup
from tests.store.test_redislog import cluster  # noqa: F401  (a fixture)

LOBBY = f"securechat:room:{room_key('lobby')}"


def test_sentinel_urls_are_read_as_redis_py_needs_them() -> None:
    assert parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,[fd00::2],s3.lan:26380/chat/2") == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("fd00::2", 26379), ("s3.lan", 26380)), master="chat", db=2,
        username=None, password="pw", tls=False)
    target = parse_sentinel_url("rediss+sentinel://ops:p%40ss@s1/chat")
    assert (target.username, target.password, target.tls, target.sentinels) == ("ops", "p@ss", True,
                                                                                (("s1", 26379),))
    assert redact("rediss+sentinel://ops:p%40ss@s1:1,s2:2/chat") == "rediss+sentinel://ops:***@s1:1,s2:2/chat"
    for bad, why in [("redis+sentinel://s1", "name the Sentinel group"),
                     ("redis+sentinel://s1/a b", "name the"),
                     ("redis+sentinel://s1:0/chat", "port must be 1-65535"),
                     ("redis+sentinel://,s1/chat", "bad Sentinel"),
                     ("redis+sentinel://s1/chat/x", "only a database number"),
                     ("redis://s1/chat", "not a redis.sentinel://"),
                     ("redis+sentinel://" + ",".join(["s"] * 17) + "/chat", "at most 16")]:
        with pytest.raises(ValueError, match=why):
            parse_sentinel_url(bad)
    with pytest.raises(RedisStartError, match="name the Sentinel group"):
        RedisConfig("redis+sentinel://127.0.0.1:26379")


def test_a_line_is_delivered_only_once_a_replica_has_it_and_one_the_dead_primary_took_is_written_again(
        redis_sentinel, cluster) -> None:  # noqa: F811
    group: SentinelGroup = redis_sentinel()
    a, inbox_a = cluster(group.url)
    b, inbox_b = cluster(group.url)
    a.append("lobby", "chat", "alice", "replicated")
    for inbox in (inbox_a, inbox_b):
        inbox.wait_for(lambda es: len(es) == 1)
    # Replication stalls: the primary takes the next line, but no reader (they follow the replica) sees it,
    # and history (read from the primary) stops at what was delivered.
    group.link.cut()
    a.append("lobby", "chat", "alice", "only on the primary")
    deadline = time.monotonic() + 10
    while a.written < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    primary = redis_py.Redis(port=group.primary.port, decode_responses=True)
    assert [f["t"] for _, f in primary.xrange(LOBBY)] == ["replicated", "only on the primary"]
    primary.close()
    time.sleep(0.5)
    assert [e.text for e in inbox_a.entries] == ["replicated"] == [e.text for e in inbox_b.entries]
    assert [e.text for e in b.read_after("lobby", None, 10)] == ["replicated"]
    assert [e.text for e in b.read_before("lobby", None, 10)] == ["replicated"]
    # The primary dies with the line; the replica never gets it, and is promoted.
    group.primary.stop(signal.SIGKILL)
    group.link.heal()
    group.wait_failover()
    # Nobody spoke since: a's writer sends again what never came back, and the new primary gets it once.
    for inbox in (inbox_a, inbox_b):
        assert [e.text for e in inbox.wait_for(lambda es: len(es) == 2)] == ["replicated", "only on the primary"]
    time.sleep(0.5)
    assert len(inbox_a.entries) == len(inbox_b.entries) == 2
    assert [(e.id, e.text) for e in inbox_a.entries] == [(e.id, e.text) for e in inbox_b.entries]
    new_primary = redis_py.Redis(port=group.replica.port, decode_responses=True)
    assert [(i, f["t"]) for i, f in new_primary.xrange(LOBBY)] == [(e.id, e.text) for e in inbox_a.entries]
    new_primary.close()


def test_a_line_written_twice_is_delivered_once(redis_server, cluster) -> None:  # noqa: F811
    """Whatever Redis holds twice (the same server's sequence number), a reader delivers once."""
    redis = redis_server()
    a, inbox = cluster(redis.url)
    raw = redis_py.Redis.from_url(redis.url, decode_responses=True)
    line = {"r": "lobby", "k": "chat", "s": "eve", "t": "once", "o": "other-server", "q": "7"}
    raw.xadd("securechat:log", line)
    raw.xadd("securechat:log", line)
    raw.xadd("securechat:log", {**line, "q": "8", "t": "next"})
    raw.close()
    assert [e.text for e in inbox.wait_for(lambda es: len(es) == 2)] == ["once", "next"]
    time.sleep(0.3)
    assert len(inbox.entries) == 2


def test_a_departure_is_written_only_if_the_session_was_not_resumed_elsewhere(redis_server, cluster) -> None:  # noqa: F811
    """A's part for ron's session is dropped once B has taken the session over; and once A's part is written,
    the session is over: B can no longer take it over (so never both "ron left" and ron carrying on)."""
    redis = redis_server()
    log_a, inbox_a = cluster(redis.url)
    dir_a = RedisDirectory(log_a.config, ttl=5.0)
    dir_b = RedisDirectory(RedisConfig(redis.url), ttl=5.0)
    for directory in (dir_a, dir_b):
        directory.start()
    try:
        for nick in ("ron", "sue", "tom"):
            assert dir_a.claim(nick)
            dir_a.remember_session(f"token-of-{nick}", nick, None)
        assert dir_b.session_nick("token-of-ron", None) == "ron" and dir_b.take_over("ron")
        # tom resumes on B and quits there at once, before A has noticed anything: A must not take his nick
        # or his session back, nor announce him gone a second time when its grace period runs out.
        assert dir_b.session_nick("token-of-tom", None) == "tom" and dir_b.take_over("tom")
        dir_b.remember_session("token-of-tom", "tom", None)
        dir_b.release("tom")
        dir_a.refresh()
        assert dir_b.locate("tom") is None and dir_a.session_nick("token-of-tom", None) is None
        log_a.append("lobby", "part", "tom", "connection lost", session="token-of-tom")
        log_a.append("lobby", "part", "ron", "connection lost", session="token-of-ron")  # ron goes on at B
        log_a.append("lobby", "part", "sue", "connection lost", session="token-of-sue")  # sue is gone
        log_a.append("lobby", "chat", "amy", "after")
        got = inbox_a.wait_for(lambda es: len(es) == 2)
        assert [(e.kind, e.sender) for e in got] == [("part", "sue"), ("chat", "amy")]
        assert dir_b.session_nick("token-of-sue", None) is None  # ended with its departure
        assert not dir_b.take_over("sue")
        raw = redis_py.Redis.from_url(redis.url, decode_responses=True)
        assert raw.hget(log_a.config.session_key("token-of-ron"), "origin") == dir_b.origin
        raw.close()
        # A's refresh finds ron taken over: it stops counting him (he is B's now) and keeps off his session.
        assert dir_a.everyone() == ["ron"] and dir_b.everyone() == ["sue"]  # counted once, as B's
        dir_a.release("ron")
        assert dir_b.locate("ron") == (dir_b.origin, "ron")
        assert dir_b.session_nick("token-of-ron", None) is None  # its own now: resumed the ordinary way
    finally:
        for directory in (dir_a, dir_b):
            directory.close()


def test_through_sentinel_the_servers_read_positions_and_history_survive_a_failover(redis_sentinel,
                                                                                    cluster) -> None:  # noqa: F811
    group: SentinelGroup = redis_sentinel()
    a, inbox = cluster(group.url)
    a.set_marks("alice", {"lobby": "5-0"})
    a.append("lobby", "chat", "alice", "kept")
    inbox.wait_for(lambda es: len(es) == 1)
    time.sleep(0.2)  # replicated
    group.primary.stop(signal.SIGKILL)
    group.wait_failover()
    b, inbox_b = cluster(group.url)  # a server started after the failover finds the new primary
    assert b.marks("alice") == {"lobby": "5-0"}
    assert [e.text for e in b.read_after("lobby", None, 10)] == ["kept"]
    a.append("lobby", "chat", "alice", "after the failover")
    assert [e.text for e in inbox_b.wait_for(lambda es: len(es) == 1)] == ["after the failover"]
    assert [e.text for e in inbox.wait_for(lambda es: len(es) == 2)] == ["kept", "after the failover"]
