"""Automatic certificate renewal: short-lived certificates and an injected clock, never waiting."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from securechat.pki import builders, certs, renewal
from securechat.pki.renewal import CertRenewer, Outcome
from securechat.server.engine import ChatServer
from securechat.wire import tls
from tests.conftest import LineClient
from tests.wire.test_tls_config import serve_process

LOOPBACK = "127.0.0.1"
NOW = dt.datetime.now(dt.timezone.utc)


def clock(offset: dt.timedelta = dt.timedelta(0)) -> Callable[[], dt.datetime]:
    return lambda: dt.datetime.now(dt.timezone.utc) + offset


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def file_sha256(path: Path) -> str:
    return hashlib.sha256(load(path).public_bytes(Encoding.DER)).hexdigest()


def sans(path: Path) -> tuple[set[str], set[str]]:
    names, addrs = renewal.read_sans(path)
    return set(names), set(addrs)


@pytest.fixture
def short_lived(tmp_path: Path) -> Path:
    """certs/ with a local CA and a server certificate valid 10 days (so within the 30-day margin)."""
    out = tmp_path / "certs"
    certs.mint(out, hosts=["chat.lan"], ips=["192.168.77.5"], days=10)
    return out


@pytest.fixture
def server_for(serve: Callable[..., ChatServer]) -> Callable[[Path], ChatServer]:
    """A server for the certificate in ``cert_dir`` (conftest's ``serve`` shuts it down)."""

    def start(cert_dir: Path) -> ChatServer:
        ctx = tls.server_context(cert_dir / "server.pem", cert_dir / "server.key")
        return serve(context=ctx, login_timeout=0)

    return start


def join(server: ChatServer, ca: Path, nick: str) -> tuple[LineClient, str]:
    """A chat member over a fresh handshake; returns it and the SHA-256 of the certificate it saw."""
    raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=5)
    sock = tls.client_context(ca).wrap_socket(raw, server_hostname="localhost")
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    client = LineClient(sock, 5)
    client.expect("* securechat: send your nickname")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client, hashlib.sha256(der).hexdigest()


# -- renewal from the local CA ------------------------------------------------------------------


def test_renewal_reaches_new_handshakes_while_open_connections_stay(
    short_lived: Path, server_for: Callable[[Path], ChatServer]
) -> None:
    server = server_for(short_lived)
    old_ctx = server.ssl_context
    ca = short_lived / "ca.pem"
    old_names, old_addrs = sans(short_lived / "server.pem")
    alice, seen_before = join(server, ca, "alice")
    assert seen_before == file_sha256(short_lived / "server.pem")

    renewer = CertRenewer(server, short_lived / "server.pem", short_lived / "server.key", now=clock())
    assert renewer.can_renew
    assert renewer.check_once() is Outcome.RENEWED
    assert server.ssl_context is not old_ctx

    bob, seen_after = join(server, ca, "bob")
    assert seen_after != seen_before
    assert seen_after == file_sha256(short_lived / "server.pem")
    # the connection opened before the renewal keeps working, both ways
    alice.expect("* bob joined")
    alice.send("still here")
    assert bob.expect("[alice]") == "[alice] still here"
    bob.send("hi alice")
    assert alice.expect("[bob]") == "[bob] hi alice"

    new = load(short_lived / "server.pem")
    left = new.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=89) < left <= dt.timedelta(days=90)
    names, addrs = sans(short_lived / "server.pem")
    assert old_names <= names and old_addrs <= addrs  # chat.lan and 192.168.77.5 kept
    assert {"chat.lan", "localhost"} <= names and {"192.168.77.5", "127.0.0.1"} <= addrs
    # the next check finds nothing to do
    assert renewer.check_once() is Outcome.VALID
    alice.close()
    bob.close()


