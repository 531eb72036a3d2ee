"""Client side of identity (issue 6): client certificates, --pin and --tofu, against real servers.

Servers are real ChatServers on 127.0.0.1 (mutual TLS: ``require_client_cert=True``); the command
line cases run ``python -m securechat connect`` as a subprocess in line mode, with XDG_CONFIG_HOME in
a temporary directory so the user's own known_hosts is never touched.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from securechat.client import identity
from securechat.client.chat import ChatClient
from securechat.client.errors import BoundNickUnusable, CertificateRefused, IdentityRefused
from securechat.pki import certs
from securechat.server.engine import ChatServer
from securechat.wire import tls

LOOPBACK = "127.0.0.1"
NOW = datetime.datetime.now(datetime.timezone.utc)


@dataclass
class Pki:
    dir: Path
    minted: certs.MintResult  # the server's CA, server.pem (chain: leaf + CA) and its fingerprints
    client_ca: trustme.CA  # signs the client certificates the server accepts
    client_ca_file: Path

    def client_files(self, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
        """Write ``leaf`` as client-NAME.pem / client-NAME.key, as gen-certs would."""
        pem, key = self.dir / f"client-{name}.pem", self.dir / f"client-{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(pem))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)  # as gen-certs writes it; securechat refuses keys others can read
        return pem, key

    def client(self, name: str) -> tuple[Path, Path]:
        """A valid client certificate naming ``name`` (cached on disk)."""
        pem = self.dir / f"client-{name}.pem"
        if pem.exists():
            return pem, self.dir / f"client-{name}.key"
        return self.client_files(name, self.client_ca.issue_cert(common_name=name))

    def server_context(self, tls_max: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        ctx = tls.server_context(self.minted.server_cert, self.minted.server_key,
                                 client_ca=self.client_ca_file, require_client_cert=True,
                                 tls_min="1.2" if tls_max else tls.DEFAULT_TLS_MIN)
        if tls_max is not None:
            ctx.maximum_version = tls_max
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    minted = certs.mint(d / "server")
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(d / "client-ca.pem"))
    return Pki(d, minted, client_ca, d / "client-ca.pem")


@pytest.fixture
def serve(pki: Pki) -> Iterator[Callable[..., ChatServer]]:
    servers: list[ChatServer] = []

    def start(ctx: ssl.SSLContext | None = None, port: int = 0) -> ChatServer:
        server = ChatServer(LOOPBACK, port, ctx or pki.server_context())
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown(timeout=1.0)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The subprocess environment: its own XDG_CONFIG_HOME, unbuffered output."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(tmp_path / "config")}


def argv(port: int, *extra: str | Path) -> list[str]:
    return [sys.executable, "-m", "securechat", "connect", LOOPBACK, "--port", str(port), *map(str, extra)]


def run(args: list[str], env: dict[str, str], stdin: str = "", cwd: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=20, env=env, cwd=cwd)


def assert_failed(result: subprocess.CompletedProcess[str], *phrases: str, code: int = 1) -> None:
    """Exit ``code``, every phrase in stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)
    assert "Traceback" not in result.stderr


def cert_args(pki: Pki, name: str) -> list[str | Path]:
    pem, key = pki.client(name)
    return ["--cert", pem, "--key", key]


