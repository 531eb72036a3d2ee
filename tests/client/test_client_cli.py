"""``securechat connect`` in line mode (stdin a pipe), run for real as a subprocess."""

# The fixtures come from test_client.py (conftest.py is not ours); test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.test_client import Certs, Served, StartServer, certs, expect, peer, start_server, tls_server  # noqa: F401

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def connect_argv(port: int, *extra: str, ca: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "securechat", "connect", "127.0.0.1", "--port", str(port), *extra]
    if ca is not None:
        argv += ["--ca", str(ca)]
    return argv


def run(argv: list[str], stdin: str = "", timeout: float = 15, cwd: Path | None = None,
        ) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=cwd)


def assert_failed(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit 1, every phrase in stderr, and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)
    assert "Traceback" not in result.stderr


class Proc:
    """A client subprocess whose stdout lines are collected by a thread as they come."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=ENV, cwd=cwd)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    def write(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text)
        self.p.stdin.flush()

    def expect(self, wanted: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if line == wanted:
                return
        raise AssertionError(f"client never printed {wanted!r}; printed {self.seen!r}")

    def wait(self, timeout: float = 10.0) -> tuple[int, str]:
        rc = self.p.wait(timeout)
        assert self.p.stderr is not None
        return rc, self.p.stderr.read()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.p.poll() is None:
            proc.p.kill()
            proc.p.wait()
        for stream in (proc.p.stdin, proc.p.stdout, proc.p.stderr):
            if stream is not None:
                stream.close()


# -- chatting ----------------------------------------------------------------------------------


def test_line_mode_both_directions_and_exit(certs: Certs, tls_server: Served,
                                            procs: list[Proc]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        alice = Proc(connect_argv(port, "--nick", "alice", ca=certs.ca))
        procs.append(alice)
        alice.expect("* welcome, alice! 2 online: alice, bob. /help lists commands")
        expect(bob, "* alice joined")
        bob.send("hi alice \x1b[2J")  # the server strips the escape; the client would too
        alice.expect("[bob] hi alice ")
        alice.write("hello bob\n")
        expect(bob, "[alice] hello bob")
        alice.write("exit\n")
        alice.expect("* goodbye")
        rc, err = alice.wait()
        assert rc == 0, err
        assert "Traceback" not in err
        expect(bob, "* alice left")


def test_eof_on_stdin_leaves_gracefully(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        started = time.monotonic()
        result = run(connect_argv(port, "--nick", "alice", ca=certs.ca), stdin="one\ntwo\n")
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 5  # no hang waiting for the server
        assert result.stdout.splitlines()[-1] == "* goodbye"
        assert result.stderr == ""
        expect(bob, "[alice] one")
        expect(bob, "[alice] two")
        expect(bob, "* alice left")


def test_nickname_asked_on_stdin_without_nick(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        result = run(connect_argv(port, ca=certs.ca), stdin="carol\nhey\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Enter your nickname: * welcome, carol!")
        expect(bob, "[carol] hey")


def test_seed_menu_drives_the_client(certs: Certs, tls_server: Served, tmp_path: Path) -> None:
    # The menu uses the default --ca certs/ca.pem, relative to the working directory; "HOST:PORT"
    # at the IP prompt picks a port other than 5555.
    _, port = tls_server
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(certs.ca.read_bytes())
    with peer(port, "bob", certs) as bob:
        answers = f"2\n127.0.0.1:{port}\ndave\nfrom the menu\n"
        result = run([sys.executable, "-m", "securechat"], stdin=answers,
                     cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        prompts = "Select mode:\n1. Server\n2. Client\nOption: Enter server IP: Enter your nickname: "
        assert prompts in result.stdout
        expect(bob, "[dave] from the menu")


# -- failures: one line on stderr, exit 1, no traceback ----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused(certs: Certs) -> None:
    assert_failed(run(connect_argv(free_port(), "--nick", "alice", ca=certs.ca)),
                  "connection refused", "is the server running")


def test_connect_timeout(certs: Certs) -> None:
    # A listener that never accepts, with its backlog filled: further SYNs go unanswered.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        try:
            result = run(connect_argv(port, "--nick", "alice", "--timeout", "0.5", ca=certs.ca))
        finally:
            for s in fillers:
                s.close()
    # Either the SYN went unanswered or the connection was queued but never handshaken.
    assert_failed(result, "within 0.5 s")


def test_unknown_host(certs: Certs) -> None:
    result = run([sys.executable, "-m", "securechat", "connect", "no-such-host.invalid", "--nick", "alice",
                  "--ca", str(certs.ca)])
    assert_failed(result, "cannot find the host 'no-such-host.invalid'")


def test_missing_ca_file(tmp_path: Path, tls_server: Served) -> None:
    _, port = tls_server
    result = run(connect_argv(port, "--nick", "alice"), cwd=tmp_path)  # default certs/ca.pem: absent
    assert_failed(result, "'certs/ca.pem' not found", "copy ca.pem from the server's certs/ folder")
    assert len(result.stderr.splitlines()) == 1


def test_untrusted_certificate(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    assert_failed(run(connect_argv(port, "--nick", "alice", ca=certs.other_ca)),
                  "not signed by the CA in the --ca file", "copy ca.pem from the server's certs/ folder")


def test_certificate_for_another_name(certs: Certs, start_server: StartServer) -> None:
    _, port = start_server(certs.server_context(certs.wrong_name))
    assert_failed(run(connect_argv(port, "--nick", "alice", ca=certs.ca)),
                  "not valid for '127.0.0.1'", "securechat gen-certs --ip 127.0.0.1")


def test_tls_client_to_plain_server(certs: Certs, start_server: StartServer) -> None:
    _, port = start_server(None)
    assert_failed(run(connect_argv(port, "--nick", "alice", ca=certs.ca)),
                  "runs without encryption (--plain)")


def test_plain_client_to_tls_server(tls_server: Served) -> None:
    _, port = tls_server
    result = run(connect_argv(port, "--nick", "alice", "--plain"))
    # Told before the nickname went out in clear (issue 11): a TLS server never greets a plain client.
    assert_failed(result, "WARNING: --plain: NO ENCRYPTION", "sent no greeting", "requires TLS", "drop --plain",
                  "nothing was sent")


def test_plain_client_to_plain_server_warns(start_server: StartServer) -> None:
    _, port = start_server(None)
    result = run(connect_argv(port, "--nick", "alice", "--plain"), stdin="hi\n")
    assert result.returncode == 0
    assert result.stderr.startswith("securechat connect: WARNING: --plain: NO ENCRYPTION")
    assert len(result.stderr.splitlines()) == 1


def test_nick_refused_non_interactive(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    with peer(port, "bob", certs):
        assert_failed(run(connect_argv(port, "--nick", "bob", ca=certs.ca)),
                      "nickname refused: 'bob' is taken")


def test_server_full(certs: Certs, start_server: StartServer) -> None:
    _, port = start_server(certs.server_context(), max_clients=1)
    with peer(port, "bob", certs):
        assert_failed(run(connect_argv(port, "--nick", "alice", ca=certs.ca)), "server full")


def test_server_shutdown_mid_session(certs: Certs, tls_server: Served, procs: list[Proc]) -> None:
    server, port = tls_server
    alice = Proc(connect_argv(port, "--nick", "alice", ca=certs.ca))  # stdin stays open: "typing"
    procs.append(alice)
    alice.expect("* welcome, alice! 1 online: alice. /help lists commands")
    server.shutdown()
    alice.expect("* server shutting down")
    rc, err = alice.wait(5)
    # Chosen: an announced shutdown is an orderly end, not the client's failure.
    assert rc == 0
    assert err == "securechat connect: the server shut down\n"


def test_kicked_by_the_server(certs: Certs, tls_server: Served) -> None:
    # The server disconnects a flooder (100 lines dropped in a row): the connection ends without a
    # shutdown notice, which is a failure.
    _, port = tls_server
    flood = "".join(f"line {i}\n" for i in range(200))
    result = run(connect_argv(port, "--nick", "alice", ca=certs.ca), stdin=flood + "\n" * 0)
    assert_failed(result, "the server closed the connection: disconnected for flooding")
