"""HTTP/1.1 and WebSocket for one server-side connection, sans I/O: what the browser front door speaks.

A browser reaches the chat port in two ways, and both are parsed here, from bytes to events and back,
without a socket (the server's handler, :mod:`securechat.server.web`, moves the bytes):

- **HTTPS** (TLS with ALPN ``http/1.1``): ``GET`` of the page's few static files, and the WebSocket
  upgrade at :data:`WS_PATH`. After the upgrade every text message is chat lines, exactly what a line
  client sends: one line per message (a newline inside a message ends a line there too), and each line
  the server says goes out as one text message.
- **Plain HTTP** on the same port (the onboarding page, before the browser trusts the CA).

HTTP parsing is h11's and WebSocket framing wsproto's (both maintained, sans-IO, used together by
hypercorn); this module adds the bounds and the policy: one request head of at most
:data:`MAX_REQUEST_HEAD` bytes, no request bodies, at most :data:`MAX_REQUESTS` requests per
connection, the upgrade only for a well-formed RFC 6455 request whose ``Origin`` is the page's own
origin (:func:`same_origin`), no extensions (permessage-deflate would let a few bytes inflate into
megabytes), and the response headers every answer carries (:func:`security_headers`: a strict CSP
with no inline script, ``frame-ancestors 'none'``, ``nosniff``, no referrer; no cookie is ever set).
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import h11
import wsproto.connection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import generate_accept_token

# Where the page opens its WebSocket.
WS_PATH = "/ws"

# A browser's request head is well under 2 KiB (cookies would make it bigger; this origin sets none).
# 8 KiB is what nginx's large_client_header_buffers allows a line to be, and bounds what one
# connection makes the server hold before the blank line.
MAX_REQUEST_HEAD = 8 * 1024

# Requests on one keep-alive connection: a page load is four or five; nginx's keepalive_requests
# is 1000. A connection that asks more is closed (the browser opens another).
MAX_REQUESTS = 100

# From the first byte of a request to its blank line, and from one response to the next request on
# a kept-alive connection: a browser on a LAN needs milliseconds; a slowloris needs minutes.
REQUEST_SECONDS = 10.0
IDLE_SECONDS = 15.0

# Close codes (RFC 6455 7.4.1) the server uses.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009

# A Host header as a browser sends it: a DNS name, an IPv4 address or a bracketed IPv6 address, and an
# optional port. Anything else (spaces, quotes, a path) is refused before it can reach a header or a page.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}(?:%25[A-Za-z0-9]+)?\])"
                      r"(?::[0-9]{1,5})?\Z")
_TOKEN_SPLIT = re.compile(r"\s*,\s*")


def valid_host(host: str) -> bool:
    """Whether ``host`` (a Host header's value) is a plain ``name[:port]`` or ``[v6][:port]``."""
    return bool(_HOST_RE.match(host))


def same_origin(origin: str | None, host: str, scheme: str = "https") -> bool:
    """Whether a WebSocket upgrade's ``Origin`` is the origin of the page served at ``host`` over ``scheme``.

    Browsers always send ``Origin`` on a WebSocket upgrade; a page on another origin (another site, or
    the same server by another name) cannot forge it, so only our own page can open the chat. A request
    without one is not from a browser page and is refused too: the WebSocket route is for the page; line
    clients have the line protocol. Host names compare case-insensitively, as origins do.
    """
    if not origin or not valid_host(host):
        return False
    return origin.lower() == f"{scheme}://{host}".lower()


def content_security_policy(host: str | None) -> str:
    """The page's CSP: its own files only, no inline script or style, no framing, no plugins, no forms.

    ``connect-src`` names ``wss://HOST`` besides ``'self'``: browsers that predate CSP level 3 (Safari
    before 15.4) do not count the page's own ``wss:`` origin as ``'self'``. ``host`` must have passed
    :func:`valid_host`.
    """
    connect = "'self'" + (f" wss://{host}" if host else "")
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"connect-src {connect}; object-src 'none'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def security_headers(host: str | None) -> list[tuple[str, str]]:
    """The headers every response carries (the page's, the onboarding page's, errors' alike).

    No ``Strict-Transport-Security``: the onboarding page is plain HTTP on this very port, and a browser
    that had seen HSTS for the server's name could never reach it again to get the CA.
    """
    return [
        ("Content-Security-Policy", content_security_policy(host)),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
    ]


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A complete HTTP request (head only: bodies are refused). Header names are lower case."""

    method: str
    path: str  # percent-decoded, without the query
    query: str
    headers: dict[str, str]
    websocket: bool  # a well-formed RFC 6455 upgrade request (its path and Origin not checked yet)

    @property
    def host(self) -> str | None:
        """The Host header, if it is a plain ``name[:port]`` (:func:`valid_host`), else None."""
        host = self.headers.get("host", "")
        return host if valid_host(host) else None


@dataclass(frozen=True)
class Reject:
    """The request cannot be served (malformed, too big, a body): answer ``status`` and close."""

    status: int
    reason: str


@dataclass(frozen=True)
class Text:
    """Part of a WebSocket text message; ``finished`` on its last part."""

    text: str
    finished: bool


@dataclass(frozen=True)
class Closed:
    """The peer is gone or closed the WebSocket (``code`` 1006 when it just vanished)."""

    code: int
    reason: str = ""


Event = Request | Reject | Text | Closed

HTTP, WEBSOCKET, CLOSED = "http", "websocket", "closed"

_REASONS = {200: b"OK", 101: b"Switching Protocols", 304: b"Not Modified", 400: b"Bad Request",
            403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
            413: b"Content Too Large", 426: b"Upgrade Required", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


class ServerCodec:
    """One server-side connection's HTTP/1.1, then (after :meth:`accept`) its WebSocket.

    Feed it what the socket read with :meth:`receive_data` (``b""`` at EOF), take :meth:`events`, and
    write what its methods return, then whatever :meth:`data_to_send` holds (its own answers: pongs,
    the close handshake). A :class:`Request` must be answered (:meth:`respond` or :meth:`accept`)
    before the next request is parsed; ``must_close`` says to close once the answer is written.
    """

    __slots__ = ("_http", "_ws", "_request", "_answering", "_out", "max_requests", "requests", "state", "must_close")

    def __init__(self, *, max_head: int = MAX_REQUEST_HEAD, max_requests: int = MAX_REQUESTS) -> None:
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self._ws: wsproto.connection.Connection | None = None
        self._request: Request | None = None  # parsed, its end not seen yet
        self._answering: Request | None = None  # a request given out, not answered yet
        self._out = bytearray()
        self.max_requests = max_requests
        self.requests = 0  # answered so far
        self.state = HTTP
        self.must_close = False

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` when it closed its side."""
        if self.state == HTTP:
            self._http.receive_data(data)
        elif self.state == WEBSOCKET:
            assert self._ws is not None
            if self._ws.state is not wsproto.connection.ConnectionState.CLOSED:
                self._ws.receive_data(data or None)

    def events(self) -> Iterator[Event]:
        """What the bytes received so far say; stops at a request until it is answered."""
        if self.state == HTTP:
            yield from self._http_events()
        if self.state == WEBSOCKET:
            yield from self._ws_events()

    def _http_events(self) -> Iterator[Event]:
        while self.state == HTTP and self._answering is None:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                self.state, self.must_close = CLOSED, True
                status = exc.error_status_hint
                if "exceeded" in str(exc) or "too long" in str(exc):
                    status = 431
                yield Reject(status, str(exc) or "malformed request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                self.state = CLOSED
                yield Closed(1006)
                return
            if isinstance(event, h11.Request):
                request = _request(event)
                if "content-length" in request.headers and request.headers["content-length"].strip() != "0" \
                        or "transfer-encoding" in request.headers:
                    # Answered at once, body unread, and closed: nothing here takes an upload.
                    self.must_close = True
                    self._answering = request
                    yield Reject(413, "request bodies are not accepted here")
                    return
                self._request = request
            elif isinstance(event, h11.EndOfMessage) and self._request is not None:
                self._answering, self._request = self._request, None
                yield self._answering  # parsing goes on once it is answered (the loop's condition)

    def _ws_events(self) -> Iterator[Event]:
        ws = self._ws
        assert ws is not None
        for event in ws.events():
            if isinstance(event, TextMessage):
                yield Text(event.data, event.message_finished)
            elif isinstance(event, Ping):
                self._out += ws.send(event.response())
            elif isinstance(event, BytesMessage):
                yield from self._fail(UNSUPPORTED_DATA, "text messages only: one chat line each")
                return
            elif isinstance(event, CloseConnection):
                if ws.state is wsproto.connection.ConnectionState.REMOTE_CLOSING:
                    self._out += ws.send(event.response())
                    self.state = CLOSED
                    yield Closed(event.code, event.reason or "")
                elif ws.state is wsproto.connection.ConnectionState.OPEN:  # a frame wsproto refused
                    yield from self._fail(event.code, event.reason or "protocol error")
                else:
                    self.state = CLOSED
                    yield Closed(event.code, event.reason or "")
                return

    def _fail(self, code: int, reason: str) -> Iterator[Event]:
        self._out += self.close(code, reason)
        self.state = CLOSED
        yield Closed(code, reason)

    # -- output ---------------------------------------------------------------------------

    def respond(self, status: int, body: bytes = b"", *, content_type: str = "text/plain; charset=utf-8",
                headers: Sequence[tuple[str, str]] = (), host: str | None = None, close: bool = False) -> bytes:
        """The answer to the request given out (its head only for ``HEAD``), with :func:`security_headers`.

        ``host`` is the request's validated Host (for the CSP's ``connect-src``). Closes after it when
        asked, after a refused request, or past :data:`MAX_REQUESTS`.
        """
        request = self._answering
        self._answering = None
        self.requests += 1
        close = close or self.must_close or self.requests >= self.max_requests or self.state != HTTP
        all_headers = [*security_headers(host), *headers]
        if status != 304:
            all_headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if close:
            all_headers.append(("Connection", "close"))
        head_only = status == 304 or (request is not None and request.method == "HEAD")
        try:
            out = self._http.send(h11.Response(status_code=status, headers=all_headers,
                                               reason=_REASONS.get(status, b"")))
            if body and not head_only:
                out += self._http.send(h11.Data(data=body)) or b""
            out += self._http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # the request was unusable (h11 gave up on it): a bare answer
            out = _bare_response(status, body, all_headers, head_only)
            close = True
        if close:
            self.must_close = True
            self.state = CLOSED
        elif self._http.our_state is h11.DONE and self._http.their_state is h11.DONE:
            self._http.start_next_cycle()
        else:  # h11 cannot go on with this connection (e.g. a half-read request): close after this
            self.must_close = True
            self.state = CLOSED
        return out or b""

    def accept(self, request: Request, protocol: str | None = None) -> bytes:
        """The ``101 Switching Protocols`` for a :class:`Request` with ``websocket``; WebSocket from here on."""
        assert request is self._answering and request.websocket
        self._answering = None
        self.requests += 1
        accept = generate_accept_token(request.headers["sec-websocket-key"].encode("ascii"))
        headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", accept)]
        if protocol:
            headers.append((b"Sec-WebSocket-Protocol", protocol.encode("ascii")))
        out = self._http.send(h11.InformationalResponse(status_code=101, headers=headers,
                                                        reason=_REASONS[101])) or b""
        trailing, _closed = self._http.trailing_data
        self._ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER,
                                                 trailing_data=bytes(trailing))
        self.state = WEBSOCKET
        self._http = None  # type: ignore[assignment]  # HTTP is over for good: a chat holds nothing of it
        return out

    def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> bytes:
        """The WebSocket close frame (empty if the close handshake is already under way)."""
        ws = self._ws
        if ws is None or ws.state not in (wsproto.connection.ConnectionState.OPEN,
                                          wsproto.connection.ConnectionState.REMOTE_CLOSING):
            return b""
        # A close frame's reason is at most 123 bytes (RFC 6455 5.5): cut on a character boundary.
        data = reason.encode("utf-8")[:123].decode("utf-8", "ignore")
        return bytes(ws.send(CloseConnection(code=code, reason=data)))

    def data_to_send(self) -> bytes:
        """The codec's own answers (pongs, the close handshake) since the last call."""
        out, self._out = bytes(self._out), bytearray()
        return out


def _request(event: h11.Request) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers and key != "host" else text
    target = event.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    return Request(event.method.decode("ascii", "replace").upper(), unquote(path), query, headers,
                   _is_websocket(event.method, headers))


def _tokens(value: str) -> set[str]:
    return {t.lower() for t in _TOKEN_SPLIT.split(value.strip()) if t}


def _is_websocket(method: bytes, headers: dict[str, str]) -> bool:
    """An RFC 6455 4.2.1 opening handshake: GET, Upgrade: websocket, Connection: upgrade, version 13,
    and a key that is 16 bytes in base64."""
    if method != b"GET" or "websocket" not in _tokens(headers.get("upgrade", "")):
        return False
    if "upgrade" not in _tokens(headers.get("connection", "")) or headers.get("sec-websocket-version") != "13":
        return False
    try:
        return len(base64.b64decode(headers.get("sec-websocket-key", ""), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _bare_response(status: int, body: bytes, headers: list[tuple[str, str]], head_only: bool) -> bytes:
    """A response written without h11, for a request h11 itself could not parse (then it closes)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, b'').decode()}".rstrip()]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


# -- lines as messages ---------------------------------------------------------------------------

_local = threading.local()


def _framer() -> FrameProtocol:
    """This thread's frame writer (a server's frames are unmasked, so one serves every connection;
    it holds the opcode of a message in progress between calls, so never two threads at once)."""
    framer = getattr(_local, "framer", None)
    if framer is None:
        framer = _local.framer = FrameProtocol(False, [])
    return framer


def frame_lines(data: bytes) -> bytes:
    """Encoded chat lines (``b"[bob] hi\\n"``, one or several) as WebSocket text messages, one a line.

    A room line goes to every member with the very same ``bytes``: the last one framed is remembered
    (per thread), so a fan-out to a thousand browsers frames it once.
    """
    if getattr(_local, "last_in", None) is data:
        return _local.last_out
    framer = _framer()
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    out = b"".join(bytes(framer.send_data(line.decode("utf-8", "replace"), True)) for line in lines)
    _local.last_in, _local.last_out = data, out
    return out


def frame_text_line(line: bytes) -> bytes:
    """One encoded line (without its newline) as one text message."""
    return frame_text(line.decode("utf-8", "replace"))


def frame_text(text: str) -> bytes:
    """One WebSocket text message."""
    return bytes(_framer().send_data(text, True))


def frame_close(code: int = NORMAL_CLOSURE, reason: str = "") -> bytes:
    """A close frame, made without any connection's state (so from any thread, in order with lines)."""
    return bytes(_framer().close(code, reason or None))


def close_code_for(reason: str) -> int:
    """The close code that goes with a server-side reason for ending a chat connection."""
    if reason.startswith("line too long"):
        return MESSAGE_TOO_BIG
    if reason in ("server shutting down",):
        return GOING_AWAY
    if reason.startswith(("disconnected for flooding", "certificate revoked", "no nickname")):
        return POLICY_VIOLATION
    return NORMAL_CLOSURE


__all__ = ["WS_PATH", "Closed", "Event", "Reject", "Request", "ServerCodec", "Text", "frame_lines",
           "frame_close", "frame_text", "same_origin", "security_headers", "valid_host"]
