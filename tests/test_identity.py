"""Fingerprint pinning and trust on first use, against real TLS servers on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from securechat import certs, identity, tls
from securechat.identity import IdentityError, KnownHosts
from securechat.server import ChatServer
from tests.conftest import LOOPBACK


@pytest.fixture
def minted(tmp_path: Path) -> certs.MintResult:
    return certs.mint(tmp_path / "certs")


@pytest.fixture
def server(minted: certs.MintResult, serve: Callable[..., ChatServer]) -> ChatServer:
    return serve(context=tls.server_context(minted.server_cert, minted.server_key))


def _handshake(server: ChatServer) -> ssl.SSLSocket:
    raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=5)
    return identity.pinned_context().wrap_socket(raw, server_hostname="localhost")


def test_pin_on_the_server_certificate(server: ChatServer, minted: certs.MintResult) -> None:
    with _handshake(server) as sock:
        assert identity.check_pin(sock, minted.server_fingerprint) == minted.server_fingerprint
        # Any common spelling of the same fingerprint.
        assert identity.check_pin(sock, minted.server_fingerprint.replace(":", "").lower())


def test_pin_on_the_ca_certificate(server: ChatServer, minted: certs.MintResult) -> None:
    with _handshake(server) as sock:
        assert identity.check_pin(sock, minted.ca_fingerprint) == minted.ca_fingerprint


def test_pin_mismatch_shows_expected_and_presented(server: ChatServer, minted: certs.MintResult) -> None:
    wrong = "AB:" * 31 + "CD"
    with _handshake(server) as sock, pytest.raises(IdentityError) as info:
        identity.check_pin(sock, wrong)
    assert f"expected {wrong}" in str(info.value)
    assert f"presented {minted.server_fingerprint}" in str(info.value)


def test_malformed_pin_is_refused() -> None:
    with pytest.raises(ValueError):
        tls.normalise_fingerprint("AB:CD")
    with pytest.raises(ValueError):
        tls.normalise_fingerprint("zz" * 32)


def test_a_public_ca_certificate_in_a_forged_chain_does_not_satisfy_a_ca_pin(
        minted: certs.MintResult, tmp_path: Path, serve: Callable[..., ChatServer]) -> None:
    """An impostor can send anybody's CA certificate along; it must also have signed the leaf."""
    impostor = trustme.CA().issue_cert("localhost")
    chain = tmp_path / "forged.pem"
    chain.write_bytes(impostor.cert_chain_pems[0].bytes() + minted.ca_cert.read_bytes())
    key = tmp_path / "forged.key"
    impostor.private_key_pem.write_to_path(str(key))
    server = serve(context=tls.server_context(chain, key))
    with _handshake(server) as sock, pytest.raises(IdentityError, match="does not match"):
        identity.check_pin(sock, minted.ca_fingerprint)


def test_tofu_first_contact_then_match_then_renewal_is_not_a_change(
        server: ChatServer, minted: certs.MintResult, tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    with _handshake(server) as sock:
        fp, first = known.check(sock, "127.0.0.1", server.address[1])
    assert first and fp == minted.ca_fingerprint
    assert f"127.0.0.1:{server.address[1]} {fp}" in known.path.read_text()
    with _handshake(server) as sock:
        assert known.check(sock, "127.0.0.1", server.address[1]) == (fp, False)

    renewed = certs.issue_server_cert(minted.out_dir)  # a new leaf from the same CA
    assert renewed.server_fingerprint != minted.server_fingerprint
    server.ssl_context = tls.server_context(renewed.server_cert, renewed.server_key)
    with _handshake(server) as sock:
        assert known.check(sock, "127.0.0.1", server.address[1]) == (fp, False)


def test_tofu_change_is_refused_loudly(server: ChatServer, minted: certs.MintResult, tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    with _handshake(server) as sock:
        known.check(sock, "127.0.0.1", server.address[1])
    other = trustme.CA().issue_cert("localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.configure_cert(ctx)
    server.ssl_context = ctx
    with _handshake(server) as sock, pytest.raises(IdentityError) as info:
        known.check(sock, "127.0.0.1", server.address[1])
    message = str(info.value)
    assert "has CHANGED" in message and str(known.path) in message and "delete the line" in message


def test_fingerprint_command(minted: certs.MintResult, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "securechat", "fingerprint", str(minted.server_cert)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.strip() == minted.server_fingerprint
    missing = subprocess.run([sys.executable, "-m", "securechat", "fingerprint", str(tmp_path / "nope.pem")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1
    assert "nope.pem" in missing.stderr and "Traceback" not in missing.stderr
