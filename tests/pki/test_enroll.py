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
from tests.conftest import LOOPBACK, LineClient, issue_client


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    certs.mint(tmp_path / "certs")
    return tmp_path / "certs"


def _start(serve: Callable[..., ChatServer], ca_dir: Path, **options: object) -> ChatServer:
    ca = authority.Authority(ca_dir)
    ctx = ca.configure(tls.server_context(ca_dir / "server.pem", ca_dir / "server.key"), ca_dir / "server.pem")
    return serve(context=ctx, authority=ca, **options)


def _enroller(server: ChatServer, source: str = LOOPBACK) -> LineClient:
    """An enrollment connection (TLS with the enrollment ALPN) from ``source`` (another loopback address
    stands for another machine)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols([enrollment.ALPN])
    raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=10, source_address=(source, 0))
    sock = ctx.wrap_socket(raw)
    assert sock.selected_alpn_protocol() == enrollment.ALPN
    return LineClient(sock)


def _join_line(nameplate: int) -> str:
    from spake2 import SPAKE2_A

    return f"JOIN {nameplate} {enrollment.b64(SPAKE2_A(b'not-the-code').start())}"


def _stalled_join(server: ChatServer, source: str = LOOPBACK) -> tuple[LineClient, str]:
    """A joiner that sends JOIN for a live invite and then nothing: (it, the server's answer).

    Answered ``PAKE ...``, it holds a join slot until the exchange's deadline."""
    assert server.authority is not None
    client = _enroller(server, source)
    client.send(_join_line(server.authority.store.create(None).nameplate))
    return client, client.readline()


def _renew(server: ChatServer, ca_dir: Path, tmp_path: Path, name: str) -> str:
    """Renew a certificate of ``name`` that is in its renewal window; the renewed one's name."""
    from cryptography import x509

    cert, key = issue_client(ca_dir, name, tmp_path / "people")
    ctx = tls.client_context(ca_dir / "ca.pem", certfile=cert, keyfile=key)
    _, cert_pem, _ = enroll.renew(LOOPBACK, server.address[1], ctx)
    return str(x509.load_pem_x509_certificate(cert_pem).subject.rfc4514_string())


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
    held = [_stalled_join(server, "127.0.0.2"), _stalled_join(server, "127.0.0.3")]
    assert all(answer.startswith("PAKE ") for _, answer in held)  # both in their exchange, holding a slot
    _, answer = _stalled_join(server)
    assert answer == "ERR the server is busy with other joins: try again in a minute"
    for client, _ in held:
        _ends(client, 6)
    # The slots come back: a later joiner is served (and told its invite does not exist).
    late = _enroller(server)
    late.send("JOIN 999 " + "A" * 44)
    assert _ends(late, 5)[0].startswith("ERR there is no invite number 999 on this server")


def test_idle_enrollment_connections_hold_no_slot_and_end_at_the_first_line_deadline(
        serve: Callable[..., ChatServer], ca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17, finding 6: 16 idle enrollment connections from one address locked every joiner and every
    renewal out for 20 s at a time. Now a slot is taken only with the first line, which must come soon."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(authority, "FIRST_LINE_DEADLINE", 2.0, raising=False)
    server = _start(serve, ca_dir)
    assert server.authority is not None
    idle = [_enroller(server, "127.0.0.2") for _ in range(authority.MAX_ENROLLING)]
    time.sleep(0.3)  # all past their handshake, saying nothing
    started = time.monotonic()
    assert enroll.join(LOOPBACK, server.address[1], server.authority.store.create("grace").code).name == "grace"
    assert _renew(server, ca_dir, tmp_path, "heidi").startswith("CN=heidi,")
    for client in idle:  # gone at the first-line deadline, long before the exchange's (20 s)
        assert _ends(client, 6) == []
    assert time.monotonic() - started < 5


def test_one_address_holds_at_most_its_share_of_the_join_slots(serve: Callable[..., ChatServer], ca_dir: Path,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    server = _start(serve, ca_dir)
    assert server.authority is not None
    share = getattr(authority, "MAX_ENROLLING_PER_ADDRESS", 4)
    joiners = [_stalled_join(server, "127.0.0.2") for _ in range(share + 2)]  # kept open: each holds its slot
    answers = [answer for _, answer in joiners]
    assert [a.split(" ")[0] for a in answers[:share]] == ["PAKE"] * share
    assert answers[share:] == ["ERR the server is busy with other joins from your address: try again in a "
                               "minute"] * 2
    # Someone else joins meanwhile.
    assert enroll.join(LOOPBACK, server.address[1], server.authority.store.create("ivan").code).name == "ivan"


def test_renewals_are_never_starved_by_joins(serve: Callable[..., ChatServer], ca_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authority, "MAX_ENROLLING", 4)
    server = _start(serve, ca_dir)
    held = [_stalled_join(server, f"127.0.0.{2 + i}") for i in range(4)]  # every join slot, from 4 machines
    assert all(answer.startswith("PAKE ") for _, answer in held)
    assert _stalled_join(server, "127.0.0.9")[1] == "ERR the server is busy with other joins: try again in a minute"
    assert _renew(server, ca_dir, tmp_path, "judy").startswith("CN=judy,")


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
