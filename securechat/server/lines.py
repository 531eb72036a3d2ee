"""The line protocol's handlers: chat over newline-terminated lines, and the one-line refusals.

:class:`LineHandler` is the route for TLS without ALPN (``ncat --ssl``, ``openssl s_client``, socat,
the securechat client) and for every connection of a ``--plain`` server: a sans-IO
:class:`~securechat.wire.protocol.LineBuffer` cuts what the transport reads into lines, which go to a
:class:`~securechat.server.session.Session`. The transport itself is the session's connection: a
line is sent as it is encoded. A handler for another framing (a WebSocket text message per line)
does the same with a connection that frames what it sends.

:class:`Notice` says one line and closes: the route for plaintext on the TLS port.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from securechat.server.session import Session, certificate_nick
from securechat.server.transport import Handler, Transport
from securechat.wire import protocol
from securechat.wire.protocol import MAX_LINE_BYTES, LineBuffer, LineTooLong

log = logging.getLogger("securechat.server")


class LineHost(Protocol):
    """What the line handlers need from the server (the engine's ChatServer)."""

    authority: Any

    @property
    def stopping(self) -> bool: ...

    def early_refusal(self, peer: tuple[Any, ...]) -> str | None: ...

    def refuse(self, transport: Transport, text: str) -> None: ...

    def add_session(self, session: Session) -> None: ...


class LineHandler(Handler):
    """A chat client speaking lines: its certificate checked, then a :class:`Session` fed line batches."""

    __slots__ = ("server", "transport", "buffer", "session")

    def __init__(self, server: LineHost) -> None:
        self.server = server
        self.transport: Transport | None = None
        self.buffer = LineBuffer(MAX_LINE_BYTES)
        self.session: Session | None = None

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        refusal = self.server.early_refusal(transport.peer)  # early word; take_place decides at the nickname
        if refusal:
            self.server.refuse(transport, refusal)
            return
        authority = self.server.authority
        if authority is None:
            self._start(None)
            return
        transport.pause_reading()  # nothing is read until the certificate is checked (in the store)
        transport.offload(authority.admit_der, transport.peer_certificate(True), done=self._admitted)

    def _admitted(self, result: tuple[str | None, int | None] | None, error: BaseException | None) -> None:
        transport = self.transport
        assert transport is not None
        if error is not None:
            log.error("checking the certificate of %s failed", transport.peer, exc_info=error)
            transport.abort("internal error")
            return
        assert result is not None
        refusal, serial = result
        if transport.closing:  # evicted (or the peer left) meanwhile
            return
        if refusal is not None:
            log.warning("refused %s: %s", transport.peer, refusal)
            transport.close(protocol.notice(refusal), reason=refusal)
            return
        self._start(serial)
        transport.resume_reading()

    def _start(self, serial: int | None) -> None:
        transport = self.transport
        assert transport is not None
        session = self.session = Session(self.server, transport, transport.peer,  # type: ignore[arg-type]
                                         bound_nick=certificate_nick(transport.peer_certificate()))
        session.admission = transport.admission
        session.cert_serial = serial
        self.server.add_session(session)
        session.start()
        if self.server.stopping:
            transport.close(protocol.notice(protocol.SHUTDOWN), reason=protocol.SHUTDOWN)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        try:
            lines = self.buffer.feed(data)
        except LineTooLong:
            session.line_too_long()
            return
        if lines:
            session.on_lines(lines)

    def connection_lost(self, reason: str) -> None:
        if self.session is not None:
            self.session.connection_lost(reason)


class Notice(Handler):
    """Say one line (a refusal) and close; what the peer says meanwhile is ignored."""

    __slots__ = ("server", "text")

    def __init__(self, server: LineHost, text: str) -> None:
        self.server = server
        self.text = text

    def connection_made(self, transport: Transport) -> None:
        self.server.refuse(transport, self.text)
