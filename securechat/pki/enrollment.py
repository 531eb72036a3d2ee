"""The enrollment exchange both ends speak: joining with an invite code, and renewing a client certificate.

Enrollment shares the chat port. The joiner offers the ALPN protocol :data:`ALPN` in its TLS
ClientHello and the server selects it; a chat client (ours, ``openssl s_client``, ``ncat``) offers
no ALPN, or another one, and chats exactly as before. Nothing is ever guessed from the bytes.

The join, over that TLS connection (the joiner does not know the CA yet, so it does not verify the
certificate; the exchange below does, with the code)::

    joiner -> server   JOIN <nameplate> <SPAKE2 message A>
    server -> joiner   PAKE <SPAKE2 message B>                 (or ERR <why>: expired, used, ...)
    joiner -> server   CONFIRM <fingerprint it saw> <MAC_c> <CSR>
    server -> joiner   OK <name|-> <certificate|-> <CA certificate> <MAC_s>     (or ERR <why>)

Both sides derive the key K from SPAKE2 and the code. ``MAC_c = HMAC(K, "client", F, H(CSR))`` where
F is the SHA-256 of the server certificate *as the joiner saw it*; the server checks it against the
certificate it presents itself. A relay that terminates TLS with its own certificate gets a joiner's
MAC over the wrong F, which it cannot fix without K, and K needs the code: the server refuses
(logging it), issues nothing, and counts a wrong try. ``MAC_s`` covers F, the CSR and everything the
server sends, so the joiner only stores a CA the code holder vouched for. A recording of the whole
exchange gives no way to test guesses offline (that is what a PAKE is for); each online guess costs
one of the invite's tries, counted *before* the answer is computed, so concurrent guesses cannot
exceed the bound.

Renewal is the same ALPN on a connection that presents the current client certificate (verified by
TLS against the CA): ``RENEW <CSR>`` -> ``OK <certificate> <CA certificate>``. A revoked certificate
is refused.

The private key is made on the joiner's machine and never travels; only the CSR does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ssl
import time
from typing import cast

ALPN = "securechat-enroll/1"

# SPAKE2 identities: both sides must use the same ones, and they tie K to this protocol.
ID_JOINER = b"securechat join (joiner)"
ID_SERVER = b"securechat join (server)"

# A line of the exchange: a certificate chain in base64 is ~2 KiB, a CSR ~0.6 KiB (RSA-3072 ~1.5).
MAX_WIRE_LINE = 16 * 1024
# The whole exchange, from the handshake on: a few round trips and one signature on the server.
EXCHANGE_DEADLINE = 20.0


INTERCEPTED = ("someone between you and the server is intercepting the connection (the certificate you "
               "were shown is not the server's)")


class JoinError(Exception):
    """A join or renewal failed; ``str()`` is one line saying why and what to do."""


class RenewalRefused(JoinError):
    """The server refused to renew (revoked, unknown certificate): retrying will not help."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not base64") from None


def mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts, so no two different inputs read the same."""
    h = hmac.new(key, label, hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


class Wire:
    """Newline-terminated ASCII lines over a blocking socket, under one deadline, bounded in length."""

    def __init__(self, sock: ssl.SSLSocket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self._buf = b""

    def _time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the exchange took too long")
        return left

    def send(self, line: str) -> None:
        self.sock.settimeout(self._time_left())
        self.sock.sendall(line.encode("ascii") + b"\n")

    def read(self) -> str:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_WIRE_LINE:
                raise ValueError("line too long")
            self.sock.settimeout(self._time_left())
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if len(line) > MAX_WIRE_LINE:
            raise ValueError("line too long")
        return line.decode("ascii", "replace").rstrip("\r")


def leaf_fingerprint(ctx: ssl.SSLContext) -> bytes:
    """SHA-256 of the certificate this server context presents (set by :meth:`Authority.configure`)."""
    return cast(bytes, ctx.securechat_leaf)  # type: ignore[attr-defined]
