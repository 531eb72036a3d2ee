"""Back after the server forgot the session (issue 18, bug 8): only what the person has not seen, and exactly
what is lost.

Before: the client said "lines said meanwhile are lost", then replayed 50 lines already on its screen
(and some of the "lost" ones). Real ``securechat serve`` (history in SQLite) and the real ``securechat
connect`` in line mode, behind a TCP relay the test cuts, as Wi-Fi going away would; the session is
forgotten because the grace period runs out, or because the server is killed and started again.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LOOPBACK, LineClient
from tests.pki.test_invites import Server, _guest
from tests.server.test_catchup import Relay


class Reader:
    """``securechat connect`` in line mode through ``relay``; every stdout line, as it comes."""

    def __init__(self, server: Server, relay: Relay, nick: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "securechat", "connect", f"{LOOPBACK}:{relay.port}", "--ca",
             str(server.home / "certs" / "ca.pem"), "--nick", nick],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self, text: str, timeout: float = 30) -> int:
        """The index of the first line starting with ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, line in enumerate(list(self.lines)):
                if line.startswith(text):
                    return i
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never printed; got {self.lines!r}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for relay in made:
        relay.close()


def _in(client: LineClient, nick: str, room: str | None = None) -> LineClient:
    client.expect(f"* welcome, {nick}!")
    if room:
        client.send(f"/join {room}")
        client.expect(f"* you joined #{room}")
    return client


def _sync(client: LineClient, nick: str) -> None:
    """Everything ``client`` said before is in the log: the server answers in order."""
    client.send("/who lobby")
    client.expect(lambda line: line.startswith("* ") and "online" in line and nick in line)


STAMP = re.compile(r"^\((?:missed|history) \d\d:\d\d\) ")


@pytest.mark.parametrize("forgotten_by", ["grace period over", "server restarted"])
def test_back_after_a_forgotten_session_shows_only_what_was_missed(tmp_path: Path, relays: list[Relay],
                                                                   forgotten_by: str) -> None:
    server = Server(tmp_path / "server", "--grace", "1", "--flood-rate", "0")
    relay = Relay((LOOPBACK, server.port))
    relays.append(relay)
    reader = Reader(server, relay, "reader")
    try:
        bob = _in(_guest(server, "bob"), "bob")
        carol = _in(_guest(server, "carol"), "carol", "dev")
        reader.wait("* welcome, reader!")
        reader.say("/join dev")
        reader.wait("* you joined #dev")
        for i in range(5):
            bob.send(f"before {i}")
        carol.send("dev before")
        reader.wait("#lobby [bob] before 4")
        reader.wait("[carol] dev before")  # dev is the room reader types into: its lines come bare
        seen = len(reader.lines)

        relay.cut()
        if forgotten_by == "grace period over":
            bob.send("/msg reader held for you")  # the session is held: kept for it, then forgotten with it
            bob.expect("* reader left (connection lost)", timeout=10)
        else:
            _sync(bob, "bob")
            time.sleep(0.5)  # the history writer's batch (0.2 s) is on disk
            assert server.proc is not None
            server.proc.send_signal(signal.SIGKILL)
            server.stop()
            server.start()
            bob, carol = _in(_guest(server, "bob"), "bob"), _in(_guest(server, "carol"), "carol", "dev")
        for i in range(3):
            bob.send(f"during {i}")
        carol.send("dev during")
        _sync(bob, "bob")
        _sync(carol, "carol")
        relay.restore()

        back = reader.wait("* reconnected")
        reader.wait("* now live in #dev")
        reader.say("/who lobby")
        reader.wait("* 3 online")
        after = [STAMP.sub("", line) for line in reader.lines[back:]]
        shown = [line for line in after if line.startswith(("[", "#lobby ["))]
        assert [line for line in shown if "before" in line] == []  # already on the screen: not again
        assert shown[:3] == ["[bob] during 0", "[bob] during 1", "[bob] during 2"]
        assert "[carol] dev during" in shown
        assert reader.lines[back] == ("* reconnected, but the server had forgotten this session (it restarted, or "
                                      "the connection was down longer than it waits): back in your rooms as reader; "
                                      "what you missed follows")
        # After a restart bob and carol came back too: their arrivals are part of what was missed.
        lobby = 3 if forgotten_by == "grace period over" else 5
        dev = 1 if forgotten_by == "grace period over" else 2
        assert f"* missed in #lobby: {lobby} lines" in after and f"* missed in #dev: {dev} line" in " ".join(after)
        if forgotten_by == "grace period over":
            assert "* 1 private message while you were away:" in after
            assert "[bob -> reader] held for you" in after
        else:
            assert ("* this server did not know your session any more (it restarted, or you were away for over an "
                    "hour): private messages sent to you meanwhile, if any, are lost") in after
        assert not any("are lost" in line for line in reader.lines[seen:back])
    finally:
        reader.close()
        server.stop()


def test_back_after_a_forgotten_session_without_history_says_what_is_lost(tmp_path: Path,
                                                                          relays: list[Relay]) -> None:
    server = Server(tmp_path / "server", "--grace", "1", "--no-history")
    relay = Relay((LOOPBACK, server.port))
    relays.append(relay)
    reader = Reader(server, relay, "reader")
    try:
        bob = _in(_guest(server, "bob"), "bob")
        reader.wait("* welcome, reader!")
        bob.send("before")
        reader.wait("[bob] before")
        relay.cut()
        bob.expect("* reader left (connection lost)", timeout=10)
        bob.send("during")
        _sync(bob, "bob")
        relay.restore()
        back = reader.wait("* reconnected")
        reader.wait("* history is off on this server: what was said in #lobby while you were away is lost")
        assert "[bob] during" not in reader.lines[back:]
    finally:
        reader.close()
        server.stop()
