"""A client that reaches something that is not a securechat server says so at once (issue 18, friction).

Before: ``--plain`` against a text service sent the nickname before noticing, and TLS against a silent
TLS service waited 20 s without a word. Now the greeting is recognised first: one line, within 3 s,
and nothing sent. Real services: socat and ``openssl s_server`` where they exist, and a TLS server
of the test's own that times the client and records every byte it sends.
"""

# ruff: noqa: F811

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.client.test_client import Certs, certs  # noqa: F401

LOOPBACK = "127.0.0.1"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# What the issue asks for: one line within this many seconds of connecting.
WITHIN = 3.0


class Service:
    """A TCP (or TLS) service that is not securechat: says ``greeting`` (if any) and records what it gets."""

    def __init__(self, greeting: bytes, context: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.greeting = greeting
        self.context = context
        self.received = b""
        self.accepted = 0.0
        self.ended = 0.0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        self.accepted = time.monotonic()
        raw.settimeout(30)
        sock: socket.socket = self.context.wrap_socket(raw, server_side=True) if self.context else raw
        with sock:
            if self.greeting:
                sock.sendall(self.greeting)
            try:
                while chunk := sock.recv(4096):
                    self.received += chunk
            except (OSError, ssl.SSLError):
                pass
        self.ended = time.monotonic()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def _connect(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securechat", "connect", f"{LOOPBACK}:{port}", "--nick", "alice",
                           *extra], capture_output=True, text=True, timeout=60, env=ENV, input="hello\n")


@pytest.mark.parametrize("greeting", [b"220 mail.example.com ESMTP ready\r\n", b"* OK [CAPABILITY IMAP4rev1] ready\r\n",
                                      b"SSH-2.0-OpenSSH_9.2\r\n"])
def test_plain_client_against_a_text_service_sends_nothing(greeting: bytes) -> None:
    service = Service(greeting)
    try:
        done = _connect(service.port, "--plain")
    finally:
        service.close()
    assert done.returncode == 1, done.stderr
    shown = greeting.decode().strip()
    assert done.stderr.splitlines()[-1] == (
        f"securechat connect: {LOOPBACK}:{service.port} is not a securechat server: it said {shown!r} instead of "
        "securechat's greeting; nothing was sent to it")
    assert service.received == b""  # not even the nickname
    assert service.ended - service.accepted < WITHIN


def test_tls_client_against_a_silent_tls_service_says_so_within_3_s(certs: Certs) -> None:
    service = Service(b"", certs.server_context())
    try:
        done = _connect(service.port, "--ca", str(certs.ca))
    finally:
        service.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"securechat connect: {LOOPBACK}:{service.port} completed the TLS handshake but sent no "
                           "securechat greeting within 2 s: it is not a securechat server; nothing was sent to it\n")
    assert service.received == b""
    assert service.ended - service.accepted < WITHIN


def test_tls_client_against_a_tls_service_that_speaks_first(certs: Certs) -> None:
    service = Service(b"220 smtps.example.com ESMTP\r\n", certs.server_context())
    try:
        done = _connect(service.port, "--ca", str(certs.ca))
    finally:
        service.close()
    assert done.returncode == 1, done.stderr
    assert "is not a securechat server: it said '220 smtps.example.com ESMTP'" in done.stderr
    assert service.received == b""
    assert service.ended - service.accepted < WITHIN


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_client_against_openssl_s_server(certs: Certs, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    received = tmp_path / "received"
    with open(received, "wb") as out:
        server = subprocess.Popen(["openssl", "s_server", "-quiet", "-accept", f"{LOOPBACK}:{port}", "-cert",
                                   str(certs.server), "-key", str(certs.server)],
                                  stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((LOOPBACK, port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            started = time.monotonic()
            done = _connect(port, "--ca", str(certs.ca))
            took = time.monotonic() - started
        finally:
            server.kill()
            server.wait(10)
    assert done.returncode == 1, done.stderr
    assert "is not a securechat server" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert received.read_bytes() == b""
    assert took < WITHIN + 3  # 20 s before; the rest of the margin is the interpreter starting on a busy machine
