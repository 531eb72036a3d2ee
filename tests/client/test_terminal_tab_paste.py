"""Tab and pasting in the terminal client, in a real terminal (tmux) (issue 18, bug 5 and a friction).

Before: ``/jo``, ``/hi``, ``/ro``, ``/pa`` + Tab did nothing (Tab knew six commands), rooms and /msg
nicks were not completed, and a paste ending with a newline waited for a second Enter.
"""

# The fixtures come from test_client.py; test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import pytest

from tests.client.test_client import Certs, Served, certs, expect, peer, start_server, tls_server  # noqa: F401
from tests.client.test_client_ui import chat_lines, joined, silent
from tests.tmuxterm import Tmux, needs_tmux

pytestmark = [needs_tmux, pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="POSIX")]


@pytest.fixture
def terms() -> Iterator[list[Tmux]]:
    started: list[Tmux] = []
    yield started
    for term in started:
        term.close()


def _input(screen: str, nick: str) -> str:
    """What the input line holds (after ``nick> ``)."""
    lines = [line for line in screen.splitlines() if line.startswith(f"{nick}>")]
    return lines[-1][len(nick) + 1:].lstrip() if lines else ""


def _tab_to(term: Tmux, typed: str, wanted: str, tabs: int = 1) -> None:
    """Type ``typed``, press Tab up to ``tabs`` times until the input line reads ``wanted``; then clear it."""
    term.type(typed)
    for _ in range(tabs):
        term.keys("Tab")
        try:
            term.wait_until(lambda s: _input(s, "alice").rstrip() == wanted.rstrip(), timeout=2, history=False)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"{typed!r} + Tab never gave {wanted!r}; the screen shows:\n{term.screen()}")
    term.keys("C-u")
    term.wait_until(lambda s: _input(s, "alice") == "", history=False)


def test_tab_completes_every_command_help_lists(certs: Certs, tls_server: Served, terms: list[Tmux]) -> None:
    _, port = tls_server
    term = joined(terms, port, certs, "alice")
    term.type("/help")
    term.keys("Enter")
    screen = term.wait_for("* commands: ")
    listed = sorted(set(re.findall(r"(?<![/\w])(/[a-z]+)\b", screen.split("* commands: ", 1)[1])))
    assert {"/join", "/part", "/rooms", "/history", "/who", "/nick", "/msg", "/me", "/help", "/quit"} <= set(listed)
    for command in listed:  # its name less its last letter, then Tab (again, where several share the start)
        _tab_to(term, command[:-1], command + " ", tabs=len(listed))
    for typed, wanted in (("/jo", "/join "), ("/hi", "/history "), ("/ro", "/rooms "), ("/pa", "/part ")):
        _tab_to(term, typed, wanted)  # the four, each alone with its start


def test_tab_completes_rooms_after_join_and_nicks_after_msg(certs: Certs, tls_server: Served,
                                                            terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "carol", certs) as carol:
        carol.send("/join design")
        expect(carol, lambda line: line.startswith("* you joined #design"))
        term = joined(terms, port, certs, "alice")
        _tab_to(term, "/join des", "/join design ")  # a room made before alice came: the quiet /rooms knew it
        carol.send("/join devops")  # made after: Tab asks again and completes with the answer
        expect(carol, lambda line: line.startswith("* you joined #devops"))
        _tab_to(term, "/join dev", "/join devops ")
        _tab_to(term, "/part #de", "/part #design ", tabs=3)
        _tab_to(term, "/msg ca", "/msg carol ")
        term.type("/msg ca")
        term.keys("Tab")
        term.type("psst")
        term.keys("Enter")
        expect(carol, "[alice -> carol] psst")
        screen = term.screen(history=True)
        assert not [line for line in chat_lines(screen) if re.match(r"\* \d+ rooms?: ", line)]  # asked quietly
        term.type("/rooms")
        term.keys("Enter")  # asked by the person: shown
        term.wait_for("* 3 rooms: #design (1), #devops (1), #lobby (2)")


@pytest.mark.parametrize("pasted, sent", [
    ("one line\n", ["one line"]),
    ("first\nsecond\n", ["first", "second"]),
    ("windows line\r\n", ["windows line"]),
])
def test_a_paste_ending_with_a_newline_is_sent_without_another_enter(certs: Certs, tls_server: Served,
                                                                     terms: list[Tmux], pasted: str,
                                                                     sent: list[str]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        expect(bob, "* alice joined")
        term.paste(pasted)
        assert [expect(bob, lambda line: line.startswith("[alice]")) for _ in sent] == [f"[alice] {t}" for t in sent]
        screen = term.wait_for(f"[alice] {sent[-1]}", history=False)
        assert _input(screen, "alice") == ""  # nothing left waiting for Enter


def test_a_paste_without_a_final_newline_waits_for_enter(certs: Certs, tls_server: Served,
                                                         terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        expect(bob, "* alice joined")
        term.paste("still editing")
        term.wait_until(lambda s: _input(s, "alice") == "still editing", history=False)
        assert silent(bob, 0.5) == []
        term.type(" this")
        term.keys("Enter")
        expect(bob, "[alice] still editing this")
