"""The seed's menu and ``--tofu`` as a newcomer meets them, in a real terminal (tmux) (issue 18, bug 4 and a friction).

Before: ``999.1.1.1`` at ``Enter server IP:`` ended the menu with a usage error; on a machine with no
``certs/ca.pem`` and no profile it ended telling the person to pass ``--ca``, which a menu cannot do;
and ``--tofu`` saved the fingerprint before telling anyone to compare it. Each test types what a
person types and reads what tmux shows.
"""

# ruff: noqa: F811

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from securechat.wire import tls
from tests.client.test_client import Certs, Served, certs, expect, peer, start_server, tls_server  # noqa: F401
from tests.pki.test_invites import Server
from tests.tmuxterm import Tmux, needs_tmux

pytestmark = [needs_tmux, pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="POSIX")]

SECURECHAT = [sys.executable, "-m", "securechat"]


@pytest.fixture
def terms() -> Iterator[list[Tmux]]:
    started: list[Tmux] = []
    yield started
    for term in started:
        term.close()


def _term(terms: list[Tmux], argv: list[str], home: Path) -> Tmux:
    """A terminal in ``home`` (no certs/ there) with a configuration directory of its own."""
    home.mkdir(parents=True, exist_ok=True)
    term = Tmux(argv, cwd=home, env={"XDG_CONFIG_HOME": str(home / "config")})
    terms.append(term)
    return term


def _answer(term: Tmux, shown: str, typed: str) -> str:
    """Wait for ``shown``, then type ``typed`` and Enter; the screen as it was."""
    screen = term.wait_for(shown)
    term.type(typed)
    term.keys("Enter")
    return screen


def _ask_until(term: Tmux, prompt: str, count: int) -> str:
    return term.wait_until(lambda screen: screen.count(prompt) >= count)


def test_menu_explains_a_bad_address_and_offers_a_ca_file_when_there_is_no_ca(
        certs: Certs, tls_server: Served, terms: list[Tmux], tmp_path: Path) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = _term(terms, SECURECHAT, tmp_path / "newcomer")
        _answer(term, "Option:", "2")
        _answer(term, "Enter server IP:", "999.1.1.1")
        screen = _ask_until(term, "Enter server IP:", 2)
        assert ("That address won't do: 999.1.1.1 is not an IPv4 address: it has four numbers from 0 to 255 "
                "separated by dots.") in screen
        term.type(f"127.0.0.1:{port}")
        term.keys("Enter")
        screen = term.wait_for("3. With a copy of the server's CA file")
        assert (f"This machine does not know 127.0.0.1:{port} yet (no certs/ca.pem here, and it never joined it). "
                "How should it recognise the server?") in screen
        assert "1. With an invite code" in screen and "2. By its fingerprint" in screen
        assert "--ca" not in screen  # nothing a person at a menu cannot do
        term.type("7")
        term.keys("Enter")
        term.wait_for("Please type a number from 1 to 3.")
        term.type("3")
        term.keys("Enter")
        _answer(term, "Path to the CA file:", str(tmp_path / "nowhere.pem"))
        screen = _ask_until(term, "Path to the CA file:", 2)
        assert f"There is no file '{tmp_path / 'nowhere.pem'}': copy ca.pem from the server's certs/ folder" in screen
        term.type(str(certs.ca))
        term.keys("Enter")
        _answer(term, "Enter your nickname:", "dave")
        expect(bob, "* dave joined")
        term.type("hello from the menu")
        term.keys("Enter")
        expect(bob, "[dave] hello from the menu")


def test_menu_shows_the_fingerprint_and_asks_before_trusting(certs: Certs, tls_server: Served, terms: list[Tmux],
                                                            tmp_path: Path) -> None:
    _, port = tls_server
    home = tmp_path / "newcomer"
    with peer(port, "bob", certs) as bob:
        term = _term(terms, SECURECHAT, home)
        _answer(term, "Option:", "2")
        _answer(term, "Enter server IP:", f"127.0.0.1:{port}")
        _answer(term, "3. With a copy", "2")
        screen = term.wait_for("Trust this server? [y/N]")
        anchor = tls.fingerprint(certs.ca.read_text()) if "CA certificate" in screen else None
        assert f"First contact with 127.0.0.1:{port}. Its " in screen
        assert anchor is None or anchor in screen
        assert not (home / "config" / "securechat" / "known_hosts").exists()  # nothing trusted before the answer
        term.type("y")
        term.keys("Enter")
        _answer(term, "Enter your nickname:", "erin")
        expect(bob, "* erin joined")
        assert (home / "config" / "securechat" / "known_hosts").read_text().startswith(f"127.0.0.1:{port} ")


def test_menu_joins_with_an_invite_code(tmp_path: Path, terms: list[Tmux]) -> None:
    server = Server(tmp_path / "server")
    try:
        done = server.cli("invite", "frank")
        assert done.returncode == 0, done.stderr
        code = done.stdout.split()[-1]
        term = _term(terms, SECURECHAT, tmp_path / "newcomer")
        _answer(term, "Option:", "2")
        _answer(term, "Enter server IP:", f"127.0.0.1:{server.port}")
        _answer(term, "3. With a copy", "1")
        _answer(term, "Invite code:", "7-not-a-code")
        screen = _ask_until(term, "Invite code:", 2)
        assert "'not' is not one of the invite words: check the spelling of the code." in screen
        term.type(code)
        term.keys("Enter")
        screen = term.wait_until(lambda s: any(line.startswith("frank>") for line in s.splitlines()))
        assert f"Joined 127.0.0.1 as frank. From now on: securechat connect 127.0.0.1:{server.port}" in screen
    finally:
        server.stop()


def test_tofu_at_a_terminal_asks_before_saving_and_no_saves_nothing(certs: Certs, tls_server: Served,
                                                                    terms: list[Tmux], tmp_path: Path) -> None:
    """`--tofu` saved the fingerprint first and told the person to compare it afterwards."""
    _, port = tls_server
    home = tmp_path / "newcomer"
    known = home / "config" / "securechat" / "known_hosts"
    argv = [*SECURECHAT, "connect", f"127.0.0.1:{port}", "--tofu", "--nick", "gina"]
    term = _term(terms, argv, home)
    screen = term.wait_for("Trust this server? [y/N]")
    chain_top = screen.split("SHA-256 fingerprint", 1)[1].split()[0]
    assert len(chain_top) == 95  # 32 bytes, AA:BB:...: shown before the question
    assert not known.exists()
    term.type("n")
    term.keys("Enter")
    assert term.exit_status() == 1
    screen = term.screen(history=True)
    assert f"securechat connect: refusing 127.0.0.1:{port}: not trusted, so nothing was saved in {known}" in screen
    assert not known.exists()
    with peer(port, "bob", certs) as bob:
        again = _term(terms, argv, home)
        _answer(again, "Trust this server? [y/N]", "y")
        again.wait_until(lambda s: any(line.startswith("gina>") for line in s.splitlines()))
        expect(bob, "* gina joined")
        assert f"Remembered in {known}" in again.screen(history=True)
        assert known.read_text() == f"127.0.0.1:{port} {chain_top}\n"
