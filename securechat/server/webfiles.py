"""Files for browsers, on the HTTPS route: uploads on a WebSocket of their own, downloads as plain GETs.

- **Upload**: the page opens a WebSocket at :data:`FILES_PATH` whose binary messages carry
  ``securechat-file/1``'s frames, the very protocol of the terminal client's file connection: the same
  :class:`~securechat.server.filehandler.FileHandler` runs it (ticket, resume, size and SHA-256 checks,
  disk work on the workers), through :class:`WebSocketTransport`, which frames what it writes as binary
  messages. So a browser's upload never waits behind, or delays, the chat's socket.
- **Download**: ``GET /files/ID?t=TICKET`` with a ticket the page asked for on its chat (``/ticket get``,
  single use). The bytes are streamed from a worker under the connection's high-water mark, never held
  whole. What a browser may do with them is decided here, not by the file's name or its sender:

  * a PNG, JPEG, GIF or WebP (recognised by its first bytes, the only images browsers decode without
    running anything) is served ``inline`` with its image type, for the page's thumbnails;
  * anything else, SVG included (an SVG is a document that can carry script), is served as
    ``application/octet-stream`` with ``Content-Disposition: attachment``: saved, never rendered;
  * every answer carries ``X-Content-Type-Options: nosniff`` and a ``sandbox`` CSP of its own, so even a
    file opened in a tab cannot run anything in the chat's origin, and the connection closes after it
    (a file's connection never becomes a chat's: it gives up its place among the unauthenticated).
"""

from __future__ import annotations

import base64
import logging
import re
from typing import Any
from urllib.parse import parse_qs, quote

from securechat.server import filehandler
from securechat.server.filehandler import FileHandler, open_at
from securechat.server.files import FileService
from securechat.store.files import READ_SIZE, FileRecord
from securechat.wire import filexfer, web
from securechat.wire.filexfer import TransferError

log = logging.getLogger("securechat.files")

# The upload socket, and the downloads' path.
FILES_PATH = "/files"
_DOWNLOAD_RE = re.compile(rf"{FILES_PATH}/([{filexfer.ID_ALPHABET}]{{{filexfer.ID_LENGTH}}})\Z")

# The image formats a browser shows inline, by their first bytes (the name and the sender say nothing).
_IMAGES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
           (b"GIF89a", "image/gif"))
SNIFF_BYTES = 12  # enough for the longest signature, and WebP's RIFF....WEBP

# A file's answer: nothing in it may run, whatever a browser makes of it.
FILE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"


def image_type(head: bytes) -> str | None:
    """The image type of a file that starts with ``head``, for the few shown inline; None otherwise."""
    for magic, kind in _IMAGES:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def disposition(kind: str, name: str) -> str:
    """``inline`` or ``attachment``, with the name in both forms (RFC 6266: a plain one, and UTF-8)."""
    plain = re.sub(r"[^A-Za-z0-9._ ()-]", "_", name) or "file"
    return f"{kind}; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


class WebSocketTransport:
    """The engine's transport as a :class:`FileHandler` needs it, on a WebSocket: each write leaves as
    one binary message, and a close ends with a close frame. Everything else is the connection's own."""

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def write(self, data: bytes) -> bool:
        return bool(self.transport.write(web.frame_binary(data)))

    def close(self, last: bytes = b"", reason: str = "closed") -> None:
        frames = web.frame_binary(last) if last else b""
        self.transport.close(frames + web.frame_close(web.NORMAL_CLOSURE), reason)

    def __getattr__(self, name: str) -> Any:  # offload, call_later, pause_reading, outbox_size, admission...
        return getattr(self.transport, name)


class Upload:
    """A browser's upload socket: binary messages in, a :class:`FileHandler` on the other side."""

    __slots__ = ("handler",)

    def __init__(self, service: FileService, transport: Any) -> None:
        self.handler = FileHandler(service)
        self.handler.connection_made(WebSocketTransport(transport))

    def binary(self, data: bytes) -> None:
        self.handler.data_received(data)

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, reason: str) -> None:
        self.handler.connection_lost(reason)


