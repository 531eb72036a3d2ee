"""The Redis room log and nick directory, against a real redis-server on loopback.

Two or three RedisRoomLog/RedisDirectory objects on one Redis are two or three servers of one
cluster; the killed-server test runs its directory in a process of its own and kills it.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from securechat.store.redis_config import RedisConfig, RedisStartError, redact
from securechat.store.redis_directory import RedisDirectory
from securechat.store.redis_log import RedisRoomLog
from securechat.store.roomlog import DirectoryUnavailable, Entry
from securechat.wire.ids import id_key

LOOPBACK_CLOSED = "redis://127.0.0.1:1/0"


class Inbox:
    """What one server's log delivered, with a condition to wait on."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.cond = threading.Condition()

    def __call__(self, entry: Entry) -> None:
        with self.cond:
            self.entries.append(entry)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Entry]], bool], timeout: float = 20.0) -> list[Entry]:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.entries), timeout):
                raise AssertionError(f"timed out; have {len(self.entries)}: {self.entries[-5:]!r}")
            return list(self.entries)

    def texts(self) -> list[str]:
        with self.cond:
            return [e.text for e in self.entries]


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Callable[..., tuple[RedisRoomLog, Inbox]]:
    """``cluster(url, **options)`` starts a RedisRoomLog (one 'server'); all closed afterwards."""
    logs: list[RedisRoomLog] = []

    def start(url: str, ca_file: str | None = None, **options: object) -> tuple[RedisRoomLog, Inbox]:
        roomlog = RedisRoomLog(RedisConfig(url, ca_file=ca_file), **options)  # type: ignore[arg-type]
        inbox = Inbox()
        roomlog.start(inbox)
        logs.append(roomlog)
        return roomlog, inbox

    yield start  # type: ignore[misc]
    for roomlog in logs:
        roomlog.close()


