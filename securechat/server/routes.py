"""The protocol table: which handler a connection gets, by its TLS handshake's ALPN (or its first bytes).

One port serves every protocol. The table maps a key to a handler factory (a callable returning a
fresh :class:`~securechat.server.transport.Handler`):

- an ALPN protocol name (``"securechat-enroll/1"``; later ``"http/1.1"``, ``"securechat-file/1"``): the
  server offers every such name in its handshakes, and the one the client picked decides;
- :data:`NO_ALPN` (``None``): TLS without ALPN, or with only names the server does not know (ncat,
  ``openssl s_client``, socat, the securechat client): the line protocol. Every connection of a
  ``--plain`` server also takes this route;
- :data:`PLAINTEXT`: bytes on the TLS port that are not a TLS ClientHello (today: a one-line notice that
  the server requires TLS);
- :data:`PLAINTEXT_HTTP`: such bytes that start like an HTTP request (``GET /``...). Only when this key is
  in the table does the engine wait for the few bytes it needs to tell (at most
  :data:`HTTP_SNIFF_BYTES`, within the handshake deadline); otherwise the first byte decides.

Nothing inside TLS is sniffed: after the handshake only the ALPN decides. The two plaintext keys
are never offered as ALPN names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NO_ALPN: None = None
PLAINTEXT = "plaintext"
PLAINTEXT_HTTP = "plaintext/http"

# Returns a fresh securechat.server.transport.Handler (not imported: the transport imports this table).
HandlerFactory = Callable[[], Any]
Key = str | None

# Request methods (RFC 9110 and PATCH), each followed by a space: what an HTTP request starts with.
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")

# The longest method and its space: enough bytes to tell an HTTP request from anything else.
HTTP_SNIFF_BYTES = max(map(len, HTTP_METHODS))

_PSEUDO = frozenset({PLAINTEXT, PLAINTEXT_HTTP})


def looks_like_http(first: bytes) -> bool | None:
    """True if ``first`` starts an HTTP request, False if it cannot, None if more bytes are needed."""
    for method in HTTP_METHODS:
        n = min(len(first), len(method))
        if first[:n] == method[:n]:
            if n == len(method):
                return True
            if len(first) < len(method):
                return None
    return False


class Routes:
    """Key (ALPN name, :data:`NO_ALPN`, :data:`PLAINTEXT`, :data:`PLAINTEXT_HTTP`) -> handler factory.

    Changes apply to connections whose route is decided afterwards; ALPN names added after the
    server's TLS context was first used are offered from the next context (a certificate renewal)
    on, so register them before the server starts.
    """

    def __init__(self) -> None:
        self._table: dict[Key, HandlerFactory] = {}

    def add(self, key: Key, factory: HandlerFactory) -> None:
        """Route ``key`` to ``factory`` (replacing any earlier one)."""
        if key is not None and (not key or len(key.encode()) > 255):
            raise ValueError(f"not an ALPN protocol name: {key!r}")
        self._table[key] = factory

    def get(self, key: Key) -> HandlerFactory | None:
        return self._table.get(key)

    def __contains__(self, key: Key) -> bool:
        return key in self._table

    def alpn(self) -> list[str]:
        """The ALPN names to offer, in the order they were added (the server's preference)."""
        return [key for key in self._table if key is not None and key not in _PSEUDO]

    def plaintext(self, first: bytes) -> Key | None:
        """The route for plaintext that starts with ``first``; None while more bytes are needed."""
        if PLAINTEXT_HTTP in self._table:
            http = looks_like_http(first)
            if http is None:
                return None
            if http:
                return PLAINTEXT_HTTP
        return PLAINTEXT
