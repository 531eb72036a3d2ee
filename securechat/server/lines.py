"""The line protocol's handlers: chat over newline-terminated lines, and the one-line refusals.

:class:`LineHandler` is the route for TLS without ALPN (``ncat --ssl``, ``openssl s_client``, socat,
the securechat client) and for every connection of a ``--plain`` server: a sans-IO
:class:`~securechat.wire.protocol.LineBuffer` cuts what the transport reads into lines, which go to a
:class:`~securechat.server.session.Session`. The transport itself is the session's connection: a
line is sent as it is encoded.

A handler for another framing (a WebSocket text message per line) reuses the same Session over a
:class:`FramedConn`, which frames each line the session sends its own way, and feeds the session
one line per message: ``session.on_lines([message])``. See :class:`LineHandler` for the rest
(certificate check, ``server.add_session``, ``session.start()``, ``session.connection_lost``).

:class:`Notice` says one line and closes: the route for plaintext on the TLS port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from securechat.server.session import Session, certificate_nick
from securechat.server.transport import Handler, Transport
from securechat.wire import protocol
from securechat.wire.protocol import MAX_LINE_BYTES, LineBuffer, LineTooLong

log = logging.getLogger("securechat.server")


class LineHost(Protocol):
    """What the line handlers need from the server (the engine's ChatServer)."""

    trust: Any  # securechat.server.trust.Trust, or None

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
        trust = self.server.trust
        if trust is None:
            self._start(None)
            return
        transport.pause_reading()  # nothing is read until the certificate is checked (the ledger: SQLite, Redis)
        transport.offload(trust.admit, transport.peer_certificate(True), done=self._admitted)

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


class FramedConn:
    """A chat session's connection over a transport that frames each line its own way.

    ``frame(line)`` turns one line (without its newline) into what goes on the wire (a WebSocket
    text frame). Everything a session or the rooms send is one or more newline-terminated lines;
    each is framed, then written by the transport, with its thread rules: :meth:`send`,
    :meth:`close`, :meth:`abort` from any thread, :meth:`write` on the loop thread only.
    """

    __slots__ = ("transport", "frame", "loop")

    def __init__(self, transport: Transport, frame: Callable[[bytes], bytes]) -> None:
        self.transport = transport
        self.frame = frame
        self.loop = transport.loop

    def _framed(self, data: bytes) -> bytes:
        frame = self.frame
        return b"".join(frame(line) for line in data.split(b"\n")[:-1])

    @property
    def closing(self) -> bool:
        return self.transport.closing

    def send(self, data: bytes) -> bool:
        return self.transport.send(self._framed(data))

    def write(self, data: bytes) -> bool:
        return self.transport.write(self._framed(data))

    def close(self, last: bytes = b"", reason: str = "closed") -> None:
        self.transport.close(self._framed(last), reason)

    def abort(self, reason: str) -> None:
        self.transport.abort(reason)

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Any:
        return self.transport.call_later(delay, fn, *args)

    def offload(self, fn: Callable[..., Any], *args: Any,
                done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        self.transport.offload(fn, *args, done=done)

    def when_written(self, fn: Callable[..., object], *args: Any) -> None:
        self.transport.when_written(fn, *args)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def hold_output(self) -> None:
        self.transport.hold_output()

    def release_output(self) -> None:
        self.transport.release_output()
