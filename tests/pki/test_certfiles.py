"""Certificate files (issue 10, item 3): concurrent writers, loose permissions, what gen-certs may touch.

Real `securechat gen-certs` and `securechat serve` subprocesses racing in one directory; real files
with real modes; real TLS handshakes against what ends up on disk.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securechat.pki import certs
from securechat.pki.certs import CertError, issue_server_cert, mint
from securechat.pki.renewal import CertRenewer, Outcome, read_sans
from securechat.wire import tls

LOOPBACK = "127.0.0.1"
SECURECHAT = [sys.executable, "-m", "securechat"]

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes and flock are POSIX")


def _spki(obj: object) -> bytes:
    return obj.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def set_problems(directory: Path) -> list[str]:
    """What is inconsistent in the set: CA key vs ca.pem, server.pem's issuer and chain, server key vs cert."""
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    chain = x509.load_pem_x509_certificates((directory / "server.pem").read_bytes())
    server_key = serialization.load_pem_private_key((directory / "server.key").read_bytes(), None)
    problems = []
    if _spki(ca_key) != _spki(ca):
        problems.append("ca.key does not match ca.pem")
    try:
        chain[0].verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # InvalidSignature or a different issuer name
        problems.append("server.pem is not signed by ca.pem")
    if len(chain) < 2 or chain[1] != ca:
        problems.append("server.pem's chain does not end in ca.pem")
    if _spki(server_key) != _spki(chain[0]):
        problems.append("server.key does not match server.pem")
    return problems


def read_consistently(directory: Path) -> list[str]:
    """Read the set as securechat's readers do: under a shared flock on DIR/.lock (securechat.pki.certdir)."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return set_problems(directory)
    finally:
        os.close(fd)


def gen_certs(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*SECURECHAT, "gen-certs", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


# -- races -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_gen_certs_leave_one_matching_set_and_readers_never_see_half(tmp_path: Path) -> None:
    """8 gen-certs at once, twice: into an empty directory, then re-issuing while a reader reads.

    Before the lock, some exited 1 ("ca.key exists but ca.pem is missing"), some left a server.key
    that does not match server.pem, and a reader saw mixed sets in about 1 read in 8.
    """
    out = tmp_path / "certs"
    procs = [gen_certs("--out", str(out)) for _ in range(8)]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert set_problems(out) == []
    ca_print = tls.file_fingerprint(out / "ca.pem")

    torn: list[list[str]] = []
    reads = 0
    procs = [gen_certs("--out", str(out)) for _ in range(8)]
    while any(p.poll() is None for p in procs):
        reads += 1
        problems = read_consistently(out)
        if problems:
            torn.append(problems)
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert reads > 10, "the reader never ran while gen-certs did: the test proves nothing"
    assert torn == [], f"{len(torn)} of {reads} reads saw a mixed set: {torn[:3]}"
    assert set_problems(out) == []
    assert tls.file_fingerprint(out / "ca.pem") == ca_print, "a re-run replaced the CA"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_first_runs_and_gen_certs_at_once_share_one_ca(tmp_path: Path) -> None:
    """3 first-run `serve` and 3 `gen-certs` in one empty directory: one CA, and every server verifies."""
    ports = [_free_port() for _ in range(3)]
    servers = [subprocess.Popen([*SECURECHAT, "serve", "--host", LOOPBACK, "--port", str(port)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for port in ports]
    minters = [gen_certs(cwd=tmp_path) for _ in range(3)]
    try:
        for proc in minters:
            assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
        for server in servers:
            assert server.stdout is not None
            deadline = time.monotonic() + 60
            seen = []
            while time.monotonic() < deadline:
                line = server.stdout.readline()
                seen.append(line)
                if not line or line.startswith("[SERVER] Waiting for connections"):
                    break
            if not seen[-1].startswith("[SERVER] Waiting for connections"):
                server.kill()
                raise AssertionError((seen, server.communicate(timeout=10)))
        directory = tmp_path / "certs"
        assert set_problems(directory) == []
        context = tls.client_context(directory / "ca.pem")
        for port in ports:  # whichever set each server loaded, it chains to the one CA on disk
            with socket.create_connection((LOOPBACK, port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as sock:
                assert sock.version() is not None
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            _, err = server.communicate(timeout=30)
            assert "Traceback" not in err


def test_mint_holds_the_lock_while_it_reads_and_writes(tmp_path: Path) -> None:
    """A writer waits for a reader's shared lock, and a reader for a writer: they never overlap."""
    mint(tmp_path)
    before = (tmp_path / "server.pem").read_bytes()
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    proc = gen_certs("--out", str(tmp_path))
    try:
        time.sleep(1.0)  # plenty for a gen-certs that does not wait (it takes ~0.3 s)
        assert proc.poll() is None, "gen-certs did not wait for the reader's lock"
        assert (tmp_path / "server.pem").read_bytes() == before
    finally:
        os.close(fd)
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "server.pem").read_bytes() != before
    assert set_problems(tmp_path) == []


