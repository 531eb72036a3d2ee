"""Several securechat servers sharing one chat through a real redis-server.

In-process servers (ChatServer with the Redis room log and directory) for what the cluster does;
``securechat serve --redis`` subprocesses for the faults: Redis restarting, a server killed, Redis
unreachable at start.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from securechat.server.engine import ChatServer
from securechat.store import redis_config, redis_log
from securechat.store.redis_config import RedisConfig
from securechat.store.redis_directory import RedisDirectory
from securechat.store.redis_log import QUEUE_LIMIT, RedisRoomLog
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient

Serve = Callable[..., ChatServer]
Connect = Callable[..., LineClient]


@pytest.fixture
def node(serve: Serve) -> Iterator[Callable[..., ChatServer]]:
    """``node(url)``: an in-process server sharing its rooms through the Redis at ``url``."""
    directories: list[RedisDirectory] = []

    def start(url: str, ttl: float = 15.0, queue_limit: int = QUEUE_LIMIT, **options: object) -> ChatServer:
        config = RedisConfig(url)
        directory = RedisDirectory(config, ttl=ttl)
        directory.start()
        directories.append(directory)
        server = serve(roomlog=RedisRoomLog(config, queue_limit=queue_limit), directory=directory, **options)
        servers.append(server)
        return server

    servers: list[ChatServer] = []
    yield start
    for server in servers:  # sessions end (and release their nicks) before the directory closes
        server.shutdown()
    for directory in directories:
        directory.close()


def test_two_servers_share_a_chat(redis_server, node, connect: Connect) -> None:
    redis = redis_server()
    a, b = node(redis.url), node(redis.url)
    alice = connect(a, "alice")
    bob = connect(b, "bob")
    assert alice.expect("* bob joined") == "* bob joined"  # a join on B is told on A
    bob.send("hello from B")
    assert alice.expect("[bob]") == "[bob] hello from B"
    alice.send("hello from A")
    assert bob.expect("[alice]") == "[alice] hello from A"
    alice.send("/who")
    assert alice.expect("* 2 online") == "* 2 online: alice, bob"
    # Nicknames are unique across servers, look-alikes included.
    carol = connect(b)
    carol.expect("* securechat")
    carol.send("AIice")
    assert carol.expect("* nickname refused") == "* nickname refused: 'AIice' is taken; send another"
    carol.send("carol")
    assert carol.expect("* welcome") == "* welcome, carol! 3 online: alice, bob, carol. /help lists commands"
    alice.expect("* carol joined")
    # Private messages go to whichever server holds the nick.
    alice.send("/msg CAROL psst")
    assert carol.expect("[alice") == "[alice -> carol] psst"
    carol.send("/msg nobody hm")
    assert carol.expect("* no such") == "* no such nick: nobody"
    # Rooms span servers: /rooms counts everyone, only a room's members hear it.
    bob.send("/join dev")
    bob.expect("* you joined #dev")
    alice.send("/join Dev")
    alice.expect("* you joined #Dev")
    assert bob.expect("* alice joined") == "* alice joined"
    alice.send("in dev")
    assert bob.expect("[alice]") == "[alice] in dev"
    carol.send("/rooms")
    assert carol.expect("* 2 rooms") == "* 2 rooms: #dev (2), #lobby (3)"
    carol.send("/who dev")
    assert carol.expect("* 2 in") == "* 2 in #dev: alice, bob"
    # Leaving is told on every server.
    bob.send("/quit")
    assert alice.expect("* bob left") == "* bob left"
    assert carol.expect("* bob left") == "* bob left"
    carol.send("/who")
    assert carol.expect("* 2 online") == "* 2 online: alice, carol"


def test_history_said_on_one_server_is_replayed_on_another(redis_server, node, connect: Connect) -> None:
    redis = redis_server()
    a, b = node(redis.url), node(redis.url)
    alice = connect(a, "alice")
    for i in range(3):
        alice.send(f"line {i}")
    alice.send("/who")
    alice.expect("* 1 online")
    bob = connect(b, "bob")
    assert bob.expect("* history of #lobby") == "* history of #lobby: 3 lines"  # what was said (issue 18)
    replayed = [bob.readline() for _ in range(3)]
    assert [re.sub(r"^\(history \d\d:\d\d\) ", "", line) for line in replayed] == [
        "[alice] line 0", "[alice] line 1", "[alice] line 2"]
    assert bob.readline() == "* now live in #lobby"


def test_three_servers_one_order_for_everyone(redis_server, node, connect: Connect) -> None:
    redis = redis_server()
    servers = [node(redis.url, flood_rate=0) for _ in range(3)]
    clients = [connect(server, f"user{i}") for i, server in enumerate(servers)]
    listeners = [connect(server, f"listener{i}") for i, server in enumerate(servers)]
    for listener in listeners:
        listener.send("/who")
        listener.expect("* 6 online")
    for round_ in range(20):
        for i, client in enumerate(clients):
            client.send(f"{i}:{round_}")
    seen = []
    for listener in listeners:
        lines = [listener.expect(lambda line: line.startswith("[user")) for _ in range(60)]
        for i in range(3):
            mine = [line for line in lines if line.startswith(f"[user{i}]")]
            assert mine == [f"[user{i}] {i}:{r}" for r in range(20)]  # each sender's order
        seen.append(lines)
    assert seen[0] == seen[1] == seen[2]  # and one order on every server


def test_no_notice_that_did_not_happen_and_counts_agree_across_servers(redis_server, node, connect: Connect) -> None:
    """Issue #18, bug 10: one's own join never echoed back; "(N here)" counts the whole cluster, as /rooms does."""
    redis = redis_server()
    a, b = node(redis.url), node(redis.url)
    bob = connect(b, "bob")
    bob.send("/join dev")
    bob.expect("* you joined #dev")
    ron = connect(a, "ron")
    ron.send("/cap echo")  # what the securechat client asks for: its own lines back, as the others got them
    assert ron.expect("* cap: echo on")
    ron.send("/join dev")
    assert bob.expect("* ron joined") == "* ron joined"
    ron.send("/rooms")
    ron.send("hi")
    assert bob.expect("[ron]") == "[ron] hi"
    seen = [ron.readline()]
    while seen[-1] != "[ron] hi":  # echoed: the line went out; and everything ron got before it
        seen.append(ron.readline())
    assert seen[0] == "* you joined #dev (2 here); now talking in #dev"
    assert "* 2 rooms: #dev (2), #lobby (2)" in seen
    assert not [line for line in seen + ron.lines_until_quiet(0.5) if line.endswith("* ron joined")]


