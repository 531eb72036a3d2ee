"""Shared fixtures: throwaway certificates (trustme), servers on 127.0.0.1 port 0, line clients."""

from __future__ import annotations

import atexit
import compileall
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from securechat.server.engine import ChatServer
from securechat.wire import dnssd, tls
from tests.filehelp import chat, file_server  # noqa: F401  (fixtures: file sharing)
from tests.redis_server import redis_sentinel, redis_server  # noqa: F401  (fixtures: a real redis-server on loopback)

LOOPBACK = "127.0.0.1"

# `securechat serve` keeps history in $XDG_DATA_HOME/securechat by default: in tests, never the real one.
_DATA_HOME = tempfile.mkdtemp(prefix="securechat-test-data-")
os.environ["XDG_DATA_HOME"] = _DATA_HOME
atexit.register(shutil.rmtree, _DATA_HOME, ignore_errors=True)

# The suite starts hundreds of `securechat` processes. An installed package has its bytecode compiled at
# install time; a checkout under PYTHONDONTWRITEBYTECODE=1 (set on the project's machines) would compile
# every module from source in every one of them (~80 ms each). Compiled once here; __pycache__ is ignored.
compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "securechat"), quiet=1)

# No test announces or searches on this machine's real network: every `securechat serve` and client this
# suite starts inherits this switch (securechat.wire.dnssd.ENV_SWITCH). Only the tests in network
# namespaces of their own (tests/test_lan_discovery.py) turn discovery back on, inside those namespaces.
os.environ[dnssd.ENV_SWITCH] = "off"

Handshake = Callable[[ssl.SSLContext, ssl.SSLContext, str], None]


def _loopback_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> None:
    """Complete a real TLS handshake over 127.0.0.1 and exchange one byte.

    Raises whatever the client side raises (ssl.SSLCertVerificationError when it refuses the server,
    ssl.SSLError when the server refuses its client certificate).
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"!")
                        tls.recv(1)  # wait for the client's byte, so it sees a refused client cert
                except (ssl.SSLError, OSError):
                    pass  # the client's side of the story is what the tests check

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                # TLS 1.3: a refused client certificate only shows up on the first read
                assert tls.recv(1) == b"!"
                tls.sendall(b"!")
        finally:
            thread.join(5)


@pytest.fixture(scope="session")
def certs_handshake() -> Handshake:
    """``certs_handshake(server_ctx, client_ctx, server_hostname)``: real TLS handshake on 127.0.0.1."""
    return _loopback_handshake



@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="session")
def cert_files(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA,
               server_cert: trustme.LeafCert) -> dict[str, Path]:
    """ca.pem, server.pem (chain) and server.key on disk, as the CLI wants them."""
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server_cert.private_key_pem.write_to_path(str(d / "server.key"))
    (d / "server.key").chmod(0o600)  # securechat refuses keys others can read (securechat.pki.certdir)
    for i, blob in enumerate(server_cert.cert_chain_pems):
        blob.write_to_path(str(d / "server.pem"), append=i > 0)
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key", "dir": d}


@pytest.fixture(scope="session")
def server_ctx(cert_files: dict[str, Path]) -> ssl.SSLContext:
    return tls.server_context(cert_files["cert"], cert_files["key"])


@pytest.fixture(scope="session")
def client_ctx(cert_files: dict[str, Path]) -> ssl.SSLContext:
    return tls.client_context(cert_files["ca"])


class LineClient:
    """A minimal blocking line client for tests; used from one thread only."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = b""

    def send(self, text: str | bytes) -> None:
        data = text if isinstance(text, bytes) else (text + "\n").encode()
        self.sock.sendall(data)

    def readline(self, timeout: float | None = None) -> str:
        """The next line (without newline); raises TimeoutError, or EOFError at end of stream."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self._buf.decode(errors="replace"))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def expect(self, predicate: Callable[[str], bool] | str, timeout: float = 10.0) -> str:
        """Read lines until one matches (a prefix string or a predicate); return it."""
        match = (lambda line: line.startswith(predicate)) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line within {timeout}s; saw {seen!r}")
            line = self.readline(left)
            if match(line):
                return line
            seen.append(line)

    def lines_until_quiet(self, quiet: float = 0.3) -> list[str]:
        """Every line that arrives until ``quiet`` seconds pass without one."""
        out = []
        try:
            while True:
                out.append(self.readline(quiet))
        except (TimeoutError, EOFError):
            return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve(server_ctx: ssl.SSLContext) -> Iterator[Callable[..., ChatServer]]:
    """Start a ChatServer on 127.0.0.1 port 0; shut down afterwards.

    TLS with the trustme certificate, unless ``tls=False`` (plain) or another ``context`` is given.
    """
    servers: list[ChatServer] = []

    def start(tls: bool = True, context: ssl.SSLContext | None = None, **options: object) -> ChatServer:
        ctx = context if context is not None else server_ctx if tls else None
        server = ChatServer(LOOPBACK, 0, ctx, **options)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def connect(client_ctx: ssl.SSLContext) -> Iterator[Callable[..., LineClient]]:
    """Open line clients to a server (TLS unless the server is plain); closed afterwards."""
    clients: list[LineClient] = []

    def open_client(server: ChatServer, nick: str | None = None, *, tls: bool | None = None,
                    timeout: float = 10.0) -> LineClient:
        port = server.address[1]
        raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
        use_tls = server.ssl_context is not None if tls is None else tls
        sock = client_ctx.wrap_socket(raw, server_hostname="localhost") if use_tls else raw
        client = LineClient(sock, timeout)
        clients.append(client)
        if nick is not None:
            client.expect("* securechat: send your nickname")
            client.send(nick)
            client.expect(f"* welcome, {nick}!")
        return client

    yield open_client
    for client in clients:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Proc:
    """A ``securechat serve --redis`` process."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port

    def wait_ready(self, timeout: float = 20) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("[SERVER] Waiting for connections"):
                return
        err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
        raise AssertionError(f"server not ready: {seen!r} {err!r}")


@pytest.fixture
def serve_proc(tmp_path: Path, cert_files: dict[str, Path]) -> Iterator[Callable[..., Proc]]:
    """``serve_proc(*args)``: a real ``securechat serve`` process on a free loopback port (SIGTERM afterwards)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, ready: bool = True) -> Proc:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "securechat", "serve", "--host", LOOPBACK, "--port", str(port),
             "--cert", str(cert_files["cert"]), "--key", str(cert_files["key"]), "--no-renew", *args],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(proc)
        served = Proc(proc, port)
        if ready:
            served.wait_ready()
        return served

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=10)


def issue_client(ca_dir: Path, name: str, out: Path, *, days_ago: float = 25, days: int = 30) -> tuple[Path, Path]:
    """A client certificate for ``name`` from the CA in ``ca_dir``, entered in its ledger as issued
    ``days_ago`` days ago for ``days`` days (the default is inside its renewal window: the last third).

    Written to ``out``/NAME-SERIAL.pem and .key (0600); returns (certificate, key) paths.
    """
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from securechat.pki import builders, certs, ledger

    now = dt.datetime.now(dt.timezone.utc)
    ca_cert, ca_key = certs._load_ca(ca_dir, now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = builders.build_client(key, ca_cert, ca_key, name, days, now - dt.timedelta(days=days_ago))
    ledger.Store(ca_dir).record(cert, name, days, None)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{cert.serial_number:X}"
    cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path