# -- permissions -------------------------------------------------------------------------------------


@pytest.fixture
def minted(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    mint(out, clients=["alice"])
    return out


def run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line(result: subprocess.CompletedProcess[str], prefix: str, *phrases: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(prefix), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)


@pytest.mark.parametrize("name", ["server.key", "ca.key"])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_serve_refuses_a_key_others_can_access(minted: Path, name: str, mode: int) -> None:
    (minted / name).chmod(mode)
    result = run([*SECURECHAT, "serve", "--host", LOOPBACK, "--port", "0"], cwd=minted.parent)
    assert_one_line(result, "securechat serve: ", f"{minted.name}/{name}", f"mode {mode:04o}",
                    f"run: chmod 600 {minted.name}/{name}")


def test_serve_with_no_renew_does_not_need_the_ca_key(minted: Path) -> None:
    """ca.key is only read for renewal; with --no-renew its mode is not serve's business."""
    (minted / "ca.key").chmod(0o644)
    proc = subprocess.Popen([*SECURECHAT, "serve", "--host", LOOPBACK, "--port", "0", "--no-renew"],
                            cwd=minted.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("[SERVER] Waiting for connections"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o777])
def test_serve_and_gen_certs_refuse_a_directory_others_can_write(minted: Path, mode: int) -> None:
    minted.chmod(mode)
    before = {p.name: p.read_bytes() for p in minted.iterdir()}
    for command in (["serve", "--host", LOOPBACK, "--port", "0"], ["gen-certs"], ["gen-certs", "--client", "bob"]):
        result = run([*SECURECHAT, *command], cwd=minted.parent)
        assert_one_line(result, f"securechat {command[0]}: ", f"mode {mode:04o}", "run: chmod go-w certs")
    assert {p.name: p.read_bytes() for p in minted.iterdir()} == before


def test_a_sticky_directory_is_not_refused(tmp_path: Path) -> None:
    """/tmp-like (1777): others may add files but not replace ours, so keys there are still ours alone."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    mint(sticky)
    assert set_problems(sticky) == []


def test_gen_certs_refuses_a_loose_ca_key_and_touches_nothing(minted: Path) -> None:
    (minted / "ca.key").chmod(0o644)
    before = {p.name: p.read_bytes() for p in minted.iterdir()}
    result = run([*SECURECHAT, "gen-certs"], cwd=minted.parent)
    assert_one_line(result, "securechat gen-certs: ", "certs/ca.key", "run: chmod 600 certs/ca.key")
    assert {p.name: p.read_bytes() for p in minted.iterdir()} == before
    with pytest.raises(CertError, match="chmod 600"):
        issue_server_cert(minted)


def test_gen_certs_refuses_to_reuse_a_loose_client_key(minted: Path) -> None:
    (minted / "client-alice.key").chmod(0o644)
    result = run([*SECURECHAT, "gen-certs", "--client", "alice"], cwd=minted.parent)
    assert_one_line(result, "securechat gen-certs: ", "certs/client-alice.key", "chmod 600")


def test_connect_refuses_a_client_key_others_can_read(minted: Path) -> None:
    (minted / "client-alice.key").chmod(0o644)
    port = _free_port()  # nothing listens: the key must be refused before any connection
    for extra in (["--key", str(minted / "client-alice.key")], []):  # explicit, and found next to --cert
        result = run([*SECURECHAT, "connect", LOOPBACK, "--port", str(port), "--ca", str(minted / "ca.pem"),
                      "--cert", str(minted / "client-alice.pem"), *extra], cwd=minted.parent)
        assert_one_line(result, "securechat connect: ", "client-alice.key", "mode 0644", "chmod 600")
        assert "refused" not in result.stderr


@pytest.mark.parametrize("loose", ["ca.key", "directory"])
def test_renewal_refuses_a_loose_ca_key_or_directory_and_keeps_serving(
        minted: Path, caplog: pytest.LogCaptureFixture, loose: str) -> None:
    class Holder:
        ssl_context: ssl.SSLContext | None = None

    holder = Holder()
    soon = certs.cert_not_after(minted / "server.pem") - dt.timedelta(days=1)
    renewer = CertRenewer(holder, minted / "server.pem", minted / "server.key", now=lambda: soon)
    target, mode, fix = ((minted / "ca.key", 0o640, "chmod 600") if loose == "ca.key" else
                         (minted, 0o770, "chmod go-w"))
    good = stat.S_IMODE(target.stat().st_mode)
    target.chmod(mode)
    before = (minted / "server.pem").read_bytes()
    with caplog.at_level(logging.WARNING, logger="securechat.renewal"):
        assert renewer.check_once() is Outcome.FAILED
    assert fix in caplog.text and str(target) in caplog.text
    assert (minted / "server.pem").read_bytes() == before
    target.chmod(good)
    assert renewer.check_once() is Outcome.RENEWED


def test_connect_refuses_a_client_key_in_a_directory_others_can_write(minted: Path) -> None:
    minted.chmod(0o777)
    result = run([*SECURECHAT, "connect", LOOPBACK, "--port", str(_free_port()), "--ca", str(minted / "ca.pem"),
                  "--cert", str(minted / "client-alice.pem")], cwd=minted.parent)
    assert_one_line(result, "securechat connect: ", "mode 0777", f"run: chmod go-w {minted}")


def test_serve_first_run_refuses_to_mint_into_a_directory_others_can_write(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs").chmod(0o777)
    result = run([*SECURECHAT, "serve", "--host", LOOPBACK, "--port", "0"], cwd=tmp_path)
    assert_one_line(result, "securechat serve: ", "cannot mint", "run: chmod go-w certs")
    assert [p.name for p in (tmp_path / "certs").iterdir()] == []


# -- what gen-certs may touch ------------------------------------------------------------------------


def test_adding_a_client_leaves_the_server_certificate_alone(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert run([*SECURECHAT, "gen-certs", "--out", str(out), "--host", "chat.lan"], cwd=tmp_path).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("server.pem", "server.key", "ca.pem", "ca.key")}
    result = run([*SECURECHAT, "gen-certs", "--out", str(out), "--client", "carol"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "client-carol.pem").exists()
    assert "Left" in result.stdout and "server.pem as it was" in result.stdout
    # The suggested command has everything carol needs (issue 11).
    assert "then carol runs: securechat connect " in result.stdout
    assert "--ca ca.pem --cert client-carol.pem --key client-carol.key" in result.stdout


def test_reissuing_the_server_certificate_keeps_its_names_unless_reset(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    mint(out, hosts=["chat.lan"], ips=["192.168.7.9"])
    first = x509.load_pem_x509_certificate((out / "server.pem").read_bytes()).serial_number
    assert run([*SECURECHAT, "gen-certs", "--out", str(out)], cwd=tmp_path).returncode == 0
    names, addrs = read_sans(out / "server.pem")
    assert x509.load_pem_x509_certificate((out / "server.pem").read_bytes()).serial_number != first
    assert "chat.lan" in names and "192.168.7.9" in addrs
    result = run([*SECURECHAT, "gen-certs", "--out", str(out), "--host", "other.lan", "--client", "dave"],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names, addrs = read_sans(out / "server.pem")
    assert {"chat.lan", "other.lan"} <= set(names) and "192.168.7.9" in addrs
    assert run([*SECURECHAT, "gen-certs", "--out", str(out), "--reset-names"], cwd=tmp_path).returncode == 0
    names, addrs = read_sans(out / "server.pem")
    assert "chat.lan" not in names and "other.lan" not in names and "192.168.7.9" not in addrs
    assert "localhost" in names and "127.0.0.1" in addrs


def test_rerunning_a_client_keeps_its_key_and_force_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    mint(out, clients=["alice"])
    key = (out / "client-alice.key").read_bytes()
    cert = (out / "client-alice.pem").read_bytes()
    result = run([*SECURECHAT, "gen-certs", "--out", str(out), "--client", "alice"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "client-alice.key").read_bytes() == key
    assert (out / "client-alice.pem").read_bytes() != cert  # renewed, for the same key
    new = x509.load_pem_x509_certificate((out / "client-alice.pem").read_bytes())
    assert _spki(new) == _spki(serialization.load_pem_private_key(key, None))
    assert "kept the existing key" in result.stderr and result.stderr.startswith("securechat gen-certs: note: ")
    assert run([*SECURECHAT, "gen-certs", "--out", str(out), "--client", "alice", "--force"],
               cwd=tmp_path).returncode == 0
    assert (out / "client-alice.key").read_bytes() != key


# -- client names are nicknames ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["server", "admin", "Admin", "bad name", "x" * 25, ""])
def test_gen_certs_refuses_names_the_server_refuses(tmp_path: Path, name: str) -> None:
    result = run([*SECURECHAT, "gen-certs", "--out", str(tmp_path / "certs"), "--client", name], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("securechat gen-certs: argument --client: invalid client name")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("second", ["AIice", "Alice", "ALICE"])
def test_gen_certs_refuses_a_name_the_server_would_confuse_with_an_issued_one(tmp_path: Path, second: str) -> None:
    out = tmp_path / "certs"
    mint(out, clients=["alice"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run([*SECURECHAT, "gen-certs", "--out", str(out), "--client", second], cwd=tmp_path)
    assert_one_line(result, "securechat gen-certs: ", repr(second), "'alice'", "same nickname")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_gen_certs_refuses_confusable_names_in_one_run(tmp_path: Path) -> None:
    result = run([*SECURECHAT, "gen-certs", "--out", str(tmp_path / "c"), "--client", "bob", "--client", "Bob"],
                 cwd=tmp_path)
    assert_one_line(result, "securechat gen-certs: ", "'bob'", "'Bob'", "same nickname")