@pytest.mark.slow
def test_resuming_on_another_server_is_no_join_and_a_leave_is_told_once(redis_server, node, connect: Connect) -> None:
    """Issue #18, bug 10: ron's connection to A drops, he resumes on B: nobody is told he joined, A does not say he
    left when its grace period runs out; when he really leaves, everyone is told once."""
    redis = redis_server()
    a = node(redis.url, ttl=1.0, grace=1.0)
    b = node(redis.url, ttl=1.0, grace=1.0)
    dave = connect(a, "dave")
    carol = connect(b, "carol")
    ron = connect(a, "ron")
    for listener in (dave, carol):
        listener.expect("* ron joined")
    ron.send("/session")
    token = ron.expect("* session ").split()[2]
    ron.close()  # dropped: A holds his session for the grace period
    time.sleep(0.2)
    back = connect(b)
    back.expect("* securechat")
    back.send(f"/resume {token}")
    assert back.expect("* welcome").startswith("* welcome, ron! (resumed)")
    time.sleep(2.5)  # A's grace period is over
    for listener in (dave, carol):
        heard = listener.lines_until_quiet(0.5)
        assert not [line for line in heard if "ron" in line], heard
    for listener in (dave, carol, back):
        listener.send("/rooms")
        assert listener.expect("* 1 room") == "* 1 room: #lobby (3)"
        listener.send("/who")
        assert listener.expect("* 3 online") == "* 3 online: carol, dave, ron"
    back.send("/quit")
    for listener in (dave, carol):
        assert listener.expect("* ron left") == "* ron left"
        assert not [line for line in listener.lines_until_quiet(0.5) if "ron" in line]


