"""What the file-sharing tests share: a server with files on, clients that get tickets, a raw file connection."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from securechat.client.chat import ChatClient
from securechat.server.engine import ChatServer
from securechat.server.filehandler import install
from securechat.server.files import FileService
from securechat.store.files import FileStore
from securechat.wire import filexfer, tls
from securechat.wire.filexfer import Control, Data

LOOPBACK = "127.0.0.1"


@pytest.fixture
def file_server(serve: Callable[..., ChatServer], tmp_path: Path,
                cert_files: dict[str, Path]) -> Callable[..., ChatServer]:
    """``file_server(**store_options)``: a TLS ChatServer on loopback sharing files under tmp_path."""

    def start(**store: Any) -> ChatServer:
        # A context of its own: the server adds its ALPN names to it, which a shared one must not get.
        server = serve(context=tls.server_context(cert_files["cert"], cert_files["key"]))
        root = tmp_path / "data" / "files" / str(server.address[1])
        files = FileService(FileStore(root, **store), server.rooms)
        install(server, files)
        files.start()
        return server

    return start


@pytest.fixture
def chat(cert_files: dict[str, Path]) -> Iterator[Callable[..., ChatClient]]:
    """``chat(server, nick)``: a registered ChatClient able to move files (closed afterwards)."""
    clients: list[ChatClient] = []

    def make(server: ChatServer, nick: str) -> ChatClient:
        def factory() -> ssl.SSLContext:
            return tls.client_context(cert_files["ca"])

        client = ChatClient(reconnect=False)
        client.connect(LOOPBACK, server.address[1], ssl_context=factory(), context_factory=factory,
                       server_hostname="localhost")
        clients.append(client)
        client.register(nick)
        return client

    yield make
    for client in clients:
        client.close()


def ticket(client: ChatClient, request: Callable[[str], str]) -> str:
    """A ticket for ``request(tag)`` (raises TransferError with the server's refusal)."""
    return client.tickets.ask(client.send, request)


def wait_line(client: ChatClient, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
    """The first line the client receives that matches (others are skipped)."""
    seen = []
    while (line := client.recv_line(timeout)) is not None:
        if predicate(line):
            return line
        seen.append(line)
    raise AssertionError(f"no matching line; saw {seen}")


def heard(client: ChatClient, quiet: float = 0.3) -> list[str]:
    """Every line the client received until ``quiet`` seconds pass without one."""
    lines = []
    while (line := client.recv_line(quiet)) is not None:
        lines.append(line)
    return lines


class RawFile:
    """A file connection spoken by hand, to lie, stall and cut as a hostile client would."""

    def __init__(self, server: ChatServer, ca: Path, alpn: str = filexfer.ALPN) -> None:
        ctx = tls.client_context(ca)  # a context of its own: the ALPN offer is per context
        ctx.set_alpn_protocols([alpn])
        raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.decoder = filexfer.Decoder()
        self.events: list[filexfer.Event] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def data(self, payload: bytes, chunk: int = filexfer.CHUNK) -> None:
        for i in range(0, len(payload), chunk):
            piece = payload[i:i + chunk]
            self.sock.sendall(filexfer.data_header(len(piece)) + piece)

    def event(self, timeout: float = 10.0) -> filexfer.Event | None:
        """The next event, or None at the end of the stream."""
        while not self.events:
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not data:
                return None
            self.events = self.decoder.feed(data)
        return self.events.pop(0)

    def control(self, timeout: float = 10.0) -> dict[str, Any]:
        event = self.event(timeout)
        assert isinstance(event, Control), event
        return event.msg

    def until_end(self, timeout: float = 10.0) -> tuple[bytes, list[dict[str, Any]]]:
        """Everything until the server closes: (the file bytes, the control messages)."""
        data, controls = [], []
        while (event := self.event(timeout)) is not None:
            if isinstance(event, Data):
                data.append(event.data)
            else:
                controls.append(event.msg)
        return b"".join(data), controls

    def close(self) -> None:
        self.sock.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def partials(server: ChatServer) -> list[str]:
    """The partial files an upload left on the server's disk."""
    assert server.files is not None
    return sorted(os.listdir(server.files.store.partial))


def blobs(server: ChatServer) -> list[str]:
    assert server.files is not None
    return sorted(server.files.store.blobs_held())