def _by_sender(entries: list[Entry]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for entry in entries:
        out.setdefault(entry.sender, []).append(entry.text)
    return out


def test_two_servers_see_every_line_once_in_one_order_and_ids_are_stream_ids(redis_server, cluster) -> None:
    redis = redis_server()
    a, inbox_a = cluster(redis.url)
    b, inbox_b = cluster(redis.url)
    for i in range(5):
        a.append("lobby", "chat", "alice", f"a{i}")
        b.append("lobby", "chat", "bob", f"b{i}")
    b.append("other", "join", "carol", "")
    got_a = inbox_a.wait_for(lambda es: len(es) == 11)
    got_b = inbox_b.wait_for(lambda es: len(es) == 11)
    assert [(e.id, e.text) for e in got_a] == [(e.id, e.text) for e in got_b]  # one order on both servers
    assert [e.id for e in got_a] == sorted((e.id for e in got_a), key=id_key)
    assert _by_sender(got_a)["alice"] == [f"a{i}" for i in range(5)]
    assert {e.origin for e in got_a if e.sender == "alice"} == {a.origin} != {b.origin}
    # The delivered id is the stream id: history on either server pages by it.
    lobby = [e for e in got_a if e.room == "lobby"]
    assert [e.id for e in b.read_after("lobby", None, 100)] == [e.id for e in lobby]
    assert [e.text for e in a.read_after("lobby", lobby[3].id, 3)] == [e.text for e in lobby[4:7]]
    assert [e.text for e in a.read_before("lobby", lobby[3].id, 2)] == [e.text for e in lobby[1:3]]
    assert [e.text for e in a.read_before("lobby", None, 2)] == [e.text for e in lobby[-2:]]
    assert [(e.kind, e.sender) for e in b.read_after("other", None, 10)] == [("join", "carol")]
    assert a.read_after("nowhere", None, 10) == []


def test_history_is_capped_per_room(redis_server, cluster) -> None:
    redis = redis_server()
    a, inbox = cluster(redis.url, history_lines=10)
    for i in range(300):
        a.append("lobby", "chat", "alice", str(i))
    inbox.wait_for(lambda es: len(es) == 300)
    kept = a.read_after("lobby", None, 1000)
    # MAXLEN ~ trims whole radix-tree nodes (100 entries): approximately the cap, never everything.
    assert 10 <= len(kept) < 300
    assert kept[-1].text == "299"


def test_history_days_forgets_old_lines_exactly_in_quiet_rooms_inboxes_and_the_firehose(
        redis_server, cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17, finding 10: --history-days with --redis trimmed only the rooms this server had just
    written to, approximately (XTRIM MINID ~ never removes a partly filled node: a quiet room kept all)."""
    import redis as redis_py

    from securechat.store import redis_log

    monkeypatch.setattr(redis_log, "TRIM_EVERY", 0.2)
    redis = redis_server()
    raw = redis_py.Redis.from_url(redis.url, decode_responses=True)
    old = {"k": "chat", "r": "quiet", "s": "alice", "t": "a year ago", "o": "gone", "q": "1", "ts": "1.0"}
    # Lines a server that is gone wrote long ago (their ids are their times): a quiet room, a person's
    # stored private messages, that server's inbox of routed ones, and the firehose.
    for key in ("securechat:room:quiet", "securechat:room:@bob", "securechat:inbox:gone", "securechat:log"):
        for i in range(150):
            raw.xadd(key, old, id=f"{1_000_000 + i}-0")
    raw.xadd("securechat:room:quiet", {**old, "t": "today"})  # and one line of now, which stays
    a, inbox = cluster(redis.url, history_seconds=3600.0)
    a.append("other", "chat", "dave", "a room this server writes to")
    inbox.wait_for(lambda es: len(es) == 1)
    deadline = time.monotonic() + 10
    lengths: dict[str, int] = {}
    while time.monotonic() < deadline:
        lengths = {key: raw.xlen(key) for key in ("securechat:room:quiet", "securechat:room:@bob",
                                                  "securechat:inbox:gone", "securechat:log")}
        if lengths == {"securechat:room:quiet": 1, "securechat:room:@bob": 0, "securechat:inbox:gone": 0,
                       "securechat:log": 1}:
            break
        time.sleep(0.1)
    assert lengths == {"securechat:room:quiet": 1, "securechat:room:@bob": 0, "securechat:inbox:gone": 0,
                       "securechat:log": 1}
    assert [e.text for e in a.read_after("quiet", None, 10)] == ["today"]
    raw.close()


def test_a_line_from_redis_that_is_not_ours_is_skipped_or_sanitised(redis_server, cluster) -> None:
    import redis as redis_py

    redis = redis_server()
    a, inbox = cluster(redis.url)
    raw = redis_py.Redis.from_url(redis.url)
    raw.xadd("securechat:log", {"k": "rm -rf", "r": "lobby"})  # unknown kind
    raw.xadd("securechat:log", {"k": "chat", "r": "lobby", "s": "eve", "t": "\x1b]0;pwned\x07hi\x1b[2J"})
    raw.close()
    got = inbox.wait_for(lambda es: len(es) == 1)
    assert got[0].sender == "eve" and got[0].text == "hi"


def test_three_servers_three_senders_keep_order_under_load(redis_server, cluster) -> None:
    redis = redis_server()
    servers = [cluster(redis.url) for _ in range(3)]
    lines = 300

    def send(index: int) -> None:
        roomlog = servers[index][0]
        for i in range(lines):
            roomlog.append("lobby", "chat", f"s{index}", str(i))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    orders = []
    for _, inbox in servers:
        got = inbox.wait_for(lambda es: len(es) == 3 * lines)
        assert _by_sender(got) == {f"s{i}": [str(n) for n in range(lines)] for i in range(3)}
        orders.append([e.id for e in got])
    assert orders[0] == orders[1] == orders[2]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "clean-restart"])
def test_redis_restart_mid_stream_loses_nothing_repeats_nothing_and_shows_nothing_early(redis_server, cluster,
                                                                                      how) -> None:
    """While Redis is down nothing is delivered (not even a server's own lines to its own people): every line
    anyone sees has its final stream id, so one order everywhere and resuming from any id is exact."""
    redis = redis_server()
    a, inbox_a = cluster(redis.url)
    b, inbox_b = cluster(redis.url)
    stop = threading.Event()
    sent: dict[str, int] = {"sa": 0, "sb": 0}

    def send(roomlog: RedisRoomLog, who: str) -> None:
        while not stop.is_set():
            assert roomlog.append("lobby", "chat", who, str(sent[who]))
            sent[who] += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=send, args=(a, "sa")), threading.Thread(target=send, args=(b, "sb"))]
    for t in threads:
        t.start()
    inbox_b.wait_for(lambda es: len(es) > 100)
    redis.stop(how)
    time.sleep(0.3)  # what was in flight has arrived by now
    shown = len(inbox_a.entries), len(inbox_b.entries)
    before = sent["sa"]
    deadline = time.monotonic() + 10
    while sent["sa"] < before + 50:  # the people go on talking
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert (len(inbox_a.entries), len(inbox_b.entries)) == shown  # nothing delivered meanwhile, not even locally
    assert a.paused and b.paused and a.queued > 0
    redis.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    total = sent["sa"] + sent["sb"]
    for inbox in (inbox_a, inbox_b):
        inbox.wait_for(lambda es: len(es) >= total)
        time.sleep(0.3)  # anything extra (a duplicate) would arrive now
        assert len(inbox.entries) == total
        assert _by_sender(inbox.entries) == {w: [str(i) for i in range(n)] for w, n in sent.items()}
    # One order on both servers, through the outage, and every id delivered is the stored one.
    assert [(e.id, e.text) for e in inbox_a.entries] == [(e.id, e.text) for e in inbox_b.entries]
    stored = a.read_after("lobby", None, 100_000)
    assert [(e.id, e.sender, e.text) for e in stored] == [(e.id, e.sender, e.text) for e in inbox_a.entries]
    deadline = time.monotonic() + 10
    while (a.paused or b.paused) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not a.paused and not b.paused


def test_a_resent_batch_is_written_once_and_in_order(redis_server) -> None:
    """The append script skips a (server, seq) it has seen (a batch re-sent after a lost reply), and refuses
    to write past a gap the sender can still fill (a pipeline refused half-way must not reorder lines)."""
    import redis as redis_py

    from securechat.store.redis_log import _APPEND_LUA

    redis = redis_server()
    client = redis_py.Redis.from_url(redis.url, decode_responses=True)
    script = client.register_script(_APPEND_LUA)
    keys = ["securechat:log", "securechat:room:lobby", "securechat:seq:x"]

    def append(seq: int, floor: int, text: str) -> str | None:
        return script(keys=keys, args=[seq, floor, 60000, 100, 100, "k", "chat", "t", text])

    first = append(1, 1, "one")
    assert append(1, 1, "one") is None
    with pytest.raises(redis_py.ResponseError, match="SEQGAP 1"):
        append(3, 2, "three")  # two is still the sender's to send: three waits for it
    second = append(2, 2, "two")
    third = append(3, 2, "three")
    assert append(5, 5, "five") is not None  # four is gone for good (not the sender's any more): crossed
    assert [f["t"] for _, f in client.xrange("securechat:log")] == ["one", "two", "three", "five"]
    assert [i for i, _ in client.xrange("securechat:room:lobby")][:3] == [first, second, third]
    client.close()


@pytest.mark.slow
def test_a_full_queue_refuses_new_lines_and_says_so(redis_server, cluster, caplog) -> None:
    redis = redis_server()
    a, inbox_a = cluster(redis.url, queue_limit=20)
    b, inbox_b = cluster(redis.url)
    redis.stop(signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="securechat.redis"):
        accepted = [a.append("lobby", "chat", "alice", str(i)) for i in range(30)]
    assert accepted == [True] * 20 + [False] * 10  # refused at once: the room code tells the sender
    assert any("new lines are refused" in r.message for r in caplog.records)
    time.sleep(0.3)
    assert inbox_a.entries == [] and inbox_b.entries == []
    redis.start()
    # The queued twenty reach both servers, once, in order; the ten refused never will.
    for inbox in (inbox_a, inbox_b):
        assert [e.text for e in inbox.wait_for(lambda es: len(es) == 20)] == [str(i) for i in range(20)]
    time.sleep(0.5)
    assert len(inbox_b.entries) == 20 and len(inbox_a.entries) == 20
    assert a.append("lobby", "chat", "alice", "room again")


def test_close_writes_everything_appended(redis_server, cluster) -> None:
    redis = redis_server()
    a, _ = cluster(redis.url)
    for i in range(2000):
        a.append("lobby", "chat", "alice", str(i))
    a.close()
    b, _ = cluster(redis.url)
    assert [e.text for e in b.read_after("lobby", None, 5000)] == [str(i) for i in range(2000)]


# -- starting: one clear line ---------------------------------------------------------------

def test_unreachable_redis_at_start_is_one_line() -> None:
    pytest.importorskip("redis")
    roomlog = RedisRoomLog(RedisConfig(LOOPBACK_CLOSED))
    with pytest.raises(RedisStartError) as info:
        roomlog.start(lambda e: None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot use Redis at redis://127.0.0.1:1/0:") and "refused" in message.lower()


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "unix:///tmp/redis.sock"])
def test_a_url_that_is_not_redis_is_refused(url: str) -> None:
    with pytest.raises(RedisStartError, match="redis://, rediss://, redis.sentinel:// or rediss.sentinel://"):
        RedisConfig(url)


def test_a_password_is_never_shown() -> None:
    assert redact("rediss://:s3cret@10.0.0.1:6380/0") == "rediss://:***@10.0.0.1:6380/0"
    assert redact("redis://user:s3cret@[::1]:6379/0") == "redis://user:***@[::1]:6379/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_password_required_wrong_and_right(redis_server, cluster) -> None:
    redis = redis_server(password="correct-horse")
    bare = redis.url.replace(":correct-horse@", "")
    with pytest.raises(RedisStartError, match="requires a password"):
        RedisConfig(bare).check()
    wrong = redis.url.replace("correct-horse", "battery")
    with pytest.raises(RedisStartError, match="refused the password") as info:
        RedisConfig(wrong).check()
    assert "battery" not in str(info.value)
    a, inbox = cluster(redis.url)
    a.append("lobby", "chat", "alice", "hi")
    assert inbox.wait_for(lambda es: len(es) == 1)[0].text == "hi"


@pytest.fixture(scope="module")
def redis_ca() -> trustme.CA:
    return trustme.CA()


def test_redis_over_tls_with_a_password(redis_server, cluster, redis_ca, tmp_path: Path) -> None:
    redis = redis_server(password="pw", tls=redis_ca.issue_cert("127.0.0.1"), ca=redis_ca)
    assert redis.url.startswith("rediss://")
    a, inbox_a = cluster(redis.url, ca_file=redis.ca_file)
    b, inbox_b = cluster(redis.url, ca_file=redis.ca_file)
    a.append("lobby", "chat", "alice", "over tls")
    assert inbox_b.wait_for(lambda es: len(es) == 1)[0].text == "over tls"
    # A client that does not trust Redis's CA refuses it, in one line.
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    with pytest.raises(RedisStartError, match="not trusted"):
        RedisConfig(redis.url, ca_file=str(tmp_path / "other.pem")).check()
    # And plain redis:// against the TLS port fails cleanly too.
    with pytest.raises(RedisStartError, match="cannot use Redis"):
        RedisConfig(redis.url.replace("rediss://", "redis://")).check()


def test_tls_options_need_a_rediss_url(tmp_path: Path) -> None:
    with pytest.raises(RedisStartError, match="rediss://"):
        RedisConfig("redis://127.0.0.1:6379/0", ca_file=str(tmp_path / "x"))
    with pytest.raises(RedisStartError, match="not found"):
        RedisConfig("rediss://127.0.0.1:6379/0", ca_file=str(tmp_path / "missing.pem"))


# -- the nick directory ---------------------------------------------------------------------

@pytest.fixture
def directories() -> Callable[..., RedisDirectory]:
    made: list[RedisDirectory] = []

    def start(url: str, config: RedisConfig | None = None, **options: object) -> RedisDirectory:
        """A directory; pass a log's ``config`` to make it that log's server (same origin)."""
        directory = RedisDirectory(config or RedisConfig(url), **options)  # type: ignore[arg-type]
        directory.start()
        made.append(directory)
        return directory

    yield start  # type: ignore[misc]
    for directory in made:
        directory.close()


def test_a_nick_is_unique_across_servers_even_when_raced(redis_server, directories) -> None:
    redis = redis_server()
    servers = [directories(redis.url) for _ in range(3)]
    for round_ in range(20):
        nick = f"racer{round_}"
        results: list[bool] = [False] * 3
        barrier = threading.Barrier(3)

        def claim(i: int, nick: str = nick, results: list[bool] = results,
                  barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            results[i] = servers[i].claim(nick if i != 1 else nick.upper())  # case-folded: the same nick
        threads = [threading.Thread(target=claim, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(results) == 1, results
    # Look-alikes fold to one nick across servers as they do on one.
    assert servers[0].claim("alice")
    assert not servers[1].claim("AIice")
    assert servers[0].claim("Alice")  # its own nick again (a new spelling): still its own


def test_members_rooms_and_everyone_report_the_other_servers(redis_server, directories) -> None:
    redis = redis_server()
    a, b = directories(redis.url), directories(redis.url)
    assert a.claim("alice") and b.claim("bob") and b.claim("carol")
    a.joined("lobby", "alice")
    b.joined("lobby", "bob")
    b.joined("Dev", "bob")
    b.joined("dev", "carol")
    assert a.members("lobby") == ["bob"] and b.members("lobby") == ["alice"]
    assert a.members("#DEV") == ["bob", "carol"] and b.members("dev") == []
    assert a.rooms() == {"Dev": 2, "lobby": 1} and b.rooms() == {"lobby": 1}
    assert a.everyone() == ["bob", "carol"] and b.everyone() == ["alice"]
    assert a.online("BOB") and not a.online("alice") and not a.online("nobody")
    b.parted("Dev", "bob")
    b.release("carol")
    assert a.rooms() == {"lobby": 1} and a.everyone() == ["bob"]
    assert a.claim("carol")  # free again
    b.release("bob")
    assert a.members("lobby") == [] and a.rooms() == {} and a.everyone() == []
    assert a.locate("bob") is None and a.locate("ALICE") == (a.origin, "alice")


@pytest.mark.slow
def test_nicks_outlive_the_ttl_while_refreshed_and_only_the_owner_releases(redis_server, directories) -> None:
    redis = redis_server()
    a = directories(redis.url, ttl=1.0)
    b = directories(redis.url, ttl=1.0)
    assert a.claim("alice")
    a.joined("lobby", "alice")
    time.sleep(2.5)  # 2.5 TTLs: alive only because a refreshes it
    assert not b.claim("alice") and b.members("lobby") == ["alice"] and b.everyone() == ["alice"]
    # a stops refreshing (as if frozen); the nick expires; b takes it; a's late release leaves b's alone.
    a._stop.set()
    assert a._thread is not None
    a._thread.join()
    time.sleep(1.3)
    assert b.members("lobby") == [] and b.everyone() == [] and b.rooms() == {}
    assert b.claim("alice")
    a.release("alice")
    assert b.locate("alice") == (b.origin, "alice")


@pytest.mark.slow
def test_a_restarted_redis_without_data_gets_the_nicks_back(redis_server, directories) -> None:
    redis = redis_server(persistent=False)
    a = directories(redis.url, ttl=1.0)
    assert a.claim("alice")
    a.joined("lobby", "alice")
    redis.restart(signal.SIGKILL)
    b = directories(redis.url, ttl=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and b.locate("alice") is None:
        time.sleep(0.1)
    assert b.locate("alice") == (a.origin, "alice") and b.members("lobby") == ["alice"]
    assert not b.claim("alice")


def test_while_redis_is_down_no_nick_is_granted_and_the_rest_answers_at_once(redis_server, directories) -> None:
    redis = redis_server()
    a = directories(redis.url, ttl=1.0)
    b = directories(redis.url, ttl=1.0)
    assert b.claim("bob")
    b.joined("lobby", "bob")
    assert a.members("lobby") == ["bob"]
    redis.stop(signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable):
        a.claim("alice")  # never granted without asking: b might be granting it too
    with pytest.raises(DirectoryUnavailable):
        b.claim("alice")
    assert time.monotonic() - started < 2.5  # one timeout at most (refused at once: no timeout)
    started = time.monotonic()
    assert a.members("lobby") == [] and a.rooms() == {} and a.everyone() == [] and not a.online("bob")
    with pytest.raises(DirectoryUnavailable):
        a.claim("alice")
    assert time.monotonic() - started < 0.5  # known to be down: no timeout per call
    assert not a.available
    redis.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (a.available and b.available):
        time.sleep(0.05)
    assert a.claim("alice") and not b.claim("alice") and b.locate("alice") == (a.origin, "alice")


_DYING_SERVER = """
import sys, time
from securechat.store.redis_config import RedisConfig
from securechat.store.redis_directory import RedisDirectory
d = RedisDirectory(RedisConfig(sys.argv[1]), ttl=1.0)
d.start()
assert d.claim("doomed")
d.joined("lobby", "doomed")
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_a_killed_servers_people_vanish_within_the_ttl(redis_server, directories) -> None:
    redis = redis_server()
    a = directories(redis.url, ttl=1.0)
    assert a.claim("alice")
    a.joined("lobby", "alice")
    proc = subprocess.Popen([sys.executable, "-c", _DYING_SERVER, redis.url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert a.members("lobby") == ["doomed"] and a.everyone() == ["doomed"]
        assert not a.claim("doomed")
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        while a.members("lobby"):
            assert time.monotonic() - killed < 1.5, a.members("lobby")
            time.sleep(0.05)
        assert a.everyone() == [] and a.rooms() == {}
        assert a.claim("doomed")
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_private_messages_go_to_the_server_holding_the_nick_and_are_not_kept(redis_server, cluster,
                                                                             directories) -> None:
    import redis as redis_py

    redis = redis_server()
    log_a, inbox_a = cluster(redis.url)
    log_b, inbox_b = cluster(redis.url)
    log_c, inbox_c = cluster(redis.url)
    dir_a, dir_b = directories(redis.url, log_a.config), directories(redis.url, log_b.config)
    assert dir_a.claim("alice") and dir_b.claim("bob")
    log_a.append("@bob", "private", "alice", "psst", "bob", store=False)
    log_b.append("@bob", "private", "carol", "local one", "bob", store=False)
    got = inbox_b.wait_for(lambda es: len(es) == 2)
    assert sorted((e.room, e.kind, e.sender, e.target, e.text) for e in got) == [
        ("@bob", "private", "alice", "bob", "psst"), ("@bob", "private", "carol", "bob", "local one")]
    log_a.append("lobby", "chat", "alice", "after")  # everything before it has been routed by now
    inbox_c.wait_for(lambda es: len(es) == 1)
    inbox_a.wait_for(lambda es: len(es) == 1)
    assert [e.text for e in inbox_a.entries] == ["after"] and [e.text for e in inbox_c.entries] == ["after"]
    assert log_a.read_after("@bob", None, 10) == []  # not kept in any history
    raw = redis_py.Redis.from_url(redis.url, decode_responses=True)
    assert not raw.exists("securechat:room:@bob")
    assert all(fields.get("k") != "private" for _, fields in raw.xrange("securechat:log"))
    raw.close()
    # Nobody holds the nick: dropped (the room code answered "no such nick" before appending).
    log_a.append("@nobody", "private", "alice", "lost", "nobody", store=False)
    log_a.append("lobby", "chat", "alice", "after2")
    inbox_b.wait_for(lambda es: len(es) == 4)
    assert sorted(e.text for e in inbox_b.entries) == ["after", "after2", "local one", "psst"]


def test_read_positions_are_kept_for_every_server(redis_server, cluster) -> None:
    redis = redis_server()
    a, _ = cluster(redis.url)
    b, _ = cluster(redis.url)
    assert a.marks("alice") == {}
    a.set_marks("alice", {"lobby": "5-0", "@alice": "7-1"})
    assert a.marks("alice") == {"lobby": "5-0", "@alice": "7-1"}  # at once, before it is written
    deadline = time.monotonic() + 10
    while b.marks("alice") != {"lobby": "5-0", "@alice": "7-1"}:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    a.set_marks("alice", {"dev": "9-0"})
    while b.marks("alice") != {"dev": "9-0"}:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_scripts_flushed_from_redis_are_loaded_again(redis_server, cluster) -> None:
    import redis as redis_py

    redis = redis_server()
    a, inbox = cluster(redis.url)
    a.append("lobby", "chat", "alice", "one")
    inbox.wait_for(lambda es: len(es) == 1)
    raw = redis_py.Redis.from_url(redis.url)
    raw.script_flush()  # what a restarted Redis without persistence looks like to the writer
    raw.close()
    a.append("lobby", "chat", "alice", "two")
    assert [e.text for e in inbox.wait_for(lambda es: len(es) == 2)] == ["one", "two"]
    assert not a.paused


def test_no_history_shares_live_lines_and_keeps_none(redis_server, cluster) -> None:
    import redis as redis_py

    redis = redis_server()
    a, _ = cluster(redis.url, history=False)
    b, inbox_b = cluster(redis.url, history=False)
    assert not a.stores
    a.append("lobby", "chat", "alice", "live only")
    assert inbox_b.wait_for(lambda es: len(es) == 1)[0].text == "live only"
    assert b.read_after("lobby", None, 10) == []
    raw = redis_py.Redis.from_url(redis.url)
    assert not raw.exists("securechat:room:lobby")
    raw.close()


def test_history_lines_zero_keeps_every_line(redis_server, cluster) -> None:
    redis = redis_server()
    a, inbox = cluster(redis.url, history_lines=0)
    for i in range(250):
        a.append("lobby", "chat", "alice", str(i))
    inbox.wait_for(lambda es: len(es) == 250)
    assert len(a.read_after("lobby", None, 1000)) == 250


def test_a_failing_deliver_does_not_stop_the_reader(redis_server, caplog) -> None:
    redis = redis_server()
    got: list[str] = []

    def deliver(entry: Entry) -> None:
        if entry.text == "boom":
            raise RuntimeError("a bug in the room code")
        got.append(entry.text)

    roomlog = RedisRoomLog(RedisConfig(redis.url))
    roomlog.start(deliver)
    try:
        with caplog.at_level(logging.ERROR, logger="securechat.redis"):
            for text in ("one", "boom", "two"):
                roomlog.append("lobby", "chat", "alice", text)
            deadline = time.monotonic() + 10
            while got != ["one", "two"]:
                assert time.monotonic() < deadline, got
                time.sleep(0.02)
        assert any("delivering" in r.message for r in caplog.records)
    finally:
        roomlog.close()


@pytest.mark.slow
def test_a_session_is_resumed_elsewhere_only_while_nobody_else_took_its_nick(redis_server, directories) -> None:
    redis = redis_server()
    a = directories(redis.url, ttl=1.0, grace=5.0)
    b = directories(redis.url, ttl=1.0, grace=5.0)
    c = directories(redis.url, ttl=1.0, grace=5.0)
    assert b.claim("bob") and b.claim("dave")
    b.remember_session("token-bob", "bob", None)
    b.remember_session("token-dave", "dave", None)
    assert a.session_nick("unknown", None) is None
    assert a.session_nick("token-bob", "someone") is None  # under mutual TLS: the same person only
    assert b.session_nick("token-bob", None) is None  # its own server resumes it the ordinary way
    # b dies (stops refreshing): its nicks expire after the TTL, its sessions outlive them by the grace.
    b._stop.set()
    assert b._thread is not None
    b._thread.join()
    assert a.session_nick("token-bob", None) == "bob"
    assert a.take_over("bob")  # still b's: taken over at once, without waiting for the TTL
    assert c.locate("bob") == (a.origin, "bob")
    time.sleep(1.3)
    assert c.claim("dave")  # meanwhile someone else took dave
    assert a.session_nick("token-dave", None) == "dave"
    assert not a.take_over("dave")  # never from him
    assert c.locate("dave") == (c.origin, "dave")
    assert not a.take_over("carol")  # nothing asked for carol
