"""The terminal client in a real terminal (tmux), against real servers on 127.0.0.1 (issue 11).

Each test types, pastes and resizes as a person would, reads the screen as tmux renders it, and
checks what the other participants (library clients) really received.
"""

# The fixtures come from test_client.py; test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator

import pytest

from securechat.client import ChatClient
from tests.test_client import Certs, Served, certs, expect, peer, start_server, tls_server  # noqa: F401
from tests.tmuxterm import Tmux, needs_tmux

pytestmark = [needs_tmux, pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="POSIX")]


@pytest.fixture
def terms() -> Iterator[list[Tmux]]:
    started: list[Tmux] = []
    yield started
    for term in started:
        term.close()


def connect_argv(port: int, certs: Certs | None, *extra: str) -> list[str]:
    trust = ["--ca", str(certs.ca)] if certs is not None else ["--plain"]
    return [sys.executable, "-m", "securechat", "connect", "127.0.0.1", "--port", str(port), *trust, *extra]


def start(terms: list[Tmux], port: int, certs: Certs | None, *extra: str, **kwargs: object) -> Tmux:
    term = Tmux(connect_argv(port, certs, *extra), **kwargs)  # type: ignore[arg-type]
    terms.append(term)
    return term


def joined(terms: list[Tmux], port: int, certs: Certs | None, nick: str, *extra: str, **kwargs: object) -> Tmux:
    term = start(terms, port, certs, "--nick", nick, *extra, **kwargs)
    wait_prompt(term, nick)
    return term


def wait_prompt(term: Tmux, nick: str) -> str:
    """Wait for the input line's ``nick>`` prompt (tmux drops the trailing space)."""
    return term.wait_until(lambda screen: any(line.startswith(f"{nick}>") for line in screen.splitlines()),
                           history=False)


def silent(client: ChatClient, wait: float = 0.5) -> list[str]:
    """Lines that arrive within ``wait`` seconds."""
    got = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        line = client.recv_line(left)
        if line is not None:
            got.append(line)
    return got


def chat_lines(screen: str) -> list[str]:
    """The screen's lines without the HH:MM stamps."""
    return [re.sub(r"^\d\d:\d\d ", "", line) for line in screen.splitlines()]


# -- bugs -------------------------------------------------------------------------------------


def test_own_nick_follows_a_confirmed_rename_and_not_a_refused_one(certs: Certs, tls_server: Served,
                                                                   terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        expect(bob, "* alice joined")
        term.type("/nick bob\r")  # taken: refused, nothing changes
        term.wait_for("* nickname refused: 'bob' is taken")
        term.type("still alice\r")
        expect(bob, "[alice] still alice")
        term.wait_for("[alice] still alice")
        term.type("/nick alicia\r")
        expect(bob, "* alice is now alicia")
        wait_prompt(term, "alicia")
        term.type("hello\r")
        expect(bob, "[alicia] hello")
        screen = term.wait_for("[alicia] hello")
        assert "[alice] hello" not in screen


def test_multi_line_paste_is_sent_and_shown_line_by_line(certs: Certs, tls_server: Served,
                                                         terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        term.paste("pasted one\npasted two\npasted three")
        term.keys("Enter")
        received = [expect(bob, lambda line: line.startswith("[alice]")) for _ in range(3)]
        assert received == ["[alice] pasted one", "[alice] pasted two", "[alice] pasted three"]
        screen = term.wait_for("[alice] pasted three")
        shown = [line for line in chat_lines(screen) if line.startswith("[alice]")]
        assert shown == received  # what the sender sees is exactly what the others got


def test_escape_sequence_at_the_prompt_is_harmless(certs: Certs, tls_server: Served, terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        term.type("abc\x1b[31mdef")
        term.keys("Enter")
        line = expect(bob, lambda line: line.startswith("[alice]"))
        assert line == "[alice] abc[31mdef"  # the rest of the line survives; the escape does not
        screen = term.wait_for(line)
        assert "Traceback" not in screen and "Unhandled exception" not in screen
        assert "Press ENTER" not in screen


def test_fast_typing_leaves_nothing_on_stray_lines(certs: Certs, tls_server: Served, terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        words = [f"quick{i:02d}" for i in range(15)]
        for word in words:
            term.type(word + "\r")  # no pause: as fast as tmux writes
        for word in words:
            expect(bob, f"[alice] {word}")
        screen = term.wait_for(f"[alice] {words[-1]}")
        for line in chat_lines(screen):
            if "quick" in line:
                assert re.fullmatch(r"\[alice\] quick\d\d", line), f"stray text on the screen: {line!r}\n{screen}"
        assert sum("quick" in line for line in chat_lines(screen)) == len(words)


def test_private_message_to_nobody_is_not_shown_as_sent(certs: Certs, tls_server: Served,
                                                        terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        term.type("/msg carol hi\r")
        screen = term.wait_for("* no such nick: carol")
        assert "-> carol]" not in screen
        term.type("/msg bob psst\r")
        expect(bob, "[alice -> bob] psst")
        term.wait_for("[alice -> bob] psst")


def test_long_paste_is_paced_to_the_flood_limit_and_nothing_dropped(certs: Certs, start_server,
                                                                    terms: list[Tmux]) -> None:
    _, port = start_server(certs.server_context(), flood_rate=8, flood_burst=6)
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        lines = [f"line {i:02d}" for i in range(24)]
        term.paste("\n".join(lines))
        term.wait_for("Send 24 pasted lines?", history=False)
        term.type("y")
        term.wait_for("sending 24 lines...", history=False)
        for line in lines:
            expect(bob, f"[alice] {line}", timeout=10)
        screen = term.wait_for("[alice] line 23")
        assert "slow down" not in screen and "not delivered" not in screen
        term.wait_until(lambda s: "sending" not in s, history=False)


def test_a_line_the_server_dropped_is_marked_not_delivered(certs: Certs, start_server,
                                                            terms: list[Tmux]) -> None:
    # A server slower than it advertises (a rate change, or a bucket shared with a second session of the
    # same user) can still drop: the client must then say so, never show the line as sent.
    server, port = start_server(certs.server_context(), flood_rate=50, flood_burst=50)
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        server.flood_rate, server.flood_burst = 0.5, 1  # new sessions only...
        for session in list(server._sessions):
            session.bucket = type(session.bucket)(0.5, 1, time.monotonic())  # ...and alice's, now
        term.paste("one\ntwo\nthree")
        term.keys("Enter")
        expect(bob, "[alice] one")
        screen = term.wait_for("* not delivered (flood control): three")
        assert "* not delivered (flood control): two" in screen
        assert "[alice] two" not in screen and "[alice] three" not in screen
        assert silent(bob, 0.3) == []


def test_plain_client_reaching_a_tls_server_says_so_before_asking_for_a_nick(certs: Certs, tls_server: Served,
                                                                            terms: list[Tmux]) -> None:
    _, port = tls_server
    term = start(terms, port, None)
    screen = term.wait_for("it probably requires TLS")
    assert "Enter your nickname" not in screen
    assert "drop --plain" in screen
    assert term.exit_status() == 1
