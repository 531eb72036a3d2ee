"""Where an invite points (issue 18, bugs 1, 2 and 6): the running server's real port and address, every
command taking ``HOST:PORT``, and the CA commands refusing a folder without a CA.

Real ``securechat serve``, ``invite`` and ``join`` subprocesses on loopback, each joiner with its own
configuration directory (the fixtures of :mod:`tests.pki.test_invites`).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from securechat.pki import certs
from tests.conftest import LOOPBACK
from tests.pki.test_invites import Machine, Server

JOIN_LINE = re.compile(r"^  securechat join (\S+) (\S+)$", re.M)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _join_line(done: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    assert done.returncode == 0, done.stderr
    match = JOIN_LINE.search(done.stdout)
    assert match, done.stdout
    return match.group(1), match.group(2)


def test_invite_names_the_port_and_address_the_server_listens_on_and_the_line_works(tmp_path: Path) -> None:
    """Bug 1: with `serve --port N` the invite said `join 192.0.2.2 CODE` (port 5555, another address)."""
    server = Server(tmp_path / "server")  # serve --host 127.0.0.1 --port <free>
    try:
        done = server.cli("invite", "alice")  # no --host, no --port: what a newcomer types
        where, code = _join_line(done)
        assert where == f"{LOOPBACK}:{server.port}"
        assert done.stderr == ""  # a server is running: nothing to warn about
        alice = Machine(tmp_path / "alice")
        joined = alice.run("join", where, code)  # the line exactly as printed
        assert joined.returncode == 0, joined.stderr
        assert f"From now on: securechat connect {LOOPBACK}:{server.port}" in joined.stdout
        talk = subprocess.run([sys.executable, "-m", "securechat", "connect", where], cwd=alice.root, input="hi\n",
                              capture_output=True, text=True, timeout=30, env=_env_of(alice))
        assert talk.returncode == 0, talk.stderr
        assert "* welcome, alice!" in talk.stdout
    finally:
        server.stop()


def _env_of(machine: Machine) -> dict[str, str]:
    from tests.pki.test_invites import _env

    return _env(machine.config)


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_invite_warns_when_no_server_is_running(tmp_path: Path, how: str) -> None:
    """Bug 1: no server (stopped in order, or killed with its record left behind): say so, in one line."""
    server = Server(tmp_path / "server")
    assert server.proc is not None
    if how == "killed":
        server.proc.send_signal(signal.SIGKILL)
    server.stop()
    done = server.cli("invite", "alice")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["securechat invite: warning: no server is running with the CA in certs: "
                                        "start 'securechat serve' there before the code is used (this line "
                                        "assumes port 5555)"]
    assert JOIN_LINE.search(done.stdout)


def test_invite_warns_when_no_server_listens_on_the_port_asked_for(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")
    try:
        done = server.cli("invite", "--host", f"{LOOPBACK}:1")
        assert _join_line(done)[0] == f"{LOOPBACK}:1"
        assert done.stderr == (f"securechat invite: warning: no server with the CA in certs listens on port 1; "
                               f"running: port {server.port}\n")
    finally:
        server.stop()


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_join_and_connect_take_a_bracketed_ipv6_address_with_its_port(tmp_path: Path) -> None:
    """Bug 2: `join` refused `HOST:PORT` (and `[v6]:PORT`) while `connect` took them."""
    server = Server(tmp_path / "server", "--listen", "::1")
    try:
        where, code = _join_line(server.cli("invite", "bob"))
        assert where == f"[::1]:{server.port}"
        bob = Machine(tmp_path / "bob")
        joined = bob.run("join", where, code)
        assert joined.returncode == 0, joined.stderr
        assert f"From now on: securechat connect [::1]:{server.port}" in joined.stdout
        talk = subprocess.run([sys.executable, "-m", "securechat", "connect", where], cwd=bob.root, input="hi\n",
                              capture_output=True, text=True, timeout=30, env=_env_of(bob))
        assert talk.returncode == 0, talk.stderr
        assert "* welcome, bob!" in talk.stdout
    finally:
        server.stop()


@pytest.mark.parametrize(("argv", "words"), [
    (["join", f"{LOOPBACK}:5556", "7-crayon-galaxy-lunar", "--port", "5557"],
     f"argument HOST[:PORT]: two ports: 5556 in {LOOPBACK}:5556 and --port 5557; give one"),
    (["join", f"{LOOPBACK}:99999", "7-crayon-galaxy-lunar"], "the port after ':' must be a number from 1 to 65535"),
    (["join", "[::1", "7-crayon-galaxy-lunar"], "a '[' must be closed"),
    (["invite", "--host", f"{LOOPBACK}:5556", "--port", "5557"], "argument --host: two ports"),
    (["connect", "999.1.1.1:5555"], "999.1.1.1 is not an IPv4 address"),
    (["join", "999.1.1.1:5555", "7-crayon-galaxy-lunar"], "999.1.1.1 is not an IPv4 address"),
])
def test_every_command_that_names_a_server_parses_it_the_same_way(tmp_path: Path, argv: list[str],
                                                                  words: str) -> None:
    done = subprocess.run([sys.executable, "-m", "securechat", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert done.stderr.startswith(f"securechat {argv[0]}: ")


@pytest.mark.parametrize("argv", [["certs"], ["revoke", "bob"], ["revoke", "1F"], ["invite", "--list"],
                                  ["invite", "--cancel", "3"], ["invite", "bob"]])
@pytest.mark.parametrize("layout", ["ca.pem only", "empty folder"])
def test_ca_commands_where_there_is_no_ca_say_so_and_create_nothing(tmp_path: Path, argv: list[str],
                                                                     layout: str) -> None:
    """Bug 6: `certs` and `revoke` said "none issued yet" and created certs/invites.db and certs/.lock."""
    source = tmp_path / "server-machine"
    certs.mint(source)
    folder = tmp_path / "client-machine" / "certs"
    folder.mkdir(parents=True, mode=0o700)
    if layout == "ca.pem only":
        (folder / "ca.pem").write_bytes((source / "ca.pem").read_bytes())
    before = sorted(p.name for p in folder.iterdir())
    done = subprocess.run([sys.executable, "-m", "securechat", *argv], cwd=folder.parent, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"securechat {argv[0]}: no CA here: certs holds no ca.key"), line
    assert sorted(p.name for p in folder.iterdir()) == before
