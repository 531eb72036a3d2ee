"""`securechat serve` as a real subprocess: first-run minting, signals, errors."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.lines: list[str] = []

    def wait_for(self, prefix: str, timeout: float = 20) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line.rstrip("\n")
        raise AssertionError(f"{prefix!r} never printed; got {self.lines!r}")


@pytest.fixture
def run_serve(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, cwd: Path = tmp_path) -> Served:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "securechat", "serve", "--host", LOOPBACK, "--port", str(port),
                                 *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(proc)
        return Served(proc, port)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _join(port: int, ca: Path, nick: str) -> LineClient:
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    client = LineClient(tls.client_context(ca).wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


def test_first_run_mints_certificates_then_serves_and_sigterm_exits_cleanly(run_serve, tmp_path: Path) -> None:
    served = run_serve()
    served.wait_for("[SERVER] No certificate in certs/")
    fingerprint = served.wait_for("[SERVER] Server certificate SHA-256 fingerprint").rsplit(" ", 1)[1]
    ca_fingerprint = served.wait_for("[SERVER] CA SHA-256 fingerprint").rsplit(" ", 1)[1]
    assert ca_fingerprint == tls.file_fingerprint(tmp_path / "certs" / "ca.pem")
    assert served.wait_for("[SERVER] Waiting for connections on") == \
        f"[SERVER] Waiting for connections on {LOOPBACK}:{served.port}"
    ca = tmp_path / "certs" / "ca.pem"
    assert fingerprint == tls.file_fingerprint(tmp_path / "certs" / "server.pem")
    assert (tmp_path / "certs" / "server.key").stat().st_mode & 0o777 == 0o600

    alice = _join(served.port, ca, "alice")
    assert served.wait_for("[NEW CLIENT] Connected from ").startswith(f"[NEW CLIENT] Connected from ('{LOOPBACK}', ")
    bob = _join(served.port, ca, "bob")
    alice.expect("* bob joined")
    bob.send("hello")
    assert alice.readline() == "[bob] hello"

    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    for client in (alice, bob):
        assert client.expect("* server") == "* server shutting down"
        with pytest.raises(EOFError):
            client.readline()
    assert served.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 2.5
    _, err = served.proc.communicate()
    assert "Traceback" not in err


def test_ctrl_c_exits_zero_without_traceback(run_serve, cert_files: dict[str, Path]) -> None:
    served = run_serve("--cert", str(cert_files["cert"]), "--key", str(cert_files["key"]))
    served.wait_for("[SERVER] Waiting for connections")
    client = _join(served.port, cert_files["ca"], "alice")
    served.proc.send_signal(signal.SIGINT)
    assert client.expect("* server") == "* server shutting down"
    assert served.proc.wait(timeout=5) == 0
    _, err = served.proc.communicate()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_shuts_down_gracefully_like_sigterm(run_serve, cert_files: dict[str, Path]) -> None:
    """The terminal closing (SIGHUP) tells everyone and exits 0; it used to kill the server silently."""
    served = run_serve("--cert", str(cert_files["cert"]), "--key", str(cert_files["key"]))
    served.wait_for("[SERVER] Waiting for connections")
    alice = _join(served.port, cert_files["ca"], "alice")
    bob = _join(served.port, cert_files["ca"], "bob")
    alice.expect("* bob joined")
    served.proc.send_signal(signal.SIGHUP)
    for client in (alice, bob):
        assert client.expect("* server") == "* server shutting down"
        with pytest.raises(EOFError):
            client.readline()
    assert served.proc.wait(timeout=5) == 0
    out, err = served.proc.communicate()
    assert "[SERVER] Stopped" in out
    assert "Traceback" not in err


def test_second_run_reuses_the_certificates(run_serve, tmp_path: Path) -> None:
    first = run_serve()
    first.wait_for("[SERVER] Waiting")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=5) == 0
    ca_before = (tmp_path / "certs" / "ca.pem").read_bytes()
    second = run_serve()
    second.wait_for("[SERVER] Waiting")
    assert not any("No certificate" in line for line in second.lines)
    assert (tmp_path / "certs" / "ca.pem").read_bytes() == ca_before


def test_explicit_certificate_paths_that_do_not_exist(run_serve, tmp_path: Path) -> None:
    served = run_serve("--cert", str(tmp_path / "missing.pem"), "--key", str(tmp_path / "missing.key"))
    out, err = served.proc.communicate(timeout=20)
    assert served.proc.returncode == 1
    assert err.strip().splitlines() == [f"securechat serve: certificate file not found: {tmp_path / 'missing.pem'} "
                                        "(run 'securechat gen-certs' or pass --cert/--key)"]
    assert not (tmp_path / "certs").exists()  # nothing minted behind the user's back


def test_plain_mode_warns_loudly_and_serves(run_serve) -> None:
    served = run_serve("--plain")
    warning = served.wait_for("[SERVER] WARNING")
    assert "NO ENCRYPTION" in warning
    served.wait_for("[SERVER] Waiting for connections")
    client = LineClient(socket.create_connection((LOOPBACK, served.port), timeout=10))
    assert client.readline() == "* securechat: send your nickname"
    # A TLS client gets a handshake failure, not a hang.
    raw = socket.create_connection((LOOPBACK, served.port), timeout=10)
    with pytest.raises(ssl.SSLError):
        tls.client_context().wrap_socket(raw, server_hostname="localhost")


def test_port_in_use_is_one_line(run_serve, cert_files: dict[str, Path]) -> None:
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "securechat", "serve", "--host", LOOPBACK, "--port", str(port),
                               "--cert", str(cert_files["cert"]), "--key", str(cert_files["key"])],
                              capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"securechat serve: cannot listen on {LOOPBACK}:{port}: address already in use"


def test_plain_and_mutual_tls_cannot_be_combined() -> None:
    proc = subprocess.run([sys.executable, "-m", "securechat", "serve", "--plain", "--require-client-cert"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert "--require-client-cert needs TLS" in proc.stderr