def test_no_redis_call_runs_on_a_loop_thread(redis_server, node, connect: Connect, cert_files: dict[str, Path],
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's rule with the cluster's Redis calls (issues #20, #24): nick claims and renames, room counts,
    /rooms, /who, history, private messages, read positions, a session held, taken over on another server and
    expired there: every Redis round trip is made by a worker (or the Redis log's own threads), none by a loop
    thread, which would stall every connection it owns."""
    import redis as redis_py
    import trustme

    calls: list[tuple[str, str]] = []  # (command, thread)

    def watch(cls: type, name: str, command: Callable[..., str]) -> None:
        original = getattr(cls, name)

        def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((command(self, *args), threading.current_thread().name))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, watched)

    watch(redis_py.Redis, "execute_command", lambda _, *args: str(args[0]).upper())
    watch(redis_py.client.Pipeline, "execute",
          lambda pipe, *_: "PIPELINE " + " ".join(sorted({str(c[0][0]).upper() for c in pipe.command_stack})))
    people = trustme.CA()  # people with a certificate (read positions are kept for them), guests without
    ca_file = tmp_path / "people.pem"
    people.cert_pem.write_to_path(str(ca_file))
    ctx = tls.server_context(cert_files["cert"], cert_files["key"])
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    alice_ctx = tls.client_context(cert_files["ca"])
    people.issue_cert(common_name="alice").configure_cert(alice_ctx)
    redis = redis_server()
    a = node(redis.url, ttl=1.0, grace=1.0, context=ctx, offline_messages=True)
    b = node(redis.url, ttl=1.0, grace=1.0, context=ctx, offline_messages=True)
    alice = _join(a.address[1], alice_ctx, "alice")
    gus = connect(b, "gus")
    for line in ("/nick gustav", "/join dev", "/rooms", "/who dev", "/history", "/msg alice hi", "/msg zoe later",
                 "said in dev"):
        gus.send(line)
    assert alice.expect("[gustav ->") == "[gustav -> alice] hi"
    alice.send("/session")
    token = alice.expect("* session ").split()[2]
    alice.send("/join dev")
    assert alice.expect("* you joined") == "* you joined #dev (2 here); now talking in #dev"
    alice.close()  # dropped: A holds the session (its read positions saved), then B takes it over
    time.sleep(0.3)
    back = _resume(b.address[1], alice_ctx, token)
    assert back.expect("* welcome").startswith("* welcome, alice! (resumed)")
    time.sleep(2.0)  # A's grace period runs out: the session is B's, so A announces nothing
    back.send("/quit")
    assert gus.expect(lambda line: "alice left" in line) == "#lobby * alice left"  # resumed without positions
    commands = {command for command, _ in calls}
    on_workers = {command for command, thread in calls if thread.startswith("securechat-worker")}
    assert {"SET", "GET", "HGETALL", "EVALSHA", "XRANGE"} <= on_workers, on_workers  # the paths were taken
    assert "XREAD" in commands and "PIPELINE EVALSHA" in commands  # the log's reader and writer, for comparison
    # (The accept thread connects the log once, at start, before it accepts anyone.)
    on_loops = [(command, thread) for command, thread in calls if thread.startswith("securechat-loop")]
    assert not on_loops, on_loops


@pytest.mark.slow
def test_while_redis_is_away_lines_wait_people_are_told_and_a_full_queue_refuses(redis_server, node,
                                                                                  connect: Connect) -> None:
    """Lines said on both servers while Redis is down wait, and each arrives once, in order, when it is back.

    "Delivery resumed" is told once a server's writer is back too (its people's own lines go out), and its
    reader may deliver what the other server wrote before that: the notice and those lines come in either
    order, so every line is read, none skipped on the way to the notice. (Skipping to it once threw away
    alice's three lines on bob's side: under load B's reader had not read "bob joined" back when Redis died,
    so B's writer, sending it again, was still in its backoff when B's reader delivered alice's lines.)
    """
    redis = redis_server()
    a = node(redis.url, queue_limit=3)
    b = node(redis.url)
    alice, bob = connect(a, "alice"), connect(b, "bob")
    alice.expect("* bob joined")
    redis.stop(signal.SIGKILL)
    for i in range(4):
        alice.send(f"line {i}")
    assert alice.expect("* not delivered") == ("* not delivered (the chat's servers cannot reach their shared "
                                               "store): line 3")
    bob.send("waiting too")  # B's writer is down as well: either server may deliver before telling it resumed
    paused = ("* delivery paused: the chat's servers cannot reach their shared store; your lines wait and go out, "
              "in order, when it is back")
    assert alice.expect("* delivery", timeout=10) == paused
    assert bob.expect("* delivery", timeout=10) == paused
    redis.start()
    said = {alice: ["[bob] waiting too"], bob: [f"[alice] line {i}" for i in range(3)]}
    for client, lines in said.items():
        got = _lines_until(client, lambda seen, lines=lines: "* delivery resumed" in seen and
                           len([line for line in seen if line.startswith("[")]) >= len(lines))
        assert [line for line in got if line.startswith("[")] == lines, got
        assert got.count("* delivery resumed") == 1, got
        assert not [line for line in client.lines_until_quiet(0.5) if line.startswith("[")]  # nothing twice


def _lines_until(client: LineClient, done: Callable[[list[str]], bool], timeout: float = 15.0) -> list[str]:
    """Every line ``client`` gets until ``done(lines so far)``: nothing read on the way is skipped."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not done(lines):
        try:
            lines.append(client.readline(max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            raise AssertionError(f"not within {timeout} s; saw {lines!r}") from None
    return lines


def test_after_redis_is_back_a_servers_own_lines_do_not_wait_for_its_writers_backoff(
        redis_server, node, connect: Connect, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer backs off while Redis is away; once the reader has an answer again, the writer tries
    at once. Its backoff is made 30 s here (the reader's stays as it is): before, alice's line waited it
    out; the reader coming back is what sends it now."""

    class SlowWriterBackoff(redis_config.Backoff):
        def wait(self, stop: threading.Event) -> None:
            if threading.current_thread().name != "securechat-redis-writer":
                super().wait(stop)
                return
            self.delay = 30.0
            stop.wait(self.delay)

    monkeypatch.setattr(redis_log, "Backoff", SlowWriterBackoff)
    redis = redis_server()
    a, b = node(redis.url), node(redis.url)
    alice, bob = connect(a, "alice"), connect(b, "bob")
    alice.expect("* bob joined")
    redis.stop(signal.SIGKILL)
    alice.send("said while Redis was away")
    assert alice.expect("* delivery", timeout=10).startswith("* delivery paused")  # the writer has failed
    redis.start()
    assert bob.expect("[alice]", timeout=10) == "[alice] said while Redis was away"


# -- faults, with real server processes --------------------------------------------------------

def _join(port: int, ctx: ssl.SSLContext, nick: str) -> LineClient:
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    client = LineClient(ctx.wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


def test_redis_unreachable_at_start_is_one_line(serve_proc) -> None:
    pytest.importorskip("redis")
    served = serve_proc("--redis", "redis://127.0.0.1:1/0", ready=False)
    out, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 1
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("securechat serve: cannot use Redis at redis://127.0.0.1:1/0: ") and "refused" in err.lower()
    assert "Traceback" not in out + err and "Waiting for connections" not in out


def test_a_wrong_password_is_one_line_and_never_shown(redis_server, serve_proc) -> None:
    redis = redis_server(password="right")
    served = serve_proc("--redis", redis.url.replace(":right@", ":wrong@"), ready=False)
    out, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 1
    assert err == (f"securechat serve: cannot use Redis at redis://:***@127.0.0.1:{redis.port}/0: "
                   "Redis refused the password in the URL\n")


def _resume(port: int, ctx: ssl.SSLContext, token: str, *positions: str) -> LineClient:
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    client = LineClient(ctx.wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat")
    client.send(" ".join(("/resume", token, *positions)))
    return client


@pytest.mark.slow
def test_a_redis_restart_shows_nothing_early_and_a_resume_elsewhere_shows_nothing_twice(redis_server, serve_proc,
                                                                                        client_ctx) -> None:
    """Lines said while Redis is down wait for their ids (nobody sees them, not even on their own server), then
    arrive once, in one order; so a client that then moves to another server with its last id is shown nothing
    again (it was: a line first shown under a provisional id came back as "(missed ...)")."""
    redis = redis_server()
    a = serve_proc("--redis", redis.url)
    b = serve_proc("--redis", redis.url)
    alice, anna = _join(a.port, client_ctx, "alice"), _join(a.port, client_ctx, "anna")
    bob = _join(b.port, client_ctx, "bob")
    alice.expect("* bob joined")
    alice.send("/session")
    token = alice.expect("* session ").split()[2]
    bob.send("before")
    assert alice.expect(lambda line: "[bob]" in line).endswith("[bob] before")
    redis.stop(signal.SIGKILL)
    anna.send("during, on A")
    assert not [line for line in alice.lines_until_quiet(1.0) if "[anna]" in line]  # waits for its id
    redis.start()
    tagged = alice.expect(lambda line: "[anna]" in line, timeout=20)
    assert bob.expect("[anna]", timeout=20) == "[anna] during, on A"
    shown = re.match(r"@id=([0-9]+-[0-9]+);room=lobby \[anna\] during, on A\Z", tagged)
    assert shown is not None, tagged
    # alice's connection drops; her client resumes on B from the last id it saw: nothing again.
    alice.close()
    back = _resume(b.port, client_ctx, token, f"lobby={shown[1]}")
    assert back.expect("* welcome").startswith("* welcome, alice! (resumed)")
    anna.send("after")
    lines = back.lines_until_quiet(1.0)
    assert [re.sub(r"^@id=[0-9-]+;room=lobby ", "", line) for line in lines if "[anna]" in line] == [
        "[anna] after"]
    assert not [line for line in lines if "joined" in line or "left" in line]
    bob.send("/who")
    assert bob.expect("* 3 online") == "* 3 online: alice, anna, bob"


@pytest.mark.slow
def test_a_killed_server_vanishes_and_its_people_move_to_another(redis_server, serve_proc, client_ctx) -> None:
    redis = redis_server()
    a = serve_proc("--redis", redis.url, "--presence-ttl", "1")
    b = serve_proc("--redis", redis.url, "--presence-ttl", "1")
    alice = _join(a.port, client_ctx, "alice")
    bob = _join(b.port, client_ctx, "bob")
    alice.expect("* bob joined")
    alice.send("/who")
    assert alice.expect("* 2 online") == "* 2 online: alice, bob"
    b.proc.kill()
    b.proc.wait()
    killed = time.monotonic()
    while True:
        alice.send("/who")
        if alice.expect("* ") == "* 1 online: alice":
            break
        assert time.monotonic() - killed < 3, "bob still listed long after the TTL"
        time.sleep(0.2)
    # bob's client reconnects to A, under the same nick, and sees what was said meanwhile.
    alice.send("while bob was away")
    bob.close()
    bob = _join(a.port, client_ctx, "bob")
    assert bob.expect("* history of #lobby")
    assert bob.expect(lambda line: "while bob was away" in line).endswith("[alice] while bob was away")
    alice.expect("* bob joined")
    bob.send("back")
    assert alice.expect("[bob]") == "[bob] back"


@pytest.mark.slow
def test_a_session_resumes_on_another_server_when_its_own_is_killed(redis_server, serve_proc, client_ctx) -> None:
    redis = redis_server()
    a = serve_proc("--redis", redis.url, "--presence-ttl", "5")
    b = serve_proc("--redis", redis.url, "--presence-ttl", "5")
    alice = _join(a.port, client_ctx, "alice")
    anna = _join(a.port, client_ctx, "anna")
    bob = _join(b.port, client_ctx, "bob")
    alice.expect("* bob joined")
    bob.send("/session")
    token = bob.expect("* session ").split()[2]
    alice.send("seen by bob")
    tagged = bob.expect(lambda line: "seen by bob" in line)
    last_id = re.match(r"@id=([0-9]+-[0-9]+);room=lobby \[alice\] seen by bob\Z", tagged)
    assert last_id is not None, tagged
    b.proc.kill()
    b.proc.wait()
    bob.close()
    for i in range(3):
        alice.send(f"missed {i}")
    anna.expect("[alice] missed 2")  # said, and so stored, before bob is back
    # bob's client comes back on A with its token and the last id it saw: same nick, what it missed, once.
    raw = socket.create_connection((LOOPBACK, a.port), timeout=10)
    back = LineClient(client_ctx.wrap_socket(raw, server_hostname="localhost"))
    back.expect("* securechat")
    back.send(f"/resume {token} lobby={last_id[1]}")
    assert back.expect("* welcome").startswith("* welcome, bob! (resumed)")
    missed = [back.expect(lambda line: "[alice]" in line) for _ in range(3)]
    assert [re.sub(r"^@id=[0-9-]+;room=lobby \(missed \d\d:\d\d\) ", "", line) for line in missed] == [
        "[alice] missed 0", "[alice] missed 1", "[alice] missed 2"]
    assert not [line for line in back.lines_until_quiet(0.5) if "[alice]" in line]  # nothing twice
    alice.send("/who")
    assert alice.expect("* 3 online") == "* 3 online: alice, anna, bob"
    back.send("I am back")
    assert alice.expect("[bob]") == "[bob] I am back"
    # The token is bob's alone: a second use while bob is here is refused.
    raw = socket.create_connection((LOOPBACK, a.port), timeout=10)
    thief = LineClient(client_ctx.wrap_socket(raw, server_hostname="localhost"))
    thief.expect("* securechat")
    thief.send("/resume not-the-token lobby=1-0")
    assert thief.expect("* resume refused") == "* resume refused: unknown or expired session; send your nickname"


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_the_client_moves_to_the_next_server_of_connect_a_b_and_catches_up(redis_server, serve_proc, client_ctx,
                                                                          cert_files: dict[str, Path],
                                                                          how: int) -> None:
    """Killed, or stopped in order ("* server shutting down", a rolling restart): the client moves on."""
    redis = redis_server()
    a = serve_proc("--redis", redis.url)
    b = serve_proc("--redis", redis.url)
    alice = _join(a.port, client_ctx, "alice")
    proc = subprocess.Popen(
        [sys.executable, "-m", "securechat", "connect", f"{LOOPBACK}:{b.port},{LOOPBACK}:{a.port}",
         "--ca", str(cert_files["ca"]), "--nick", "reader"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.rstrip("\n"))

    def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, out
            time.sleep(0.05)

    import threading

    threading.Thread(target=read, daemon=True).start()
    try:
        alice.expect("* reader joined")  # on B, the first server of the list
        # The client's session is on record in Redis (so A can resume it) before a line whose id it will
        # know: a sleep instead lost that race on a loaded machine, and the client, with no position to
        # give, was shown the room's history instead of what it missed.
        import redis as redis_py

        sessions = redis_py.Redis.from_url(redis.url)
        wait_for(lambda: bool(sessions.keys("securechat:session:*")))
        sessions.close()
        alice.send("before")
        wait_for(lambda: "[alice] before" in out)
        b.proc.send_signal(how)
        b.proc.wait(15)
        for i in range(3):
            alice.send(f"while moving {i}")
        wait_for(lambda: any(line.startswith("* welcome, reader! (resumed)") for line in out))
        wait_for(lambda: sum("while moving" in line for line in out) == 3)
        time.sleep(0.5)
        moving = [line for line in out if "while moving" in line]
        assert [re.sub(r"^\(missed \d\d:\d\d\) ", "", line) for line in moving] == [
            f"[alice] while moving {i}" for i in range(3)]
        assert any(line.startswith("* connection lost") and "reconnecting" in line for line in out)
        assert out.count("[alice] before") == 1
        assert proc.stdin is not None
        proc.stdin.write("on A now\n")
        proc.stdin.flush()
        assert alice.expect("[reader]") == "[reader] on A now"
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_connect_parses_a_list_of_servers() -> None:
    from securechat.client.connect import parse_servers

    assert parse_servers("a,b:6000,[::1]:7000,[::1], c ") == [
        ("a", 5555), ("b", 6000), ("::1", 7000), ("::1", 5555), ("c", 5555)]
    assert parse_servers("::1") == [("::1", 5555)]
    assert parse_servers("a,b", 6000) == [("a", 6000), ("b", 6000)]  # --port: for those without one
    with pytest.raises(ValueError, match="two ports"):
        parse_servers("a,b:6001", 6000)
    for bad in ("a,,b", "a:0", "a:x", "[::1]x", ":5555", "a:70000", "999.1.1.1", "a,1.2.3", "a\x01b",
                ",".join(["a"] * 17)):
        with pytest.raises(ValueError):
            parse_servers(bad)


def test_connect_with_a_bad_server_list_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "securechat", "connect", "a,b:x"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("securechat connect: argument HOST[:PORT]: 'b:x': the port after ':' must be")
    assert proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_redis_port_that_never_answers_is_one_line_at_start(serve_proc) -> None:
    pytest.importorskip("redis")
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        served = serve_proc("--redis", f"redis://{LOOPBACK}:{port}/0", ready=False)
        started = time.monotonic()
        out, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 1 and time.monotonic() - started < 10
    assert err.startswith(f"securechat serve: cannot use Redis at redis://{LOOPBACK}:{port}/0: no answer within 3 s")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_two_serve_processes_share_a_chat_through_redis_over_tls_with_a_password(redis_server, serve_proc,
                                                                                client_ctx) -> None:
    import trustme

    redis_ca = trustme.CA()
    redis = redis_server(password="s3cret", tls=redis_ca.issue_cert("127.0.0.1"), ca=redis_ca)
    a = serve_proc("--redis", redis.url, "--redis-ca", str(redis.ca_file))
    b = serve_proc("--redis", redis.url, "--redis-ca", str(redis.ca_file))
    alice = _join(a.port, client_ctx, "alice")
    bob = _join(b.port, client_ctx, "bob")
    alice.expect("* bob joined")
    bob.send("over rediss://")
    assert alice.expect("[bob]") == "[bob] over rediss://"
    # Without the CA, the same URL is refused in one line.
    served = serve_proc("--redis", redis.url, ready=False)
    out, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 1
    assert err.startswith("securechat serve: cannot use Redis at rediss://:***@127.0.0.1:") and "not trusted" in err
    assert "s3cret" not in out + err


@pytest.mark.parametrize(("args", "message"), [
    (["--redis", "http://127.0.0.1:6379"], "--redis wants a redis://, rediss://, redis+sentinel:// or "
     "rediss+sentinel:// URL, not 'http://127.0.0.1:6379'"),
    (["--redis-ca", "ca.pem"], "--redis-ca needs --redis"),
    (["--redis", "redis://127.0.0.1:6379/0", "--redis-ca", "ca.pem"],
     "--redis-ca needs a rediss:// or rediss+sentinel:// (TLS) URL"),
    (["--redis", "redis+sentinel://127.0.0.1:26379/mymaster", "--redis-ca", "ca.pem"],
     "--redis-ca needs a rediss:// or rediss+sentinel:// (TLS) URL"),
    (["--redis", "redis+sentinel://127.0.0.1:26379"], "--redis redis+sentinel://127.0.0.1:26379: name the Sentinel "
     "group after the hosts: redis+sentinel://HOST:PORT/MASTER (MASTER as in sentinel.conf's 'sentinel monitor "
     "MASTER ...')"),
    (["--redis", "redis+sentinel://:pw@a:1,b:x/m"], "--redis redis+sentinel://:***@a:1,b:x/m: bad Sentinel address "
     "'b:x': the port must be 1-65535"),
    (["--redis", "redis+sentinel://a,::1/m"], "--redis redis+sentinel://a,::1/m: bad Sentinel address '::1': write "
     "an IPv6 address as [ADDRESS]:PORT"),
    (["--redis", "rediss+sentinel://a/m/x"], "--redis rediss+sentinel://a/m/x: after the group name, only a "
     "database number: .../MASTER/0"),
    (["--redis", "redis://127.0.0.1:6379/0", "--presence-ttl", "0.5"], "--presence-ttl must be at least 1 second"),
])
def test_bad_redis_options_are_usage_errors(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "securechat", "serve", "--plain", "--port", "0", *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == f"securechat serve: {message}; see 'securechat serve --help'\n"
