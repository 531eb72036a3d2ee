"""Third-party TLS line clients (openssl s_client, ncat, socat) chat through a real securechat server."""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from securechat.pki import certs
from securechat.server.engine import ChatServer
from securechat.wire import tls


class LineProcess:
    """A line client subprocess: write lines to its stdin, read its stdout lines with a timeout."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line
            seen.append(line)
        raise AssertionError(f"{prefix!r} not seen from {self.proc.args[0]}; got {seen!r}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> certs.MintResult:
    return certs.mint(tmp_path_factory.mktemp("interop") / "certs")


@pytest.fixture
def server(minted: certs.MintResult, serve: Callable[..., ChatServer]) -> ChatServer:
    return serve(context=tls.server_context(minted.server_cert, minted.server_key))


def _needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package: {'ncat' if tool == 'ncat' else tool})")


def _openssl(port: int, ca: Path) -> LineProcess:
    return LineProcess(["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        "-CAfile", str(ca), "-verify_return_error", "-verify_hostname", "localhost"])


def _ncat(port: int, ca: Path) -> LineProcess:
    return LineProcess(["ncat", "--ssl", "--ssl-verify", "--ssl-trustfile", str(ca), "localhost", str(port)])


def _socat(port: int, ca: Path) -> LineProcess:
    return LineProcess(["socat", "-", f"OPENSSL:localhost:{port},cafile={ca},verify=1"])


CLIENTS = {"openssl": _openssl, "ncat": _ncat, "socat": _socat}


@pytest.mark.parametrize(("first", "second"), [("openssl", "ncat"), ("ncat", "socat"), ("socat", "openssl")])
def test_third_party_clients_chat_with_each_other(first: str, second: str, server: ChatServer,
                                                  minted: certs.MintResult) -> None:
    _needs(first)
    _needs(second)
    port = server.address[1]
    a = CLIENTS[first](port, minted.ca_cert)
    b = CLIENTS[second](port, minted.ca_cert)
    try:
        a.expect("* securechat: send your nickname")
        a.send("alice")
        a.expect("* welcome, alice!")
        b.expect("* securechat: send your nickname")
        b.send("bob")
        b.expect("* welcome, bob!")
        a.expect("* bob joined")
        a.send("hello from " + first)
        assert b.expect("[alice]") == f"[alice] hello from {first}"
        b.send("hi back from " + second)
        assert a.expect("[bob]") == f"[bob] hi back from {second}"
        b.send("/quit")
        assert a.expect("* bob left") == "* bob left"
    finally:
        a.close()
        b.close()


def test_ncat_verifies_the_server_by_ip_address(server: ChatServer, minted: certs.MintResult) -> None:
    """ncat checks only dNSName entries: the minted certificate lists 127.0.0.1 as one too."""
    _needs("ncat")
    client = LineProcess(["ncat", "--ssl", "--ssl-verify", "--ssl-trustfile", str(minted.ca_cert), "127.0.0.1",
                          str(server.address[1])])
    try:
        client.expect("* securechat: send your nickname")
        client.send("byip")
        client.expect("* welcome, byip!")
    finally:
        client.close()


def test_openssl_refuses_a_server_outside_its_ca(server: ChatServer, tmp_path: Path) -> None:
    _needs("openssl")
    other = certs.mint(tmp_path / "other")
    client = _openssl(server.address[1], other.ca_cert)
    try:
        assert client.proc.wait(timeout=10) != 0
    finally:
        client.close()
