"""The interactive client on a real pseudo-terminal (stdlib pty, no pexpect)."""

# The fixtures come from test_client.py (conftest.py is not ours); test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from tests.client.test_client import Certs, Served, certs, expect, peer, start_server, tls_server  # noqa: F401

pytestmark = pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs a POSIX pty")


class Terminal:
    """A client process whose stdin, stdout and stderr are one pty of 24x100 cells."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.master = master
        self.output = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once the child has exited and closed the pty
                return
            if not data:
                return
            with self._lock:
                self.output += data

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def screen_text(self) -> str:
        with self._lock:
            return self.output.decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float = 10.0, start: int = 0) -> int:
        """Wait until ``text`` appears in the output after offset ``start``; return where it ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                at = self.output.find(text.encode(), start)
                if at >= 0:
                    return at + len(text)
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never appeared on the terminal; it shows {self.screen_text()!r}")

    def wait_prompt(self, start: int) -> None:
        """Wait until an input prompt is running again after offset ``start``.

        Between two prompts the terminal is back in cooked mode, where the line discipline itself
        acts on Ctrl-C/Ctrl-D; prompt_toolkit switches bracketed paste on as each prompt starts, in
        raw mode.
        """
        self.wait_for("\x1b[?2004h", start=start)

    def mark(self) -> int:
        with self._lock:
            return len(self.output)

    def exit_status(self, timeout: float = 8.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for term in started:
        term.close()


def client_argv(port: int, certs: Certs, *extra: str) -> list[str]:
    return [sys.executable, "-m", "securechat", "connect", "127.0.0.1", "--port", str(port), "--ca",
            str(certs.ca), *extra]


def test_typed_text_survives_an_incoming_message(certs: Certs, tls_server: Served,
                                                 terminals: list[Terminal]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = Terminal(client_argv(port, certs))
        terminals.append(term)
        term.wait_for("Enter your nickname:")
        term.type("bob\r")  # taken: asked again
        term.wait_for("Nickname refused: 'bob' is taken")
        term.wait_for("Enter your nickname:", start=term.mark() - 200)
        term.type("alice\r")
        expect(bob, "* alice joined")
        term.wait_prompt(term.wait_for("welcome, alice!"))
        term.type("hello wor")
        term.wait_for("hello wor")
        mark = term.mark()
        bob.send("incoming while you type")
        term.wait_for("incoming while you type", start=mark)
        mark = term.mark()
        term.type("ld\r")
        # The server relays exactly what was on the input line: nothing was lost or garbled.
        expect(bob, "[alice] hello world")
        echoed = term.wait_for("hello world", start=mark)  # own line echoed locally
        term.wait_prompt(echoed)
        term.type("\x04")  # Ctrl-D leaves
        assert term.exit_status() == 0
        expect(bob, "* alice left")
        assert "Traceback" not in term.screen_text()


def test_ctrl_c_leaves_cleanly(certs: Certs, tls_server: Served, terminals: list[Terminal]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = Terminal(client_argv(port, certs, "--nick", "alice"))
        terminals.append(term)
        term.wait_prompt(term.wait_for("welcome, alice!"))
        term.type("half a thought")
        term.wait_for("half a thought")
        term.type("\x03")
        assert term.exit_status() == 0
        expect(bob, "* alice left")
        assert "Traceback" not in term.screen_text()


def test_server_shutdown_exits_the_prompt(certs: Certs, tls_server: Served,
                                          terminals: list[Terminal]) -> None:
    server, port = tls_server
    term = Terminal(client_argv(port, certs, "--nick", "alice"))
    terminals.append(term)
    term.wait_prompt(term.wait_for("welcome, alice!"))
    term.type("still typ")
    term.wait_for("still typ")
    server.shutdown()
    term.wait_for("server shutting down")
    assert term.exit_status() == 0  # chosen: an announced shutdown is an orderly end
    term.wait_for("the server shut down")
    assert "Traceback" not in term.screen_text()
