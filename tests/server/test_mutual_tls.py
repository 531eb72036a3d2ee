"""Mutual TLS on the server: certificate-bound nicknames, and every way a client certificate fails."""

from __future__ import annotations

import datetime
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from securechat.server.engine import ChatServer
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def mtls_server(cert_files: dict[str, Path], client_ca: trustme.CA, tmp_path: Path) -> Iterator[ChatServer]:
    ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    ctx = tls.server_context(cert_files["cert"], cert_files["key"], client_ca=ca_file, require_client_cert=True)
    server = ChatServer(LOOPBACK, 0, ctx)
    server.start()
    yield server
    server.shutdown()


def _client_ctx(cert_files: dict[str, Path], leaf: trustme.LeafCert | None) -> ssl.SSLContext:
    ctx = tls.client_context(cert_files["ca"])
    if leaf is not None:
        leaf.configure_cert(ctx)
    return ctx


@pytest.fixture
def mtls_connect(cert_files: dict[str, Path]) -> Iterator[Callable[..., LineClient]]:
    clients: list[LineClient] = []

    def open_client(server: ChatServer, leaf: trustme.LeafCert | None) -> LineClient:
        raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=5)
        sock = _client_ctx(cert_files, leaf).wrap_socket(raw, server_hostname="localhost")
        client = LineClient(sock, timeout=5)
        clients.append(client)
        return client

    yield open_client
    for c in clients:
        c.close()


def test_nickname_is_the_certificate_name_whatever_is_sent(mtls_server: ChatServer, mtls_connect: Callable[
        ..., LineClient], client_ca: trustme.CA) -> None:
    alice = mtls_connect(mtls_server, client_ca.issue_cert(common_name="alice"))
    alice.expect("* securechat: send your nickname")
    alice.send("alice")
    assert alice.readline().startswith("* welcome, alice! 1 online: alice.")

    spoofer = mtls_connect(mtls_server, client_ca.issue_cert(common_name="bob"))
    spoofer.expect("* securechat")
    spoofer.send("alice2")  # asks for another name: gets the certificate's
    assert spoofer.readline().startswith("* welcome, bob! (your certificate names you bob) 2 online")
    spoofer.send("I am alice, honest")
    assert alice.expect("[") == "[bob] I am alice, honest"

    spoofer.send("/nick alice3")
    assert spoofer.readline() == "* nickname refused: your nickname is bound to your certificate (bob)"
    alice.send("/who")
    assert alice.expect("* 2 online") == "* 2 online: alice, bob"


def test_a_second_connection_with_the_same_certificate_is_refused(
        mtls_server: ChatServer, mtls_connect: Callable[..., LineClient], client_ca: trustme.CA) -> None:
    leaf = client_ca.issue_cert(common_name="alice")
    first = mtls_connect(mtls_server, leaf)
    first.expect("* securechat")
    first.send("x")
    first.expect("* welcome, alice!")
    second = mtls_connect(mtls_server, leaf)
    second.expect("* securechat")
    second.send("alice")
    assert second.readline().startswith("* nickname refused: 'alice' is already connected")
    with pytest.raises(EOFError):
        second.readline()


@pytest.mark.parametrize("case", ["no certificate", "another CA", "expired"])
def test_refused_client_certificates(case: str, mtls_server: ChatServer, mtls_connect: Callable[..., LineClient],
                                     client_ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="securechat.server")
    if case == "no certificate":
        leaf = None
    elif case == "another CA":
        leaf = trustme.CA().issue_cert(common_name="mallory")
    else:
        leaf = client_ca.issue_cert(common_name="old", not_after=datetime.datetime.now(datetime.timezone.utc)
                                    - datetime.timedelta(days=1))
    with pytest.raises((ssl.SSLError, ConnectionResetError, EOFError)):
        # TLS 1.3: the client finishes its side first and learns of the refusal on its first read.
        client = mtls_connect(mtls_server, leaf)
        client.readline()
    # The server logged the refusal with the peer's address (its thread may log a moment after the
    # client has seen the alert) and goes on serving.
    deadline = time.monotonic() + 5
    while not any("refused TLS handshake from ('127.0.0.1'" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.01)
    good = mtls_connect(mtls_server, client_ca.issue_cert(common_name="carol"))
    good.expect("* securechat")
    good.send("carol")
    good.expect("* welcome, carol!")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_s_client_with_a_certificate_joins_under_its_name(
        mtls_server: ChatServer, mtls_connect: Callable[..., LineClient], client_ca: trustme.CA,
        cert_files: dict[str, Path], tmp_path: Path) -> None:
    watcher = mtls_connect(mtls_server, client_ca.issue_cert(common_name="watcher"))
    watcher.expect("* securechat")
    watcher.send("watcher")
    watcher.expect("* welcome")
    leaf = client_ca.issue_cert(common_name="dave")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "dave.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "dave.key"))
    proc = subprocess.Popen(
        ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{mtls_server.address[1]}", "-servername",
         "localhost", "-CAfile", str(cert_files["ca"]), "-verify_return_error", "-cert", str(tmp_path / "dave.pem"),
         "-key", str(tmp_path / "dave.key")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"whoever\nhello from openssl\n")
        proc.stdin.flush()
        assert watcher.expect("* dave") == "* dave joined"
        assert watcher.readline() == "[dave] hello from openssl"
    finally:
        proc.kill()
        proc.wait()
