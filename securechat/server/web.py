"""The browser front door's handlers: HTTPS with the chat page and its WebSocket, and the onboarding page.

Two routes of the engine's table (:mod:`securechat.server.routes`) lead here, both driven by the
connection's loop thread like every other handler, never a thread per browser:

- ALPN ``http/1.1`` (a browser's TLS handshake): :class:`WebHandler` serves the page's files and, at
  :data:`~securechat.wire.web.WS_PATH`, upgrades to a WebSocket whose text messages are chat lines. The
  chat itself is a :class:`~securechat.server.session.Session`, the very one line clients get, through
  :class:`WebSocketConn`, which frames each line the session or a room sends as one message. So a
  browser and ``ncat --ssl`` see each other's lines exactly as two line clients do, under the same flood
  control, line limit, login timeout and place among the unauthenticated (the connection's admission,
  released at the nickname as for a line client).
- plain HTTP on the TLS port: :class:`OnboardingHandler`, the page that hands out the CA certificate.

Parsing and framing are sans-IO in :mod:`securechat.wire.web`; the files in :mod:`securechat.server.pages`.

**Browser devices** (``invite NAME --web``, :mod:`securechat.pki.devices`): the WebSocket's first message
may be ``/device SECRET`` (a browser bound to a name) or ``/device SECRET TOKEN`` (binding it now, with
the one-time link's token). The check runs on a worker (it reads the CA's ledger); the session then
chats under the device's name exactly as under a client certificate (``bound_nick``), and the
revocation watcher ends it within 2 s of ``securechat revoke NAME``. Under ``--require-client-cert`` a
browser without a device is refused, as a line client without a certificate is.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any, Protocol

from securechat.pki import devices
from securechat.server.lines import FramedConn
from securechat.server.pages import AppFiles, Asset, Onboarding
from securechat.server.session import Host, Session
from securechat.server.transport import Handler, Transport
from securechat.wire import protocol, tls, web
from securechat.wire.protocol import MAX_LINE_BYTES, LineBuffer, LineTooLong
from securechat.wire.web import Closed, Reject, Request, ServerCodec, Text

log = logging.getLogger("securechat.server")

# The browsers' route: the ALPN protocol every browser offers for HTTPS.
ALPN = "http/1.1"

# The first message of a browser that holds a device credential (see the module docstring).
DEVICE_COMMAND = "/device"
DEVICE_OK = "device: "  # "* device: alice": the browser is alice's
DEVICE_REFUSED = "device refused: "

# Lines a browser may send while its device is being checked (a worker reads the ledger, in
# milliseconds): the nickname and a few more; beyond, reading waits (TCP holds the browser back).
HELD_LINES = 16


class WebHost(Host, Protocol):
    """What the web handlers need from the server (the engine's ChatServer): a session's host, and more."""

    authority: Any  # securechat.pki.authority.Authority (the CA's ledger, for devices), or None

    def early_refusal(self, peer: tuple[Any, ...]) -> str | None: ...

    def add_session(self, session: Session) -> None: ...


class _Http(Handler):
    """h11 over one transport: request deadlines, answers, closing; subclasses route the requests."""

    __slots__ = ("codec", "transport", "_timer")  # a thousand browsers: no __dict__ each

    def __init__(self) -> None:
        self.codec = ServerCodec()
        self.transport: Transport = None  # type: ignore[assignment]  # given in connection_made
        self._timer: Any = None

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        self._arm(web.REQUEST_SECONDS)

    def data_received(self, data: bytes) -> None:
        self.codec.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.codec.receive_data(b"")
        self._pump()
        return False

    def connection_lost(self, reason: str) -> None:
        self._disarm()

    def _pump(self) -> None:
        codec = self.codec
        for event in codec.events():
            if isinstance(event, Request):
                self._disarm()
                self.request(event)
            elif isinstance(event, Reject):
                self._disarm()
                log.info("%s: bad HTTP request (%s)", self.transport.peer, event.reason)
                self._answer(event.status, f"{event.status}: this is a securechat server\n".encode(), close=True)
            elif isinstance(event, Text):
                self.text(event)
            elif isinstance(event, Closed):
                self.closed(event)
            if self.transport.closing:
                return
        out = codec.data_to_send()
        if out:
            self.transport.write(out)

    def request(self, request: Request) -> None:
        raise NotImplementedError

    def text(self, event: Text) -> None:  # only after an upgrade
        pass

    def closed(self, event: Closed) -> None:
        out = self.codec.data_to_send()
        self.transport.close(out, reason="closed by peer")

    def _answer(self, status: int, body: bytes = b"", *, content_type: str = "text/plain; charset=utf-8",
                headers: tuple[tuple[str, str], ...] = (), host: str | None = None, close: bool = False) -> None:
        out = self.codec.respond(status, body, content_type=content_type, headers=headers, host=host, close=close)
        if self.codec.must_close:
            self.transport.close(out, reason="HTTP connection done")
        else:
            self.transport.write(out)
            self._arm(web.IDLE_SECONDS)

    def _serve(self, request: Request, asset: Asset | None, host: str) -> None:
        """A GET or HEAD of a file (404 when there is none, 304 when the browser has it)."""
        if request.method not in ("GET", "HEAD"):
            self._answer(405, b"405: only GET here\n", headers=(("Allow", "GET, HEAD"),), host=host)
        elif asset is None:
            self._answer(404, b"404: no such page\n", host=host)
        elif request.headers.get("if-none-match") == asset.etag:
            self._answer(304, headers=(("ETag", asset.etag), ("Cache-Control", "no-cache")), host=host)
        else:
            self._answer(200, asset.body, content_type=asset.content_type, host=host,
                         headers=(("ETag", asset.etag), ("Cache-Control", "no-cache"), *asset.headers))

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.transport.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.codec.state == web.HTTP:  # no (complete) request in time: a slow or idle connection
            self.transport.close(b"", reason="HTTP request timed out")


class WebHandler(_Http):
    """HTTPS for browsers (ALPN ``http/1.1``): the chat page, and the chat over a WebSocket at ``/ws``.

    ``mutual``: the server admits only people it knows (``--require-client-cert``): a browser must
    present a device (which needs the CA's ledger, the server's ``authority``).
    """

    __slots__ = ("server", "app", "mutual", "chat")

    def __init__(self, server: WebHost, app: AppFiles, mutual: bool = False) -> None:
        super().__init__()
        self.server = server
        self.app = app
        self.mutual = mutual
        self.chat: WebChat | None = None

    def request(self, request: Request) -> None:
        host = request.host
        if host is None:
            self._answer(400, b"400: a Host header of the form name[:port] is needed\n", close=True)
        elif request.path != web.WS_PATH:
            self._serve(request, self.app.get(request.path), host)
        elif not request.websocket:
            self._answer(426, b"426: this address is the chat's WebSocket\n", host=host,
                         headers=(("Upgrade", "websocket"), ("Connection", "Upgrade")))
        elif not web.same_origin(request.headers.get("origin"), host):
            log.warning("%s: refused a WebSocket from another origin (%r, for %s)", self.transport.peer,
                        request.headers.get("origin", "")[:100], host)
            self._answer(403, b"403: the chat opens only from its own page\n", host=host, close=True)
        else:
            self.transport.write(self.codec.accept(request))
            self.chat = WebChat(self.server, self.transport, self.mutual)
            self.chat.start()

    def text(self, event: Text) -> None:
        if self.chat is not None:
            self.chat.text(event)

    def connection_lost(self, reason: str) -> None:
        super().connection_lost(reason)
        if self.chat is not None:
            self.chat.connection_lost(reason)


class OnboardingHandler(_Http):
    """Plain HTTP on the chat port: the onboarding page and the CA's public certificate, nothing else."""

    __slots__ = ("onboarding",)

    def __init__(self, onboarding: Onboarding) -> None:
        super().__init__()
        self.onboarding = onboarding

    def request(self, request: Request) -> None:
        host = request.host
        if host is None:
            self._answer(400, b"400: a Host header of the form name[:port] is needed\n", close=True)
            return
        page = request.path in ("/", "/index.html")
        self._serve(request, self.onboarding.page(host) if page else self.onboarding.get(request.path), host)


class WebSocketConn(FramedConn):
    """A session's connection over a WebSocket: every line it is given leaves as one text message.

    The engine's :class:`~securechat.server.lines.FramedConn`, with two things of a WebSocket's own: a
    room line sent to many browsers is framed once (:func:`~securechat.wire.web.frame_lines` keeps the
    last one), and a close ends with a close frame whose code says why.
    """

    __slots__ = ()

    def __init__(self, transport: Transport) -> None:
        super().__init__(transport, web.frame_text_line)

    def _framed(self, data: bytes) -> bytes:
        return web.frame_lines(data)

    @property
    def peer(self) -> tuple[Any, ...]:
        return self.transport.peer

    def close(self, last: bytes = b"", reason: str = "closed") -> None:
        frames = web.frame_lines(last) if last else b""
        self.transport.close(frames + web.frame_close(web.close_code_for(reason)), reason)


class WebChat:
    """The chat over one WebSocket: text messages in, a :class:`Session` fed their lines (loop thread)."""

    __slots__ = ("server", "transport", "mutual", "conn", "buffer", "session", "_first", "_held", "_timer")

    def __init__(self, server: WebHost, transport: Transport, mutual: bool = False) -> None:
        self.server = server
        self.transport = transport
        self.mutual = mutual
        self.conn = WebSocketConn(transport)
        self.buffer = LineBuffer(MAX_LINE_BYTES)
        self.session: Session | None = None
        self._first = True  # the next line is the first: a device may be presented
        self._held: list[bytes] | None = None  # lines waiting for a device check
        self._timer: Any = None

    def start(self) -> None:
        refusal = self.server.early_refusal(self.transport.peer)
        if refusal:
            log.info("refused %s: %s", self.transport.peer, refusal)
            self.conn.close(protocol.notice(refusal), reason=refusal)
        elif self.mutual:  # nothing until the device: a browser without one is refused at its first line
            login = self.server.login_timeout
            if login > 0:
                self._timer = self.transport.call_later(login, self._no_login)
        else:
            self._start_session()

    def _start_session(self) -> None:
        session = self.session = Session(self.server, self.conn, self.transport.peer)
        session.admission = self.transport.admission
        self.server.add_session(session)
        session.start()
        if self.server.stopping:
            self.conn.close(protocol.notice(protocol.SHUTDOWN), reason=protocol.SHUTDOWN)

    def text(self, event: Text) -> None:
        try:
            lines = self.buffer.feed(event.text.encode("utf-8"))
            if event.finished:
                lines += self.buffer.feed(b"\n")
        except LineTooLong:
            if self.session is not None:
                self.session.line_too_long()
            else:
                self.conn.close(protocol.notice(f"{protocol.LINE_TOO_LONG}; goodbye"), reason=protocol.LINE_TOO_LONG)
            return
        if lines:
            self._lines(lines)

    def _lines(self, lines: list[bytes]) -> None:
        if self._held is not None:
            self._held.extend(lines)
            if len(self._held) >= HELD_LINES:
                self.transport.pause_reading()
            return
        if self._first:
            self._first = False
            first = lines[0].decode("utf-8", "replace")
            if first.split(" ", 1)[0] == DEVICE_COMMAND:
                self._held = lines[1:]
                self._device(first)
                return
            if self.session is None:
                self._refuse(f"{protocol.CERT_REQUIRED}: a browser joins this server through a one-time link "
                             "from 'securechat invite NAME --web'")
                return
        if self.session is not None:
            self.session.on_lines(lines)

    def _device(self, line: str) -> None:
        words = line.split()
        authority = self.server.authority
        if authority is None or len(words) not in (2, 3):
            self._refuse(DEVICE_REFUSED + ("this server has no browser devices" if authority is None
                                           else "usage: /device SECRET [TOKEN]"))
            return
        secret, token = words[1], words[2] if len(words) == 3 else None
        self.transport.pause_reading()
        self.conn.offload(_admit_device, authority, secret, token, done=self._device_checked)

    def _device_checked(self, result: devices.Device | str | None, error: BaseException | None) -> None:
        if error is not None:
            log.error("checking the browser device of %s failed", self.transport.peer, exc_info=error)
            self._refuse(DEVICE_REFUSED + "the server cannot check devices right now; try again later")
            return
        if isinstance(result, str) or result is None:
            log.warning("refused the browser device of %s: %s", self.transport.peer, result)
            self._refuse(DEVICE_REFUSED + (result or "unknown"))
            return
        if self.transport.closing:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.conn.send(protocol.notice(DEVICE_OK + result.name))
        if self.session is None:
            self._start_session()
        session = self.session
        assert session is not None
        session.bound_nick = session.person = result.name  # the name is the device's, as a certificate's
        session.cert_serial = result.serial  # watched for revocation like a certificate
        log.info("%s is %s's browser (device %X)", self.transport.peer, result.name, result.serial)
        held, self._held = self._held or [], None
        self.transport.resume_reading()
        if held:
            self._lines(held)

    def _refuse(self, text: str) -> None:
        log.warning("refused %s: %s", self.transport.peer, text)
        if self.session is not None:
            self.session.quitting = True
        self.conn.close(protocol.notice(text), reason=text)

    def _no_login(self) -> None:
        self._timer = None
        if self.session is None and not self.transport.closing:
            self.conn.close(protocol.notice(f"no nickname within {self.server.login_timeout:g} s; goodbye"),
                            reason="no nickname in time")

    def connection_lost(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None:
            self.session.connection_lost(reason)


def _admit_device(authority: Any, secret: str, token: str | None) -> devices.Device | str:
    """On a worker: the device for ``secret`` (binding it with ``token`` first), or why not."""
    try:
        device = devices.claim(authority.store, token, secret) if token else devices.check(authority.store, secret)
    except devices.DeviceError as exc:
        return str(exc)
    if token:  # the ledger's generation moved: every server's next read holds the name
        log.warning("browser device %X bound to %s", device.serial, device.name)
    return device


def spare_browsers(context: ssl.SSLContext, cert: str | Path, key: str | Path, *,
                   tls_min: str = tls.DEFAULT_TLS_MIN) -> ssl.SSLContext:
    """Give ``context`` the context its browsers' handshakes use instead: the same certificate, ALPN
    ``http/1.1``, and no client-certificate request (:mod:`securechat.wire.hello` says why). Returns
    ``context``; a renewal that builds a new one through this gets a new browsers' context with it."""
    browsers = tls.server_context(cert, key, tls_min=tls_min)
    browsers.set_alpn_protocols([ALPN])
    context.securechat_browsers = browsers  # type: ignore[attr-defined]
    return context


def install(server: Any, onboarding: Onboarding | None, *, mutual: bool = False) -> None:
    """Add the browser routes to ``server``'s table: HTTPS + WebSocket, and the onboarding page.

    ``mutual`` (``--require-client-cert``): browsers chat only with a device (``invite NAME --web``).
    """
    from securechat.server.routes import PLAINTEXT_HTTP

    app = AppFiles()
    server.routes.add(ALPN, lambda: WebHandler(server, app, mutual))
    if onboarding is not None:
        server.routes.add(PLAINTEXT_HTTP, lambda: OnboardingHandler(onboarding))
