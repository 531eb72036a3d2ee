"""Catch-up after a dropped connection, for real: a TCP relay between client and server that the test cuts.

The client is the real `securechat connect` (line mode) or a ChatClient; the server keeps history in a
real SQLite file; three senders keep talking while the relay is cut and restored.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from securechat.client.chat import ChatClient
from securechat.server.engine import ChatServer
from securechat.store.history import SqliteLog
from securechat.wire import protocol
from securechat.wire.ids import room_key
from securechat.wire.resume import ResumeState, backoff
from tests.conftest import LOOPBACK, LineClient
from tests.relay import Relay

Serve = Callable[..., ChatServer]
Connect = Callable[..., LineClient]


@pytest.fixture
def relay() -> Iterator[Callable[[tuple[str, int]], Relay]]:
    relays: list[Relay] = []

    def make(target: tuple[str, int]) -> Relay:
        r = Relay(target)
        relays.append(r)
        return r

    yield make
    for r in relays:
        r.close()


class Talkers:
    """Three senders, each saying ``tI N`` with N counting up, every few milliseconds."""

    def __init__(self, clients: list[LineClient]) -> None:
        self.clients = clients
        self.sent = [0] * len(clients)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._talk, args=(i,), daemon=True) for i in range(len(clients))]
        for t in self.threads:
            t.start()

    def _talk(self, i: int) -> None:
        while not self.stop.is_set():
            self.clients[i].send(f"t{i} {self.sent[i]}")
            self.sent[i] += 1
            time.sleep(0.01)

    def finish(self) -> list[int]:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        return self.sent


_SAID = re.compile(r"(?:\(missed \d\d:\d\d\) )?\[(t\d)\] t\d (\d+)\Z")


def _check_every_line_once_in_order(lines: list[str], sent: list[int]) -> None:
    per: dict[str, list[int]] = {f"t{i}": [] for i in range(len(sent))}
    for line in lines:
        m = _SAID.match(line)
        if m:
            per[m[1]].append(int(m[2]))
    for i, n in enumerate(sent):
        got = per[f"t{i}"]
        assert got == list(range(n)), (f"t{i}: {len(got)} lines for {n} sent; duplicates: "
                                       f"{len(got) - len(set(got))}; missing: {sorted(set(range(n)) - set(got))[:10]}")


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_the_cli_client_resumes_after_a_cut_with_every_line_once_in_order(
        serve: Serve, connect: Connect, relay: Callable[[tuple[str, int]], Relay], cert_files: dict[str, Path],
        tmp_path: Path) -> None:
    server = serve(roomlog=SqliteLog(tmp_path / "h.sqlite3"), flood_rate=0)
    r = relay(server.address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "securechat", "connect", LOOPBACK, "--port", str(r.port), "--ca", str(cert_files["ca"]),
         "--nick", "reader"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _wait_for(lambda: any(line.startswith("* welcome, reader!") for line in out))
        _wait_for(lambda: any(s.token for s in [server.rooms.find("reader")] if s is not None))
        talkers = Talkers([connect(server, f"t{i}") for i in range(3)])
        _wait_for(lambda: sum(1 for line in out if line.startswith("[t")) > 30)
        r.cut()
        time.sleep(2.0)  # the client retries at 1 s into a dead network, then 2 s later
        assert server.rooms.find("reader") is not None  # the nick is held meanwhile
        r.restore()
        _wait_for(lambda: any(line.startswith("(missed") for line in out))
        time.sleep(0.5)
        sent = talkers.finish()
        try:
            _wait_for(lambda: all(f"[t{i}] t{i} {n - 1}" in out for i, n in enumerate(sent)))
        except AssertionError:
            notices = [x for x in out if not x.startswith(("[t", "(missed"))]
            raise AssertionError(f"sent {sent}; notices {notices}; last {out[-5:]}") from None
        _check_every_line_once_in_order(out, sent)
        assert any(line.startswith("* connection lost") and "reconnecting" in line for line in out)
        assert any(line.startswith("* welcome, reader! (resumed)") for line in out)
        assert any(line.startswith("* missed in #lobby: ") for line in out)
        assert not any(line.startswith("@id=") or line.startswith("* session ") for line in out)
    finally:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.fixture
def chat_client(client_ctx: ssl.SSLContext) -> Iterator[Callable[..., tuple[ChatClient, list[str]]]]:
    clients: list[ChatClient] = []

    def make(port: int, nick: str) -> tuple[ChatClient, list[str]]:
        lines: list[str] = []
        client = ChatClient()
        client.connect(LOOPBACK, port, ssl_context=client_ctx, server_hostname="localhost")
        client.register(nick)
        client.set_on_line(lines.append)
        clients.append(client)
        _wait_for(lambda: bool(client.resume.token))
        return client, lines

    yield make
    for c in clients:
        c.close()


def test_a_chatclient_resumes_through_a_relay(serve: Serve, connect: Connect, tmp_path: Path,
                                              relay: Callable[[tuple[str, int]], Relay],
                                              chat_client: Callable[..., tuple[ChatClient, list[str]]]) -> None:
    server = serve(roomlog=SqliteLog(tmp_path / "h.sqlite3"), flood_rate=0)
    r = relay(server.address)
    client, lines = chat_client(r.port, "reader")
    client.send("/join dev")
    _wait_for(lambda: "* you joined #dev (1 here); now talking in #dev" in lines)
    bob = connect(server, "bob")
    bob.send("before")
    _wait_for(lambda: "#lobby [bob] before" in lines)
    r.cut()
    _wait_for(lambda: any(line.startswith("* connection lost") for line in lines))
    assert client.send("typed while away")  # not sent, and said so; the client stays up
    assert "* not connected (reconnecting...): line not sent" in lines
    bob.send("during")
    bob.send("/msg reader psst")  # kept for the held session
    bob.send("/join dev")
    bob.send("in dev")
    time.sleep(0.3)
    r.restore()
    _wait_for(lambda: "(missed" in " ".join(lines) and any(line.startswith("(missed") and "in dev" in line
                                                           for line in lines))
    missed = [line for line in lines if line.startswith("(missed")]
    assert [re.sub(r"^\(missed \d\d:\d\d\) ", "", line) for line in missed] == [
        "#lobby [bob] during", "* bob joined", "[bob] in dev"]
    assert "[bob -> reader] psst" in lines
    assert not client.closed
    client.send("back")  # in #dev still, the room it was typing into
    assert bob.expect("[reader]") == "[reader] back"


def test_the_nick_is_held_for_the_grace_period_then_freed(serve: Serve, connect: Connect,
                                                          chat_client: Callable[..., tuple[ChatClient, list[str]]],
                                                          relay: Callable[[tuple[str, int]], Relay]) -> None:
    server = serve(grace=1.5)
    watcher = connect(server, "watcher")
    r = relay(server.address)
    client, lines = chat_client(r.port, "alice")
    client.reconnect = False  # this one stays away
    watcher.expect("* alice joined")
    r.cut()
    _wait_for(lambda: client.closed)
    thief = connect(server)
    thief.expect("* securechat")
    thief.send("alice")
    assert thief.expect("* nickname refused") == ("* nickname refused: 'alice' is held for its dropped connection "
                                                  "to resume (up to 1.5 s); send another")
    assert watcher.expect("* alice left", timeout=5) == "* alice left (connection lost)"
    thief.send("alice")
    thief.expect("* welcome, alice!")


def test_a_resume_with_an_unknown_token_is_refused(serve: Serve, connect: Connect) -> None:
    server = serve()
    c = connect(server)
    c.expect("* securechat")
    c.send("/resume not-a-token lobby=1-0")
    assert c.readline() == f"* {protocol.RESUME_REFUSED}unknown or expired session; send your nickname"
    c.send("carol")
    c.expect("* welcome, carol!")


def test_a_resume_takes_over_a_connection_that_died_silently(serve: Serve, connect: Connect) -> None:
    server = serve()
    old = connect(server, "alice")
    old.send("/session")
    token = old.expect("* session ").split()[2]
    bob = connect(server, "bob")
    new = connect(server)
    new.expect("* securechat")
    new.send(f"/resume {token}")
    assert new.expect("* welcome, alice!").startswith("* welcome, alice! (resumed)")
    with pytest.raises((EOFError, OSError)):
        old.lines_until_quiet(1.0)
        old.send("x")
        old.readline(2.0)
    bob.send("hi alice")
    assert new.expect("@id=").endswith(" [bob] hi alice")


def test_resume_state_strips_tags_and_tracks_the_newest_id() -> None:
    state = ResumeState()
    assert state.filter("* session AAAAAAAAAAAAAAAAAAAAAAAA 60") is None
    assert state.token == "AAAAAAAAAAAAAAAAAAAAAAAA" and state.grace == 60
    assert state.filter("@id=5-0;room=lobby [bob] hi") == "[bob] hi"
    assert state.filter("@id=12-3;room=dev #dev [bob] yo") == "#dev [bob] yo"
    assert state.filter("@id=4-0;room=lobby (history 09:00) [bob] old") == "(history 09:00) [bob] old"
    assert state.positions == {room_key("lobby"): "5-0", room_key("dev"): "12-3"}
    assert state.resume_line() == "/resume AAAAAAAAAAAAAAAAAAAAAAAA lobby=5-0 dev=12-3"
    assert state.filter("[@id=1-1;room=x] forged") == "[@id=1-1;room=x] forged"


def test_backoff_goes_from_one_second_to_thirty() -> None:
    delays = backoff()
    assert [next(delays) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_after_the_grace_period_the_client_registers_again_and_rejoins(
        serve: Serve, connect: Connect, relay: Callable[[tuple[str, int]], Relay], tmp_path: Path,
        chat_client: Callable[..., tuple[ChatClient, list[str]]]) -> None:
    server = serve(roomlog=SqliteLog(tmp_path / "h.sqlite3"), grace=0.3)
    r = relay(server.address)
    client, lines = chat_client(r.port, "alice")
    client.send("/join dev")
    _wait_for(lambda: any(line.startswith("* you joined #dev") for line in lines))
    r.cut()
    _wait_for(lambda: server.rooms.find("alice") is None)  # the grace period ran out
    r.restore()
    _wait_for(lambda: any(line.startswith("* reconnected, but the server had forgotten") for line in lines))
    _wait_for(lambda: server.rooms.who("dev") == ["alice"])
    bob = connect(server, "bob")
    bob.send("/join dev")
    bob.send("hello again")
    _wait_for(lambda: "[bob] hello again" in lines)
    assert not client.closed


@pytest.mark.slow
def test_ctrl_c_quits_while_reconnecting(serve: Serve, relay: Callable[[tuple[str, int]], Relay],
                                         cert_files: dict[str, Path]) -> None:
    server = serve()
    r = relay(server.address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "securechat", "connect", LOOPBACK, "--port", str(r.port), "--ca", str(cert_files["ca"]),
         "--nick", "alice"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        _wait_for(lambda: any(s.token for s in [server.rooms.find("alice")] if s is not None))
        assert proc.stdin is not None  # once the client has read its token (see the pty test below)
        proc.stdin.write("/rooms\n")
        proc.stdin.flush()
        _wait_for(lambda: any("1 room: #lobby (1)" in line for line in out))
        r.cut()  # and it stays cut
        _wait_for(lambda: any("reconnecting..." in line for line in out))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
        assert "Traceback" not in proc.communicate(timeout=5)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pty")
def test_the_interactive_client_shows_reconnecting_and_ctrl_c_still_quits(
        serve: Serve, relay: Callable[[tuple[str, int]], Relay], cert_files: dict[str, Path]) -> None:
    import fcntl
    import pty
    import struct
    import termios

    server = serve()
    r = relay(server.address)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "securechat", "connect", LOOPBACK, "--port", str(r.port), "--ca", str(cert_files["ca"]),
         "--nick", "alice"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True, close_fds=True,
        env={**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "PYTHONUNBUFFERED": "1"})
    os.close(slave)
    screen = bytearray()

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            screen.extend(data)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        _wait_for(lambda: any(s.token for s in [server.rooms.find("alice")] if s is not None))
        # The server has made the token, but the client may not have read it yet (a cut then ends the
        # client: without a token there is nothing to resume; that lost the race once under CI's load).
        # The client asked for its token before anything typed here, so the answer to /rooms comes after it.
        os.write(master, b"/rooms\r")
        _wait_for(lambda: b"1 room: #lobby (1)" in screen)
        r.cut()
        _wait_for(lambda: b"reconnecting..." in screen)
        r.restore()
        _wait_for(lambda: b"(resumed)" in screen)
        r.cut()  # and once more, for good
        _wait_for(lambda: screen.count(b"reconnecting...") >= 2)
        os.write(master, b"\x03")
        assert proc.wait(timeout=8) == 0
        assert b"Traceback" not in screen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # Only once the reader is gone: a read on a closed descriptor number that a new socket
        # has reused would steal that socket's bytes.
        pumping.join(5)
        os.close(master)
