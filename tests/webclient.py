"""A blocking WebSocket chat client for tests: real TLS (ALPN ``http/1.1``, as browsers offer), wsproto framing.

``WebClient.open(port, ca)`` upgrades at ``/ws`` with the page's own ``Origin`` (or the one given) and
reads lines as :class:`tests.conftest.LineClient` does; ``http_get`` fetches one page, raw.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from tests.conftest import LOOPBACK


def tls_context(ca: Path | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Refused(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"{status} {body!r}")
        self.status = status
        self.body = body


class WebClient:
    def __init__(self, sock: socket.socket, conn: WSConnection) -> None:
        self.sock = sock
        self.conn = conn
        self.lines: list[str] = []
        self.closed: ws.CloseConnection | None = None
        self._partial = ""

    @classmethod
    def open(cls, port: int, ca: Path | str, *, origin: str | None = "", host: str = "localhost",
             timeout: float = 10.0) -> WebClient:
        raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
        sock = tls_context(ca).wrap_socket(raw, server_hostname=host)
        assert sock.selected_alpn_protocol() == "http/1.1"
        conn = WSConnection(ConnectionType.CLIENT)
        where = f"{host}:{port}"
        headers = [] if origin is None else [(b"origin", (origin or f"https://{where}").encode())]
        sock.sendall(conn.send(ws.Request(host=where, target="/ws", extra_headers=headers)))
        client = cls(sock, conn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            conn.receive_data(data or None)
            for event in conn.events():
                if isinstance(event, ws.AcceptConnection):
                    client._events()  # frames that came in the same read as the 101
                    return client
                if isinstance(event, ws.RejectConnection):
                    body = b""
                    if event.has_body:
                        for more in conn.events():
                            if isinstance(more, ws.RejectData):
                                body += more.data
                    sock.close()
                    raise Refused(event.status_code, body)
            if not data:
                break
        sock.close()
        raise ConnectionError("no answer to the upgrade")

    def send(self, text: str) -> None:
        self.sock.sendall(self.conn.send(ws.Message(data=text)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _pump(self, timeout: float) -> bool:
        """Read once (up to ``timeout``); False when the connection is over."""
        self.sock.settimeout(max(0.01, timeout))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.conn.receive_data(None)
        else:
            self.conn.receive_data(data)
        return self._events() and bool(data)

    def _events(self) -> bool:
        """Take what wsproto has parsed; False once the WebSocket is closed."""
        for event in self.conn.events():
            if isinstance(event, ws.TextMessage):
                self._partial += event.data
                if event.message_finished:
                    self.lines.append(self._partial)
                    self._partial = ""
            elif isinstance(event, ws.CloseConnection):
                self.closed = event
                return False
            elif isinstance(event, ws.Ping):
                self.sock.sendall(self.conn.send(event.response()))
        return True

    def recv_line(self, timeout: float = 5.0) -> str | None:
        deadline = time.monotonic() + timeout
        while not self.lines:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pump(left):
                break
        return self.lines.pop(0) if self.lines else None

    def expect(self, prefix: str, timeout: float = 5.0) -> str:
        """Read until a line starting with ``prefix``; the lines skipped stay readable in ``seen``."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.recv_line(deadline - time.monotonic())
            if line is None:
                break
            seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r}; got {seen!r}, closed: {self.closed}")

    def wait_closed(self, timeout: float = 5.0) -> ws.CloseConnection | None:
        deadline = time.monotonic() + timeout
        while self.closed is None and time.monotonic() < deadline:
            if not self._pump(deadline - time.monotonic()):
                break
        return self.closed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def http_get(port: int, path: str = "/", *, ca: Path | str | None = None, host: str = "localhost",
             headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One GET, over TLS (``ca`` given) or plain HTTP; (status, lower-case headers, body)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock: socket.socket = tls_context(ca).wrap_socket(raw, server_hostname=host) if ca is not None else raw
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}Connection: close\r\n\r\n".encode())
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, OSError):
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return status, parsed, body
