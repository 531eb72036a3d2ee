"""Replays show the conversation (issue 18, bug 7): joining a room and /history count the lines people said.

Before: 30 people arriving and leaving pushed the last real lines out of a newcomer's 50-line replay,
because the replay counted every entry, arrivals and departures included. A real ``securechat serve``
(history in a real SQLite file) and real TLS line clients.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from securechat.server import room
from securechat.store.roomlog import Entry
from tests.conftest import LineClient
from tests.pki.test_invites import Server, _guest

STAMP = re.compile(r"^\(history \d\d:\d\d\) ")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server", "--flood-rate", "0")  # bob talks faster than people type
    yield srv
    srv.stop()


def _visit(server: Server, count: int, first: int = 0) -> None:
    """``count`` people arrive and leave at once, as a busy LAN would have them."""
    for i in range(first, first + count):
        visitor = _guest(server, f"visitor{i}")
        visitor.expect("* welcome")
        visitor.send("/quit")
        visitor.expect("* goodbye")
        visitor.close()


def _replay(client: LineClient, until: str) -> tuple[str, list[str]]:
    """The replay's header and its lines (without the time stamps), up to the line starting with ``until``."""
    header = client.expect(lambda line: line.startswith(("* history of #lobby", "* no earlier lines")))
    if header.startswith("* no earlier"):
        return header, []
    lines = []
    while not (line := client.readline()).startswith(until):
        lines.append(STAMP.sub("", line))
    return header, lines


def test_a_newcomer_is_shown_the_conversation_not_the_comings_and_goings(server: Server) -> None:
    bob = _guest(server, "bob")
    bob.expect("* welcome, bob!")
    for i in range(10):
        bob.send(f"real line {i}")
    _visit(server, 30)
    bob.send("the last word")
    bob.send("/who")
    bob.expect("* 1 online: bob")  # bob's lines are in before the newcomer comes
    dora = _guest(server, "dora")
    dora.expect("* welcome, dora!")
    header, lines = _replay(dora, "* now live in #lobby")
    assert header == "* history of #lobby: 11 lines"
    assert lines == [f"[bob] real line {i}" for i in range(10)] + ["[bob] the last word"]


def test_history_pages_through_the_conversation(server: Server) -> None:
    bob = _guest(server, "bob")
    bob.expect("* welcome, bob!")
    for i in range(60):
        bob.send(f"line {i}")
        if i % 10 == 9:
            _visit(server, 6, first=i)
    bob.send("/nick robert")
    bob.expect("* bob is now robert")
    bob.send("after the rename")
    bob.send("/who")
    bob.expect("* 1 online: robert")
    erin = _guest(server, "erin")
    erin.expect("* welcome, erin!")
    header, lines = _replay(erin, "* now live in #lobby")
    assert header == "* history of #lobby: 51 lines"  # 50 said, and the rename that names the speaker
    assert lines == [f"[bob] line {i}" for i in range(11, 60)] + ["* bob is now robert", "[robert] after the rename"]
    erin.send("/history 20")
    header, lines = _replay(erin, "* end of history")
    assert header == "* history of #lobby: 11 earlier lines"
    assert lines == [f"[bob] line {i}" for i in range(11)]
    erin.send("/history")
    assert _replay(erin, "")[0] == "* no earlier lines in #lobby"


def _entries(kinds: str) -> list[Entry]:
    names = {"c": "chat", "j": "join", "p": "part", "n": "notice", "a": "action"}
    return [Entry("lobby", f"{i + 1}-0", 0.0, names[k], "bob", str(i)) for i, k in enumerate(kinds)]


@pytest.mark.parametrize(("kinds", "limit", "shown", "oldest"), [
    ("cjcjpc", 2, "25", "3-0"),  # the last two said, paging on from the oldest shown
    ("cjjjpc", 5, "05", "1-0"),  # all there is: paging on from the oldest looked at
    ("jjjj", 3, "", "1-0"),
    ("cncac", 3, "1234", "2-0"),  # a rename in between is shown, not counted
    ("", 3, "", None),
])
def test_conversation_counts_what_people_said(kinds: str, limit: int, shown: str, oldest: str | None) -> None:
    log = _entries(kinds)

    def read_before(anchor: str | None, n: int) -> list[Entry]:
        older = [e for e in log if anchor is None or int(e.id[:-2]) < int(anchor[:-2])]
        return older[-n:]

    found, where = room.conversation(read_before, None, limit)
    assert "".join(e.text for e in found) == shown
    assert where == oldest


def test_conversation_reads_a_bounded_amount() -> None:
    log = _entries("c" + "j" * (room.MAX_REPLAY_SCAN * 3))
    reads: list[int] = []

    def read_before(anchor: str | None, n: int) -> list[Entry]:
        reads.append(n)
        older = [e for e in log if anchor is None or int(e.id[:-2]) < int(anchor[:-2])]
        return older[-n:]

    found, _ = room.conversation(read_before, None, 50)
    assert found == [] and sum(reads) == room.MAX_REPLAY_SCAN