def test_renewal_uses_the_injected_clock(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    certs.mint(out)  # 90 days
    holder = type("Holder", (), {"ssl_context": None})()
    assert (
        CertRenewer(holder, out / "server.pem", out / "server.key", now=clock()).check_once() is Outcome.VALID
    )
    assert holder.ssl_context is None
    later = dt.timedelta(days=75)  # 15 days left by the fake clock
    renewer = CertRenewer(holder, out / "server.pem", out / "server.key", now=clock(later))
    assert renewer.check_once() is Outcome.RENEWED
    assert isinstance(holder.ssl_context, ssl.SSLContext)
    new = load(out / "server.pem")
    assert abs(new.not_valid_before_utc - (NOW + later - builders.CLOCK_SKEW)) < dt.timedelta(minutes=5)
    assert abs(new.not_valid_after_utc - (NOW + later + dt.timedelta(days=90))) < dt.timedelta(minutes=5)


def test_rsa_certificate_is_renewed_as_rsa(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    certs.mint(out, key_type="rsa", days=5)
    holder = type("Holder", (), {"ssl_context": None})()
    assert (
        CertRenewer(holder, out / "server.pem", out / "server.key", now=clock()).check_once()
        is Outcome.RENEWED
    )
    assert isinstance(load(out / "server.pem").public_key(), rsa.RSAPublicKey)


def test_failed_renewal_keeps_serving_the_old_certificate(
    short_lived: Path,
    server_for: Callable[[Path], ChatServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = server_for(short_lived)
    old_ctx = server.ssl_context
    before = (short_lived / "server.pem").read_bytes()
    certs.mint(tmp_path / "other")  # a CA key that does not match ca.pem: the CA is unusable
    shutil.copy(tmp_path / "other" / "ca.key", short_lived / "ca.key")
    renewer = CertRenewer(server, short_lived / "server.pem", short_lived / "server.key", now=clock())
    with caplog.at_level(logging.WARNING, logger="securechat.renewal"):
        assert renewer.check_once() is Outcome.FAILED
    assert server.ssl_context is old_ctx
    assert (short_lived / "server.pem").read_bytes() == before
    assert any("cannot renew" in r.getMessage() and "days left" in r.getMessage() for r in caplog.records)
    join(server, short_lived / "ca.pem", "carol")[0].close()  # still serving


def test_renewal_only_manages_server_pem_beside_the_ca(short_lived: Path) -> None:
    shutil.copy(short_lived / "server.pem", short_lived / "mine.pem")
    shutil.copy(short_lived / "server.key", short_lived / "mine.key")
    directory, why = renewal.ca_dir_for(short_lived / "mine.pem", short_lived / "mine.key")
    assert directory is None and "server.pem" in why
    assert renewal.ca_dir_for(short_lived / "server.pem", short_lived / "server.key") == (short_lived, "")
    holder = type("Holder", (), {"ssl_context": None})()
    off = CertRenewer(holder, short_lived / "server.pem", short_lived / "server.key", auto_renew=False)
    assert not off.can_renew and off.check_once() is Outcome.EXPIRING


# -- without the CA key: warnings --------------------------------------------------------------


@pytest.fixture
def no_ca(short_lived: Path, tmp_path: Path) -> Path:
    """server.pem/server.key (10 days left) copied to a directory without the CA."""
    out = tmp_path / "deployed"
    out.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(short_lived / name, out / name)
    return out


def test_without_ca_key_warns_with_days_left(no_ca: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = type("Holder", (), {"ssl_context": None})()
    renewer = CertRenewer(holder, no_ca / "server.pem", no_ca / "server.key", now=clock())
    assert not renewer.can_renew
    with caplog.at_level(logging.INFO, logger="securechat.renewal"):
        assert renewer.check_once() is Outcome.EXPIRING
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "expires in 10.0 days" in warnings[0].getMessage()
    assert "no CA key" in warnings[0].getMessage()
    assert holder.ssl_context is None


def test_without_ca_key_expired_is_an_error(no_ca: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = type("Holder", (), {"ssl_context": None})()
    renewer = CertRenewer(
        holder, no_ca / "server.pem", no_ca / "server.key", now=clock(dt.timedelta(days=12))
    )
    with caplog.at_level(logging.WARNING, logger="securechat.renewal"):
        assert renewer.check_once() is Outcome.EXPIRED
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "EXPIRED 2 days ago" in errors[0].getMessage()


def test_without_ca_key_is_quiet_far_from_expiry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    certs.mint(tmp_path / "ca")
    for name in ("server.pem", "server.key"):
        shutil.copy(tmp_path / "ca" / name, tmp_path / name)
    holder = type("Holder", (), {"ssl_context": None})()
    with caplog.at_level(logging.WARNING, logger="securechat.renewal"):
        renewer = CertRenewer(holder, tmp_path / "server.pem", tmp_path / "server.key", now=clock())
        assert renewer.check_once() is Outcome.VALID
        # 61 days on: 29 left, inside the margin
        renewer.now = clock(dt.timedelta(days=61))
        assert renewer.check_once() is Outcome.EXPIRING
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_files_replaced_by_hand_are_loaded_by_the_next_check(
    short_lived: Path, no_ca: Path, server_for: Callable[[Path], ChatServer]
) -> None:
    server = server_for(no_ca)
    renewer = CertRenewer(server, no_ca / "server.pem", no_ca / "server.key", now=clock())
    assert renewer.check_once() is Outcome.EXPIRING
    _, before = join(server, short_lived / "ca.pem", "dave")
    certs.mint(short_lived)  # the admin re-issues where the CA is (90 days) and copies the files over
    for name in ("server.key", "server.pem"):
        shutil.copy(short_lived / name, no_ca / name)
    assert renewer.check_once() is Outcome.RELOADED
    client, after = join(server, short_lived / "ca.pem", "erin")
    assert after != before
    client.close()
    assert renewer.check_once() is Outcome.VALID


# -- the daily thread --------------------------------------------------------------------------


def test_background_checks_repeat_and_stop_at_once(no_ca: Path) -> None:
    holder = type("Holder", (), {"ssl_context": None})()
    calls = threading.Semaphore(0)

    def counting_clock() -> dt.datetime:
        calls.release()
        return dt.datetime.now(dt.timezone.utc)

    renewer = CertRenewer(
        holder, no_ca / "server.pem", no_ca / "server.key", now=counting_clock, interval=0.02
    )
    renewer.start()
    try:
        for _ in range(3):
            assert calls.acquire(timeout=5), "the background check did not run"
    finally:
        renewer.stop()
    slow = CertRenewer(holder, no_ca / "server.pem", no_ca / "server.key", interval=renewal.CHECK_INTERVAL)
    slow.start()
    started = time.monotonic()
    slow.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "securechat-renewal" and t.is_alive() for t in threading.enumerate())


def test_a_crashing_check_does_not_kill_the_thread(no_ca: Path) -> None:
    holder = type("Holder", (), {"ssl_context": None})()

    def broken() -> dt.datetime:
        raise RuntimeError("clock on fire")

    renewer = CertRenewer(holder, no_ca / "server.pem", no_ca / "server.key", now=broken)
    assert renewer.check_once() is Outcome.FAILED


# -- `securechat serve` --------------------------------------------------------------------------


def _peer_cert(port: int, ca: Path) -> x509.Certificate:
    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        tls.client_context(ca).wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_serve_renews_a_short_lived_certificate_at_start(tmp_path: Path) -> None:
    certs.mint(tmp_path / "certs", days=10)
    with serve_process(tmp_path) as (port, proc):
        cert = _peer_cert(port, tmp_path / "certs/ca.pem")
        assert cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=89)
    assert proc.returncode == 0
    assert "renewed from the local CA" in proc.stderr_text  # type: ignore[attr-defined]


def test_serve_no_renew_and_without_ca_key_warn_at_start(tmp_path: Path) -> None:
    certs.mint(tmp_path / "certs", days=10)
    before = (tmp_path / "certs/server.pem").read_bytes()
    deployed = tmp_path / "deployed"
    deployed.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(tmp_path / "certs" / name, deployed / name)
    for args in (["--no-renew"], ["--cert", "deployed/server.pem", "--key", "deployed/server.key"]):
        with serve_process(tmp_path, *args) as (port, proc):
            cert = _peer_cert(port, tmp_path / "certs/ca.pem")
            assert cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=11)
        assert proc.returncode == 0
        assert "expires in 10.0 days" in proc.stderr_text  # type: ignore[attr-defined]
    assert (tmp_path / "certs/server.pem").read_bytes() == before