class Download:
    """One ``GET /files/ID?t=TICKET``: the record's bytes, streamed from a worker; then the connection closes."""

    __slots__ = ("service", "transport", "codec", "record", "host", "head", "source", "sent", "reading", "over",
                 "timer")

    def __init__(self, service: FileService, transport: Any, codec: web.ServerCodec, record: FileRecord, host: str,
                 head: bool) -> None:
        self.service = service
        self.transport = transport
        self.codec = codec
        self.record = record
        self.host = host
        self.head = head  # HEAD: the answer's head only
        self.source: Any = None
        self.sent = 0
        self.reading = True
        self.over = False
        self.timer: Any = None

    def start(self) -> None:
        self.transport.offload(_open_sniffed, self.service.store, self.record, done=self._opened)
        self.timer = self.transport.call_later(filehandler.IDLE_SECONDS, self._idle, 0)

    def _idle(self, sent: int) -> None:
        """Every IDLE_SECONDS (the file connections' own): a download whose reader took nothing meanwhile
        is cut, giving up its place among the transfers (MAX_TRANSFERS) and its open file. A browser that
        stopped reading would otherwise hold both for as long as its TCP connection lives."""
        self.timer = None
        if self.over:
            return
        seconds = filehandler.IDLE_SECONDS
        if self.sent == sent and not self.reading:
            log.info("file %s: the download stalled for %g s", self.record.id, seconds)
            self.transport.abort("the download stalled")
            return
        self.timer = self.transport.call_later(seconds, self._idle, self.sent)

    def _opened(self, result: tuple[Any, bytes] | None, error: BaseException | None) -> None:
        self.reading = False
        if result is None or error is not None:
            why = str(error) if isinstance(error, TransferError) else "the file cannot be read on the server"
            self.over = True
            _refuse(self.transport, self.codec, 503, why, self.host)
            return
        self.source, head = result
        if self.over:
            self._close_source()
            return
        record = self.record
        kind = image_type(head)
        headers = (("Content-Disposition", disposition("inline" if kind else "attachment", record.name)),
                   ("Content-Security-Policy", FILE_CSP), ("Cache-Control", "private, no-store"),
                   ("Repr-Digest", f"sha-256=:{base64.b64encode(bytes.fromhex(record.sha256)).decode()}:"))
        self.transport.write(self.codec.begin(200, record.size, content_type=kind or "application/octet-stream",
                                              headers=headers, host=self.host, close=True))
        if self.head:
            self.sent = record.size
        self.pump()

    def pump(self) -> None:
        """Read the next piece while the outbox is under its high-water mark (else resume_writing calls)."""
        transport = self.transport
        if self.reading or self.over:
            return
        if self.sent >= self.record.size:
            self.over = True
            self._close_source()
            transport.close(self.codec.end(), reason="file sent")
            return
        if transport.outbox_size >= transport.high_water:
            return
        self.reading = True
        room = max(filexfer.CHUNK, transport.high_water - transport.outbox_size)
        transport.offload(self.source.read, min(READ_SIZE, room, self.record.size - self.sent), done=self._read)

    def _read(self, data: bytes | None, error: BaseException | None) -> None:
        self.reading = False
        if self.over:
            self._close_source()
            return
        if error is not None or not data:  # the head is out: all that is left is to cut the body short
            log.warning("file %s: reading it failed half-way: %s", self.record.id, error or "a short file")
            self.connection_lost("read failed")
            self.transport.abort("the file could not be read")
            return
        self.sent += len(data)
        self.transport.write(self.codec.body(data))
        self.pump()

    def resume_writing(self) -> None:
        self.pump()

    def binary(self, data: bytes) -> None:
        pass  # an HTTP connection: nothing comes as a WebSocket message

    def connection_lost(self, reason: str) -> None:
        """The connection is gone (or the answer given up): let go of the file and of the transfer's place."""
        if self.service is not None:
            self.service.leave()
            self.service = None  # type: ignore[assignment]
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.reading:
            self._close_source()

    def _close_source(self) -> None:
        source, self.source = self.source, None
        if source is not None:
            source.close()


def handle(service: FileService, transport: Any, codec: web.ServerCodec, req: web.Request,
           host: str) -> Upload | Download | None:
    """A request under :data:`FILES_PATH` (:func:`wanted`): the upload socket or a download, or an answer
    given at once (None)."""
    if req.path == FILES_PATH:
        if not req.websocket or not web.same_origin(req.headers.get("origin"), host):
            _refuse(transport, codec, 403, "the files' socket opens only from the chat's own page", host)
            return None
        codec.binary = True
        transport.write(codec.accept(req))
        return Upload(service, transport)
    match = _DOWNLOAD_RE.match(req.path)
    if req.method not in ("GET", "HEAD"):
        _refuse(transport, codec, 405, "only GET here", host)
        return None
    tokens = parse_qs(req.query).get("t", [])
    token = tokens[0] if len(tokens) == 1 and filexfer.TICKET_RE.match(tokens[0]) else ""
    ticket = service.claim(token, "get") if token and match else None
    if ticket is None or ticket.record is None or match is None or ticket.record.id != match.group(1):
        _refuse(transport, codec, 404, "no such file, or its ticket was used up: ask for another", host)
        return None
    if not service.enter():
        _refuse(transport, codec, 503, "the server is moving as many files as it takes at once: try again", host)
        return None
    admission = getattr(transport, "admission", None)
    if admission is not None:  # the ticket proves who asked; this connection closes after the file
        admission.ticket.release()
    download = Download(service, transport, codec, ticket.record, host, req.method == "HEAD")
    download.start()
    return download


def wanted(path: str) -> bool:
    """Whether a request's path is the files' (the upload socket, or a download)."""
    return path == FILES_PATH or path.startswith(FILES_PATH + "/")


def _refuse(transport: Any, codec: web.ServerCodec, status: int, why: str, host: str) -> None:
    transport.close(codec.respond(status, f"{status}: {why}\n".encode(), host=host, close=True), reason=why)


def _open_sniffed(store: Any, record: FileRecord) -> tuple[Any, bytes]:
    """The file open at its start, and its first bytes (to tell an image from anything else)."""
    source = open_at(store, record, 0)
    head = source.read(SNIFF_BYTES)
    source.seek(0)
    return source, head
