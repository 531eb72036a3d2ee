"""The enrollment port under abuse: silent, crowded, junk-sending joiners (in-process server, real TLS).

The end-to-end stories (subprocesses, two machines, MITM) are in test_invites.py.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from securechat.client import enroll
from securechat.pki import authority, certs, enrollment
from securechat.server.engine import ChatServer
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    certs.mint(tmp_path / "certs")
    return tmp_path / "certs"


def _start(serve: Callable[..., ChatServer], ca_dir: Path, **options: object) -> ChatServer:
    ca = authority.Authority(ca_dir)
    ctx = ca.configure(tls.server_context(ca_dir / "server.pem", ca_dir / "server.key"), ca_dir / "server.pem")
    return serve(context=ctx, authority=ca, **options)


def _enroller(server: ChatServer) -> LineClient:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols([enrollment.ALPN])
    sock = ctx.wrap_socket(socket.create_connection((LOOPBACK, server.address[1]), timeout=10))
    assert sock.selected_alpn_protocol() == enrollment.ALPN
    return LineClient(sock)


def _ends(client: LineClient, timeout: float) -> list[str]:
    """What the server says before it closes; fails if it stays open past ``timeout``."""
    said = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            said.append(client.readline(max(0.01, deadline - time.monotonic())))
        except (EOFError, ssl.SSLError, ConnectionError):
            return said
        except TimeoutError:
            raise AssertionError(f"still open after {timeout} s; said {said!r}") from None


def test_a_silent_joiner_is_cut_off_at_the_deadline(serve: Callable[..., ChatServer], ca_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enrollment, "EXCHANGE_DEADLINE", 1.0)
    server = _start(serve, ca_dir)
    silent = _enroller(server)
    started = time.monotonic()
    assert _ends(silent, 5) == []
    assert 0.8 < time.monotonic() - started < 3


def test_joiners_at_once_are_bounded(serve: Callable[..., ChatServer], ca_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authority, "MAX_ENROLLING", 2)
    monkeypatch.setattr(enrollment, "EXCHANGE_DEADLINE", 3.0)
    server = _start(serve, ca_dir)
    held = [_enroller(server), _enroller(server)]
    time.sleep(0.5)  # both are in their exchange, waiting for a line
    third = _enroller(server)
    assert _ends(third, 5) == ["ERR the server is busy with other joins: try again in a minute"]
    for client in held:
        _ends(client, 6)
    # The slots come back: a later joiner is served (and told its invite does not exist).
    late = _enroller(server)
    late.send("JOIN 5 " + "A" * 44)
    assert _ends(late, 5)[0].startswith("ERR there is no invite number 5 on this server")


def test_a_joiner_holds_a_pending_place_and_is_evicted_like_any_unauthenticated_connection(
        serve: Callable[..., ChatServer], ca_dir: Path) -> None:
    server = _start(serve, ca_dir, max_pending=2)
    oldest = _enroller(server)
    time.sleep(0.3)  # in its exchange, waiting for its first line (the deadline is 20 s away)
    second = _enroller(server)
    time.sleep(0.3)
    started = time.monotonic()
    third = _enroller(server)  # the pool is full: the oldest of the busiest address makes room
    assert _ends(oldest, 5) == []
    assert time.monotonic() - started < 3
    second.close()
    third.close()


@pytest.mark.parametrize("junk", [b"HELLO\n", b"JOIN x y\n", b"JOIN 1 !!!\n", b"RENEW zz\n", b"J" * 40000])
def test_junk_from_a_joiner_ends_its_connection_and_nothing_else(serve: Callable[..., ChatServer], ca_dir: Path,
                                                                 junk: bytes) -> None:
    server = _start(serve, ca_dir)
    client = _enroller(server)
    client.send(junk)
    said = _ends(client, 5)
    assert all(line.startswith("ERR ") for line in said)
    # The server chats on (the conftest client trusts another CA: use the minted one).
    ctx = tls.client_context(ca_dir / "ca.pem")
    raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=10)
    chat = LineClient(ctx.wrap_socket(raw, server_hostname="localhost"))
    chat.expect("* securechat: send your nickname")
    chat.send("erin")
    chat.expect("* welcome, erin!")
    chat.close()


def test_renewal_without_a_certificate_is_refused(serve: Callable[..., ChatServer], ca_dir: Path) -> None:
    server = _start(serve, ca_dir)
    client = _enroller(server)
    client.send("RENEW " + "A" * 40)
    assert _ends(client, 5) == ["ERR renewing needs your current certificate"]


def test_join_notices_a_server_certificate_that_does_not_name_the_host(ca_dir: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificate((ca_dir / "server.pem").read_bytes())
    enrolled = enroll.Enrolled(None, b"", None, None, "", leaf.public_bytes(serialization.Encoding.DER))
    assert enrolled.names_host("127.0.0.1") and enrolled.names_host("LOCALHOST")
    assert not enrolled.names_host("203.0.113.9") and not enrolled.names_host("chat.example.lan")


def test_a_join_after_the_server_certificate_was_renewed_binds_the_new_one(serve: Callable[..., ChatServer],
                                                                          ca_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    server = _start(serve, ca_dir)
    authority = server.authority
    assert authority is not None
    before = (ca_dir / "server.pem").read_bytes()
    certs.issue_server_cert(ca_dir)  # what renewal does, then it builds a new context
    assert (ca_dir / "server.pem").read_bytes() != before
    server.ssl_context = authority.configure(tls.server_context(ca_dir / "server.pem", ca_dir / "server.key"),
                                             ca_dir / "server.pem")
    code = authority.store.create("grace").code
    enrolled = enroll.join(LOOPBACK, server.address[1], code)
    assert enrolled.name == "grace"
    assert enrolled.server_fingerprint == tls.file_fingerprint(ca_dir / "server.pem")


@pytest.mark.parametrize("refusal", ["your certificate has been revoked: ask the server's admin for a new invite",
                                     "this server requires a client certificate: join with an invite"])
def test_a_client_resuming_after_its_certificate_was_revoked_gives_up(refusal: str) -> None:
    from securechat.client import chat as client_module

    chat = client_module.ChatClient()
    chat.resume.token = "t" * 22  # it had a session to resume
    chat._phase = client_module._RESUMING  # reconnected; this is the server's first line
    assert chat._resuming(f"* {refusal}") == f"* cannot reconnect: {refusal}"
    assert not chat._should_reconnect()