class Watcher:
    """A library client with its own certificate, to see what others see."""

    def __init__(self, pki: Pki, server: ChatServer, name: str) -> None:
        ctx = tls.client_context(pki.minted.ca_cert)
        pem, key = pki.client(name)
        ctx.load_cert_chain(str(pem), str(key))
        self.client = ChatClient()
        self.client.connect(LOOPBACK, server.address[1], ssl_context=ctx, timeout=5)
        assert self.client.register(name, timeout=5) == name

    def expect(self, wanted: str, timeout: float = 5.0) -> None:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.client.recv_line(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                if self.client.closed:
                    break
                continue
            seen.append(line)
            if line == wanted:
                return
        raise AssertionError(f"never got {wanted!r}; got {seen!r}")

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def watch(pki: Pki) -> Iterator[Callable[[ChatServer, str], Watcher]]:
    watchers: list[Watcher] = []

    def open_watcher(server: ChatServer, name: str) -> Watcher:
        w = Watcher(pki, server, name)
        watchers.append(w)
        return w

    yield open_watcher
    for w in watchers:
        w.close()


# -- a valid client certificate ----------------------------------------------------------------


def test_certificate_names_the_user_and_nick_changes_are_refused(
        pki: Pki, serve: Callable[..., ChatServer], watch: Callable[[ChatServer, str], Watcher],
        env: dict[str, str]) -> None:
    server = serve()
    watcher = watch(server, "watcher")
    port = server.address[1]
    # No --nick: the certificate's name is used, without asking.
    result = run(argv(port, "--ca", pki.minted.ca_cert, *cert_args(pki, "alice")), env,
                 stdin="hello\n/nick mallory\nstill me\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "* welcome, alice! 2 online: alice, watcher. /help lists commands"  # no nickname prompt
    assert "* nickname refused: your nickname is bound to your certificate (alice)" in out
    assert "Traceback" not in result.stderr
    watcher.expect("* alice joined")
    watcher.expect("[alice] hello")
    watcher.expect("[alice] still me")


def test_nick_option_cannot_spoof_another_user(
        pki: Pki, serve: Callable[..., ChatServer], watch: Callable[[ChatServer, str], Watcher],
        env: dict[str, str]) -> None:
    server = serve()
    watcher = watch(server, "watcher")
    result = run(argv(server.address[1], "--ca", pki.minted.ca_cert, "--nick", "watcher2",
                      *cert_args(pki, "alice")), env, stdin="I am watcher2, honest\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("* welcome, alice! (your certificate names you alice) 2 online")
    watcher.expect("[alice] I am watcher2, honest")


def test_the_same_certificate_twice_is_refused_with_a_reason(
        pki: Pki, serve: Callable[..., ChatServer], watch: Callable[[ChatServer, str], Watcher],
        env: dict[str, str]) -> None:
    server = serve()
    watch(server, "alice")  # alice is online with her certificate
    result = run(argv(server.address[1], "--ca", pki.minted.ca_cert, *cert_args(pki, "alice")), env,
                 stdin="hi\n")
    assert_failed(result, "nickname refused: 'alice' is already connected",
                  "this certificate is already in use in another session")
    assert len(result.stderr.splitlines()) == 1


def test_library_refusal_of_a_bound_nick_is_final(pki: Pki, serve: Callable[..., ChatServer],
                                                  watch: Callable[[ChatServer, str], Watcher]) -> None:
    server = serve()
    watch(server, "alice")
    ctx = tls.client_context(pki.minted.ca_cert)
    pem, key = pki.client("alice")
    ctx.load_cert_chain(str(pem), str(key))
    with ChatClient() as client:
        client.connect(LOOPBACK, server.address[1], ssl_context=ctx, timeout=5)
        with pytest.raises(BoundNickUnusable, match="already in use"):
            client.register("alice", timeout=5)


# -- refused client certificates ---------------------------------------------------------------


def _refused_case(pki: Pki, case: str) -> list[str | Path]:
    if case == "no certificate":
        return []
    if case == "another CA":
        return list(map(str, pki.client_files("mallory", trustme.CA().issue_cert(common_name="mallory"))))
    if case == "expired":
        leaf = pki.client_ca.issue_cert(common_name="old", not_before=NOW - datetime.timedelta(days=30),
                                        not_after=NOW - datetime.timedelta(days=1))
        return list(map(str, pki.client_files("old", leaf)))
    raise AssertionError(case)


REFUSALS = {
    "no certificate": "the server requires a client certificate: pass --cert and --key (mint one with "
                      "securechat gen-certs --client NAME on the server)",
    "another CA": "the server does not accept this client certificate (signed by another CA?)",
    "expired": "your client certificate has expired: ask for a new one",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_client_certificate_explained(case: str, pki: Pki, serve: Callable[..., ChatServer],
                                              env: dict[str, str]) -> None:
    server = serve()
    files = _refused_case(pki, case)
    extra: list[str | Path] = ["--cert", files[0], "--key", files[1]] if files else []
    result = run(argv(server.address[1], "--ca", pki.minted.ca_cert, "--nick", "someone", *extra), env,
                 stdin="hi\n")
    assert_failed(result, f"127.0.0.1:{server.address[1]} refused the connection: {REFUSALS[case]}")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("case", ["another CA", "expired"])
def test_refused_client_certificate_over_tls12(case: str, pki: Pki, serve: Callable[..., ChatServer],
                                               env: dict[str, str]) -> None:
    # TLS 1.2: the alert ends the handshake itself instead of arriving on the first read.
    server = serve(pki.server_context(tls_max=ssl.TLSVersion.TLSv1_2))
    pem, key = _refused_case(pki, case)
    result = run(argv(server.address[1], "--ca", pki.minted.ca_cert, "--tls-min", "1.2", "--cert", pem,
                      "--key", key), env)
    assert_failed(result, REFUSALS[case])


def test_no_certificate_over_tls12(pki: Pki, serve: Callable[..., ChatServer], env: dict[str, str]) -> None:
    server = serve(pki.server_context(tls_max=ssl.TLSVersion.TLSv1_2))
    result = run(argv(server.address[1], "--ca", pki.minted.ca_cert, "--tls-min", "1.2", "--nick", "x"), env)
    assert_failed(result, "SSLV3_ALERT_HANDSHAKE_FAILURE",
                  "may require a client certificate (pass --cert and --key)")


def test_library_raises_certificate_refused(pki: Pki, serve: Callable[..., ChatServer]) -> None:
    server = serve()
    with ChatClient() as client:
        client.connect(LOOPBACK, server.address[1], ssl_context=tls.client_context(pki.minted.ca_cert),
                       timeout=5)
        with pytest.raises(CertificateRefused, match="requires a client certificate"):
            client.wait_greeting(5)


@pytest.mark.parametrize(("problem", "message"), [
    ("missing cert", "cannot read the client certificate"),
    ("missing key", "cannot read the client key"),
    ("cert is a key", "is not a PEM certificate"),
    ("key is a cert", "is not a PEM private key"),
    ("key of another cert", "does not belong to the certificate"),
])
def test_unusable_certificate_files(problem: str, message: str, pki: Pki, env: dict[str, str],
                                    tmp_path: Path) -> None:
    pem, key = pki.client("alice")
    other_pem, other_key = pki.client("bob")
    files = {
        "missing cert": (tmp_path / "nope.pem", key),
        "missing key": (pem, tmp_path / "nope.key"),
        "cert is a key": (key, key),
        "key is a cert": (pem, pem),
        "key of another cert": (pem, other_key),
    }[problem]
    # Nothing listens on the port: the files are checked before connecting.
    result = run(argv(1, "--ca", pki.minted.ca_cert, "--cert", files[0], "--key", files[1]), env)
    assert_failed(result, message)
    assert len(result.stderr.splitlines()) == 1


def test_key_defaults_to_the_file_next_to_the_certificate(
        pki: Pki, serve: Callable[..., ChatServer], env: dict[str, str]) -> None:
    server = serve()
    pem, _ = pki.client("carol")
    result = run(argv(server.address[1], "--ca", pki.minted.ca_cert, "--cert", pem), env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("* welcome, carol!")


# -- --pin -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["server", "CA"])
def test_pin_without_a_ca_file(which: str, pki: Pki, serve: Callable[..., ChatServer],
                               watch: Callable[[ChatServer, str], Watcher], env: dict[str, str],
                               tmp_path: Path) -> None:
    server = serve()
    watcher = watch(server, "watcher")
    pin = pki.minted.server_fingerprint if which == "server" else pki.minted.ca_fingerprint
    # cwd without certs/ca.pem: the default CA file is not needed, and not complained about.
    pin = pin.replace(":", "").lower()  # any common spelling
    result = run(argv(server.address[1], "--pin", pin, *cert_args(pki, "alice")), env, stdin="pinned\n",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("* welcome, alice!")
    watcher.expect("[alice] pinned")


class RecordingServer:
    """A TLS server that greets like securechat and records every byte each client connection sends."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.handlers: list[threading.Thread] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            handler = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            handler.start()
            self.handlers.append(handler)

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as sock:
                sock.sendall(b"* securechat: send your nickname\n")
                while chunk := sock.recv(4096):
                    data += chunk
        except (OSError, ssl.SSLError):
            pass
        self.received.append(data)

    def close(self) -> bytes:
        """Everything every connection sent, once they have ended."""
        self.stopping.set()
        self.thread.join(5)
        for handler in self.handlers:
            handler.join(10)
        self.listener.close()
        return b"".join(self.received)


def test_pin_mismatch_is_refused_before_anything_is_sent(pki: Pki, env: dict[str, str],
                                                         tmp_path: Path) -> None:
    recorder = RecordingServer(tls.server_context(pki.minted.server_cert, pki.minted.server_key))
    wrong = "AB:" * 31 + "CD"
    result = run(argv(recorder.port, "--pin", wrong, "--nick", "alice"), env, stdin="secret\n", cwd=tmp_path)
    assert_failed(result, f"refusing 127.0.0.1:{recorder.port}", "matches the pinned fingerprint",
                  f"expected {wrong}", f"presented server certificate {pki.minted.server_fingerprint}, "
                  f"CA certificate {pki.minted.ca_fingerprint}")
    assert len(result.stderr.splitlines()) == 1
    assert recorder.close() == b""  # not the nick, not a line

    # The control: with the right pin the recorder does get the nick (then never welcomes it).
    recorder = RecordingServer(tls.server_context(pki.minted.server_cert, pki.minted.server_key))
    result = run(argv(recorder.port, "--pin", pki.minted.server_fingerprint, "--nick", "alice",
                      "--timeout", "1"), env, stdin="secret\n", cwd=tmp_path)
    assert_failed(result, "no answer from the server")
    assert recorder.close() == b"alice\n"


def test_library_pin_trust(pki: Pki, serve: Callable[..., ChatServer]) -> None:
    server = serve()
    with pytest.raises(IdentityRefused, match="expected"):
        ChatClient().connect(LOOPBACK, server.address[1], trust=identity.PinTrust("00" * 32), timeout=5)
    with pytest.raises(ValueError):
        identity.PinTrust("AB:CD")


@pytest.mark.parametrize("pin", ["AB:CD", "zz" * 32, ""])
def test_malformed_pin_is_a_usage_error(pin: str, env: dict[str, str]) -> None:
    result = run(argv(1, "--pin", pin), env)
    assert_failed(result, "argument --pin:", "fingerprint", code=2)


@pytest.mark.parametrize("options", [["--pin", "AB" * 32, "--tofu"], ["--ca", "ca.pem", "--tofu"],
                                     ["--ca", "ca.pem", "--pin", "AB" * 32]])
def test_ca_pin_and_tofu_are_mutually_exclusive(options: list[str], env: dict[str, str]) -> None:
    assert_failed(run(argv(1, *options), env), "not allowed with argument", code=2)


def test_plain_with_identity_options_is_a_usage_error(env: dict[str, str]) -> None:
    assert_failed(run(argv(1, "--plain", "--tofu"), env), "--plain cannot be combined", code=2)


# -- --tofu ------------------------------------------------------------------------------------


def test_tofu_first_contact_match_and_change(pki: Pki, serve: Callable[..., ChatServer], env: dict[str, str],
                                             tmp_path: Path) -> None:
    server = serve()
    port = server.address[1]
    known_hosts = Path(env["XDG_CONFIG_HOME"]) / "securechat" / "known_hosts"
    tofu = argv(port, "--tofu", *cert_args(pki, "alice"))

    first = run(tofu, env, stdin="hi\n", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # server.pem carries the chain, so the CA is what is remembered (renewals are not changes).
    fp = pki.minted.ca_fingerprint
    assert first.stderr == (f"securechat connect: first contact with 127.0.0.1:{port}; remembering the fingerprint of "
                            f"its CA certificate, {fp} (stored in {known_hosts}). Check that it is the one on "
                            "the server's '[SERVER] CA SHA-256 fingerprint' line: if not, delete that line from "
                            "the file and do not chat\n")
    assert known_hosts.read_text() == f"127.0.0.1:{port} {fp}\n"
    assert first.stdout.startswith("* welcome, alice!")

    again = run(tofu, env, stdin="hi\n", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    assert again.stdout.startswith("* welcome, alice!")

    # The same address and port, now answered by a server with another CA's certificate.
    server.shutdown(timeout=1.0)
    impostor = trustme.CA().issue_cert("localhost", "127.0.0.1")
    ctx = tls.server_context(pki.minted.server_cert, pki.minted.server_key)  # replaced just below
    impostor.configure_cert(ctx)
    serve(ctx, port=port)
    changed = run(tofu, env, stdin="hi\n", cwd=tmp_path)
    assert_failed(changed, f"WARNING: the certificate of 127.0.0.1:{port} has CHANGED", f"it was {fp}",
                  f"delete the line for 127.0.0.1:{port} from {known_hosts}")
    assert len(changed.stderr.splitlines()) == 1
    assert known_hosts.read_text() == f"127.0.0.1:{port} {fp}\n"  # still the original


def test_library_tofu_trust(pki: Pki, serve: Callable[..., ChatServer], tmp_path: Path) -> None:
    # The library with an explicit KnownHosts file; the first-contact callback is told where.
    server = serve()
    told: list[tuple[str, str, Path, str]] = []
    known = identity.KnownHosts(tmp_path / "kh")
    pem, key = pki.client("dave")
    trust = identity.TofuTrust(LOOPBACK, server.address[1], known, lambda *a: told.append(a),
                               prepare=lambda ctx: ctx.load_cert_chain(str(pem), str(key)))
    with ChatClient() as client:
        client.connect(LOOPBACK, server.address[1], trust=trust, timeout=5)
        assert client.register("dave", timeout=5) == "dave"
    assert told == [(f"127.0.0.1:{server.address[1]}", pki.minted.ca_fingerprint, tmp_path / "kh",
                     "CA certificate")]
