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

from securechat.client import identity
from securechat.client.chat import ChatClient
from securechat.client.errors import IdentityRefused
from securechat.client.identity import IdentityError, KnownHosts
from securechat.pki import certs
from securechat.server.engine import ChatServer
from securechat.wire import tls
from tests.conftest import LOOPBACK


@pytest.fixture
def minted(tmp_path: Path) -> certs.MintResult:
    return certs.mint(tmp_path / "certs")


@pytest.fixture
def server(minted: certs.MintResult, serve: Callable[..., ChatServer]) -> ChatServer:
    return serve(context=tls.server_context(minted.server_cert, minted.server_key))


def _chain(server: ChatServer) -> list[bytes]:
    raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=5)
    return identity.fetch_chain(raw, "localhost")


def test_the_probe_fetches_the_chain_the_server_presents(server: ChatServer, minted: certs.MintResult) -> None:
    chain = _chain(server)
    assert [tls.fingerprint(der) for der in chain] == [minted.server_fingerprint, minted.ca_fingerprint]
    assert identity.top_of_chain(chain) == 1


def test_pin_on_the_server_certificate(server: ChatServer, minted: certs.MintResult) -> None:
    chain = _chain(server)
    assert identity.check_pin(chain, minted.server_fingerprint) == minted.server_fingerprint
    # Any common spelling of the same fingerprint.
    assert identity.check_pin(chain, minted.server_fingerprint.replace(":", "").lower())


def test_pin_on_the_ca_certificate(server: ChatServer, minted: certs.MintResult) -> None:
    assert identity.check_pin(_chain(server), minted.ca_fingerprint) == minted.ca_fingerprint


def test_pin_mismatch_says_which_fingerprint_is_which(server: ChatServer, minted: certs.MintResult) -> None:
    wrong = "AB:" * 31 + "CD"
    with pytest.raises(IdentityError) as info:
        identity.check_pin(_chain(server), wrong)
    message = str(info.value)
    assert f"expected {wrong}" in message
    assert (f"presented server certificate {minted.server_fingerprint}, CA certificate {minted.ca_fingerprint}"
            in message)
    assert "'[SERVER] CA SHA-256 fingerprint' line" in message and "certs/ca.pem" in message
    assert "server.pem" not in message


def test_malformed_pin_is_refused() -> None:
    with pytest.raises(ValueError):
        tls.normalise_fingerprint("AB:CD")
    with pytest.raises(ValueError):
        tls.normalise_fingerprint("zz" * 32)


def test_a_public_ca_certificate_in_a_forged_chain_does_not_satisfy_a_ca_pin(
        minted: certs.MintResult, tmp_path: Path, serve: Callable[..., ChatServer]) -> None:
    """An impostor can send anybody's CA certificate along; it must also have signed the leaf."""
    impostor = trustme.CA().issue_cert("localhost", "127.0.0.1")
    chain = tmp_path / "forged.pem"
    chain.write_bytes(impostor.cert_chain_pems[0].bytes() + minted.ca_cert.read_bytes())
    key = tmp_path / "forged.key"
    impostor.private_key_pem.write_to_path(str(key))
    server = serve(context=tls.server_context(chain, key))
    assert identity.top_of_chain(_chain(server)) == 0  # the CA did not sign that leaf
    with pytest.raises(IdentityRefused, match="not signed by the pinned CA certificate"):
        ChatClient().connect(LOOPBACK, server.address[1], trust=identity.PinTrust(minted.ca_fingerprint),
                             timeout=5)


def _tofu(server: ChatServer, known: KnownHosts, told: list[tuple[str, ...]] | None = None) -> None:
    trust = identity.TofuTrust(LOOPBACK, server.address[1], known,
                               on_first_contact=lambda *a: told.append(tuple(map(str, a))) if told is not None
                               else None)
    with ChatClient() as client:
        client.connect(LOOPBACK, server.address[1], trust=trust, timeout=5)


def test_tofu_first_contact_then_match_then_renewal_is_not_a_change(
        server: ChatServer, minted: certs.MintResult, tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    told: list[tuple[str, ...]] = []
    _tofu(server, known, told)
    fp = minted.ca_fingerprint
    key = f"127.0.0.1:{server.address[1]}"
    assert told == [(key, fp, str(known.path), "CA certificate")]
    assert known.path.read_text() == f"{key} {fp}\n"
    _tofu(server, known, told)
    assert len(told) == 1  # not a first contact any more

    renewed = certs.issue_server_cert(minted.out_dir)  # a new leaf from the same CA
    assert renewed.server_fingerprint != minted.server_fingerprint
    server.ssl_context = tls.server_context(renewed.server_cert, renewed.server_key)
    _tofu(server, known, told)
    assert len(told) == 1 and known.path.read_text() == f"{key} {fp}\n"


def test_tofu_change_is_refused_loudly(server: ChatServer, minted: certs.MintResult, tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    _tofu(server, known)
    other = trustme.CA().issue_cert("localhost", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.configure_cert(ctx)
    server.ssl_context = ctx
    with pytest.raises(IdentityRefused) as info:
        _tofu(server, known)
    message = str(info.value)
    assert "has CHANGED" in message and str(known.path) in message and "delete the line" in message
    assert f"it was {minted.ca_fingerprint}, it now presents server certificate " in message


@pytest.mark.parametrize("garbage", [b"\xff\xfe not utf-8 at all\n", b"just-one-field\n", b"# a comment\n",
                                     b"a b c d\n", b"\x00\x01\x02"])
def test_garbage_lines_in_known_hosts_are_skipped(garbage: bytes, server: ChatServer,
                                                  minted: certs.MintResult, tmp_path: Path) -> None:
    """Lines that are not ours and not readable are ignored, as OpenSSH does; ours are still found."""
    known = KnownHosts(tmp_path / "known_hosts")
    known.path.write_bytes(garbage)
    told: list[tuple[str, ...]] = []
    _tofu(server, known, told)
    assert len(told) == 1
    _tofu(server, known, told)
    assert len(told) == 1  # remembered, and found again behind the garbage
    assert known.path.read_bytes().startswith(garbage)
    assert known.path.read_bytes().endswith(f"{minted.ca_fingerprint}\n".encode())


@pytest.mark.parametrize("entry", [b"\xff\xfe", b"not-a-fingerprint", b"AB:CD"])
def test_a_damaged_entry_for_this_server_is_refused_not_replaced(entry: bytes, server: ChatServer,
                                                                 tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    original = f"127.0.0.1:{server.address[1]} ".encode() + entry + b"\n"
    known.path.write_bytes(original)
    with pytest.raises(IdentityRefused, match=r"line 1 of .*known_hosts \(the entry for 127.0.0.1:\d+\) is damaged"):
        _tofu(server, known)
    assert known.path.read_bytes() == original


def test_fingerprint_command(minted: certs.MintResult, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "securechat", "fingerprint", str(minted.server_cert)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.strip() == minted.server_fingerprint
    missing = subprocess.run([sys.executable, "-m", "securechat", "fingerprint", str(tmp_path / "nope.pem")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1
    assert "nope.pem" in missing.stderr and "Traceback" not in missing.stderr
