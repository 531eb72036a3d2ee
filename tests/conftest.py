"""Shared test fixtures. Keep fixture names specific: several features add theirs here."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

import pytest

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
