"""Revocation, renewal and names under races and look-alikes, against a real ``securechat serve`` (issue 17).

The server runs as a subprocess in its own directory (its certs/ and ledger there); revoke, invite and
gen-certs are subprocesses too; renewals and logins are real TLS connections on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securechat.client import enroll
from securechat.pki import builders, certs, enrollment, ledger
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient, issue_client
from tests.pki.test_invites import Machine, Reader, Server, _guest, _say

REVOKED = "* your certificate has been revoked"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server")
    yield srv
    srv.stop()


def _first_line(srv: Server, cert: Path, key: Path) -> str:
    """What the server says first to a chat connection presenting ``cert``."""
    ctx = tls.client_context(srv.home / "certs" / "ca.pem", certfile=cert, keyfile=key)
    raw = socket.create_connection((LOOPBACK, srv.port), timeout=10)
    client = LineClient(ctx.wrap_socket(raw, server_hostname="localhost"))
    try:
        return client.readline()
    except (EOFError, ssl.SSLError, ConnectionError) as exc:
        return f"(closed: {exc})"
    finally:
        client.close()


def _renew(srv: Server, cert: Path, key: Path, out: Path) -> tuple[Path, Path]:
    """Renew ``cert`` (RenewalRefused/JoinError if refused); the renewed certificate and key, written to ``out``."""
    ctx = tls.client_context(srv.home / "certs" / "ca.pem", certfile=cert, keyfile=key)
    new_key, cert_pem, _ = enroll.renew(LOOPBACK, srv.port, ctx)
    serial = x509.load_pem_x509_certificate(cert_pem).serial_number
    new_cert, new_key_path = out / f"{serial:X}.pem", out / f"{serial:X}.key"
    new_cert.write_bytes(cert_pem)
    new_key_path.write_bytes(enroll.key_pem(new_key))
    new_key_path.chmod(0o600)
    return new_cert, new_key_path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alice", "bob", "carol"])  # the race is run three times over
def test_renewing_in_a_loop_while_revoke_runs_leaves_no_valid_certificate(server: Server, tmp_path: Path,
                                                                         name: str) -> None:
    """Issue 17, finding 2: renewal checked "not revoked" in one transaction and recorded the new
    certificate in another, so a holder renewing continuously kept one minted in between."""
    certs_dir = server.home / "certs"
    server.invite(name)
    # Several holders of the person's certificates (its machines, or thieves), each in its renewal window.
    holders = [issue_client(certs_dir, name, tmp_path / f"holder{i}") for i in range(8)]
    obtained: list[tuple[Path, Path]] = list(holders)
    lock = threading.Lock()
    stop = threading.Event()

    def renew_forever(cert: Path, key: Path, out: Path) -> None:
        while not stop.is_set():
            try:
                cert, key = _renew(server, cert, key, out)
            except enrollment.JoinError:  # refused (revoked, renewed already, too early) or busy: again
                time.sleep(0.02)
                continue
            with lock:
                obtained.append((cert, key))

    threads = [threading.Thread(target=renew_forever, args=(cert, key, cert.parent)) for cert, key in holders]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        revoked = server.cli("revoke", name)
        time.sleep(1.0)  # renewals go on after the revocation, too
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert revoked.returncode == 0, revoked.stderr
    assert len(obtained) > len(holders)  # renewals did happen during the race
    for cert, key in obtained:
        assert _first_line(server, cert, key).startswith(REVOKED), cert.name
    now = time.time()
    assert not [c for c in ledger.Store(certs_dir).certificates() if c.revoked is None and c.not_after > now]


def test_revoking_a_serial_revokes_the_certificates_renewed_from_it(server: Server, tmp_path: Path) -> None:
    """Issue 17, finding 11: ``revoke SERIAL`` missed the certificates renewed from that serial."""
    certs_dir = server.home / "certs"
    server.invite("alice")
    laptop = issue_client(certs_dir, "alice", tmp_path / "laptop")
    renewed = _renew(server, *laptop, tmp_path / "laptop")
    serial = f"{x509.load_pem_x509_certificate(laptop[0].read_bytes()).serial_number:X}"
    done = server.cli("revoke", serial)
    assert done.returncode == 0, done.stderr
    assert _first_line(server, *renewed).startswith(REVOKED)
    assert _first_line(server, *laptop).startswith(REVOKED)
    # A serial is one machine's chain: alice's other machine still gets in, and her name is hers.
    phone = issue_client(certs_dir, "alice", tmp_path / "phone", days_ago=0)
    assert _first_line(server, *phone) == "* securechat: send your nickname"
    assert "stays reserved" not in done.stdout


def test_a_revoked_name_stays_reserved_until_released(server: Server, tmp_path: Path) -> None:
    """Issue 17, finding 8: after ``revoke alice`` a guest without a certificate could take the nick."""
    assert Machine(tmp_path / "alice").join(server, server.invite("alice")).returncode == 0
    done = server.cli("revoke", "alice")
    assert done.returncode == 0
    time.sleep(1.5)  # long enough for the server to have re-read the ledger (every 0.5 s)
    for nick in ("alice", "ALICE", "AIice"):
        guest = _guest(server, nick)
        assert guest.readline() == f"* nickname refused: {nick!r} belongs to a certificate holder; send another"
        guest.close()
    assert "The name alice stays reserved: nobody may be invited or connect under it until 'securechat revoke " \
           "--release alice'." in done.stdout.splitlines()
    again = server.cli("invite", "alice", "--host", LOOPBACK)
    assert again.returncode == 1
    assert again.stderr.splitlines() == ["securechat invite: the certificates of 'alice' were revoked and the name "
                                         "stays reserved: run 'securechat revoke --release alice' first to give it "
                                         "out again"]
    released = server.cli("revoke", "--release", "alice")
    assert released.returncode == 0, released.stderr
    assert released.stdout == "Released the name alice: it may be invited again (securechat invite alice).\n"
    guest = _guest(server, "alice")
    assert guest.readline().startswith("* welcome, alice!")
    guest.close()


def test_look_alike_names_are_refused_by_invite_and_gen_certs(server: Server, tmp_path: Path) -> None:
    """Issue 17, finding 4: ``gen-certs --client AIice`` was refused beside ``alice``, ``invite AIice`` was not
    (and its holder would read alice's kept messages, keyed by the folded name, and lock her out)."""
    assert Machine(tmp_path / "alice").join(server, server.invite("alice")).returncode == 0
    for args in (["invite", "AIice"], ["invite", "ALICE"], ["gen-certs", "--client", "AIice"]):
        done = server.cli(*args)
        assert done.returncode == 1, (args, done.stdout)
        assert done.stderr.splitlines() == [f"securechat {args[0]}: client name {args[-1]!r} is the same nickname to "
                                            "the server as 'alice', already issued (case and look-alike letters are "
                                            "folded): pick another name"]
    assert not (server.home / "certs" / "client-AIice.pem").exists()
    assert server.cli("invite", "alice").returncode == 0  # the same person again (another machine): fine
    # A name only invited (not joined yet) is held too, and gen-certs records what it issues.
    assert server.cli("invite", "bob").returncode == 0
    assert "already invited" in server.cli("invite", "B0B").stderr
    assert server.cli("gen-certs", "--client", "carol").returncode == 0
    assert "already issued" in server.cli("invite", "CAROL").stderr


def test_a_certificate_of_a_revoked_name_is_refused_even_if_issued_afterwards(server: Server, tmp_path: Path) -> None:
    """``revoke NAME`` covers issuance that comes later (the ledger refuses it), and a certificate of that
    name the ledger never saw (minted elsewhere by the same CA key) is refused by name."""
    server.invite("alice")
    assert server.cli("revoke", "alice").returncode == 0
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert, ca_key = certs._load_ca(server.home / "certs", now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = builders.build_client(key, ca_cert, ca_key, "alice", 30, now)
    with pytest.raises(ledger.Refused, match="were revoked"):
        ledger.Store(server.home / "certs").record(cert, "alice", 30)
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "a.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "a.key").write_bytes(enroll.key_pem(key))
    (out / "a.key").chmod(0o600)
    assert _first_line(server, out / "a.pem", out / "a.key").startswith(REVOKED)


def test_a_certificate_the_ledger_never_recorded_is_entered_when_it_is_first_seen(server: Server,
                                                                                  tmp_path: Path) -> None:
    """A ``gen-certs --client`` certificate from before the ledger recorded them: seen, it is entered (its
    name held, its serial revocable)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert, ca_key = certs._load_ca(server.home / "certs", now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = builders.build_client(key, ca_cert, ca_key, "erin", 90, now)
    out = tmp_path / "old"
    out.mkdir()
    (out / "erin.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "erin.key").write_bytes(enroll.key_pem(key))
    (out / "erin.key").chmod(0o600)
    store = ledger.Store(server.home / "certs")
    assert store.get(cert.serial_number) is None
    assert _first_line(server, out / "erin.pem", out / "erin.key") == "* securechat: send your nickname"
    seen = store.get(cert.serial_number)
    assert seen is not None and seen.name == "erin" and seen.last_seen is not None
    assert "already issued" in server.cli("invite", "ERIN").stderr
    assert server.cli("revoke", seen.serial).returncode == 0
    assert _first_line(server, out / "erin.pem", out / "erin.key").startswith(REVOKED)


def test_revoke_says_when_no_server_has_published_to_the_cluster_for_a_while(tmp_path: Path) -> None:
    """The cluster learns of a revocation from the server holding ca.key: if that one has not published
    lately, ``revoke`` says the other servers do not know yet (and still revokes)."""
    import subprocess
    import sys

    certs_dir = tmp_path / "certs"
    certs.mint(certs_dir, clients=["alice", "bob"])
    ledger.Store(certs_dir, clock=lambda: time.time() - 3600).note_published("redis://chat-redis.lan:6379/0")
    done = subprocess.run([sys.executable, "-m", "securechat", "revoke", "alice", "--certs", str(certs_dir)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.startswith("Revoked alice (serial ")
    (note,) = done.stderr.splitlines()
    assert note.startswith("securechat revoke: note: the cluster at redis://chat-redis.lan:6379/0 was last updated ")
    assert note.endswith("its other servers learn of this once the server holding ca.key runs with --redis again")
    ledger.Store(certs_dir).note_published("redis://chat-redis.lan:6379/0")  # a publisher at work: no note
    again = subprocess.run([sys.executable, "-m", "securechat", "revoke", "bob", "--certs", str(certs_dir)],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and again.stdout.startswith("Revoked bob (serial ") and again.stderr == ""


def test_messages_are_kept_only_for_names_the_ca_gave_out_under_their_own_spelling(tmp_path: Path) -> None:
    srv = Server(tmp_path / "server", "--require-client-cert")
    try:
        alice, bob = Machine(tmp_path / "alice"), Machine(tmp_path / "bob")
        assert alice.join(srv, srv.invite("alice")).returncode == 0
        assert bob.join(srv, srv.invite("bob")).returncode == 0
        a = alice.chat(srv)
        a_out = Reader(a)
        a_out.expect("* welcome, alice!")
        _say(a, "/msg B0B kept under bob's own name")
        a_out.expect("* bob is offline: kept for their next login")
        _say(a, "/msg nobody hello?")  # a name nobody was given: nothing stored for nobody
        a_out.expect("* no such nick: nobody")
        _say(a, "/quit")
        a.wait(10)
        b = bob.chat(srv)
        b_out = Reader(b)
        b_out.expect("* 1 private message while you were away:")
        b_out.expect("[alice -> bob] kept under bob's own name")
        _say(b, "/quit")
        b.wait(10)
    finally:
        srv.stop()
