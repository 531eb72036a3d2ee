"""One file connection (ALPN ``securechat-file/1``): its ticket, then an upload or a download.

A :class:`FileHandler` is a connection handler of the engine (the interface of
:class:`securechat.server.transport.Handler`): its transport calls it on the connection's own
thread and it never blocks. Disk work (writing a chunk, hashing it, storing and indexing a finished
file, reading one) goes to a worker with ``transport.offload``, and the result comes back on the
connection's thread. So the memory a transfer holds is bounded whatever the file's size:

- upload: received bytes gather into a batch of :data:`WRITE_BATCH`; one batch is written (and
  hashed) by a worker while the next one fills, and reading pauses while that one is full and the
  write is still pending;
- download: a chunk is read by a worker only while the connection's outbox is under its high-water
  mark; above it the handler waits for ``resume_writing``.

The frames and messages are :mod:`securechat.wire.filexfer`'s; tickets, access and announcements
are :class:`securechat.server.files.FileService`'s.
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO

from securechat.server.files import FileService, Ticket, Upload
from securechat.store.files import READ_SIZE, FileRecord, Partial
from securechat.wire import filexfer, protocol
from securechat.wire.filexfer import ACK_EVERY, CHUNK, Data, FrameError, TransferError

log = logging.getLogger("securechat.files")

# Bytes gathered before they are handed to a worker to be written: big enough that a worker round
# trip per batch costs nothing, small enough that two batches per upload is little memory.
WRITE_BATCH = 1 << 20

# From the handshake to the ticket: the client sends it first thing.
HELLO_SECONDS = 10.0

# A connection that stops moving bytes mid-transfer for this long is closed (a resume can follow).
IDLE_SECONDS = 60.0

# States.
HELLO, RECEIVING, FINISHING, SENDING, OVER = range(5)


class FileHandler:
    """The server's end of one file connection (see the module docstring)."""

    def __init__(self, service: FileService) -> None:
        self.service = service
        self.transport: Any = None
        self.decoder = filexfer.Decoder()
        self.state = HELLO
        self.ticket: Ticket | None = None
        self.upload: Upload | None = None
        self.received = 0  # upload: bytes of the file that arrived (from offset 0)
        self.acked = 0
        self.batch: list[bytes] = []
        self.batch_size = 0
        self.writing = False  # a batch is with a worker
        self.paused = False
        self.declared = ""  # the sender's SHA-256, once its end came
        self.source: BinaryIO | None = None  # download: the blob
        self.reading = False  # download: a read is with a worker
        self.sent = 0
        self.size = 0
        self.timer: Any = None
        self.moving = False  # counted among the server's transfers (FileService.enter)

    # -- the engine's calls --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.timer = transport.call_later(HELLO_SECONDS, self._timed_out, "no ticket in time")

    def data_received(self, data: bytes) -> None:
        if self.state == OVER:
            return
        try:
            events = self.decoder.feed(data)
        except FrameError as exc:
            self._fail(str(exc))
            return
        for event in events:
            if self.state == OVER:
                return
            if isinstance(event, Data):
                self._data(event.data)
            else:
                self._control(event.msg)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        pass  # the download loop looks at the outbox itself before each read

    def resume_writing(self) -> None:
        if self.state == SENDING:
            self._pump()

    def connection_lost(self, reason: str) -> None:
        previous, self.state = self.state, OVER
        self._cancel_timer()
        self._release_admission()
        if self.moving:
            self.moving = False
            self.service.leave()
        if self.source is not None and not self.reading:
            self._close_source()
        ticket, upload = self.ticket, self.upload
        if ticket is None or upload is None or upload.handler is not self:
            return
        if previous in (RECEIVING, FINISHING):
            log.info("upload of %s by %s dropped at %d of %d bytes: %s", ticket.name, ticket.sender,
                     self.received, ticket.size, reason)
            self.service.dropped(ticket)

    # -- messages ------------------------------------------------------------------------------

    def _control(self, msg: dict[str, Any]) -> None:
        if "error" in msg:
            self._fail(f"the client gave up: {protocol.sanitize(str(msg['error']))[:200]}", tell=False)
            return
        op = msg.get("op")
        try:
            if self.state == HELLO and op in ("put", "get"):
                if not self.service.enter():
                    if op == "get":  # one ticket, one connection: the client asks a new one to try again,
                        # so an unspent one would count against the person's tickets for a minute
                        self.service.claim(str(msg.get("ticket", "")), "get")
                    self._fail("busy: the server is moving as many files as it takes at once; try again")
                    return
                self.moving = True
                (self._begin_put if op == "put" else self._begin_get)(msg)
            elif self.state == RECEIVING and op == "end":
                self.declared = filexfer.field_str(msg, "sha256", filexfer.SHA256_RE)
                self.state = FINISHING
                self._flush()
            else:
                raise FrameError(f"unexpected message {str(op)[:20]!r} here")
        except FrameError as exc:
            self._fail(str(exc))

    def _authenticated(self) -> None:
        """The ticket is good: the connection leaves the pool of unauthenticated ones."""
        self._release_admission()
        self._cancel_timer()
        self.timer = self.transport.call_later(IDLE_SECONDS, self._idle, self.received + self.sent)

    def _release_admission(self) -> None:
        admission = getattr(self.transport, "admission", None)
        if admission is not None:
            admission.ticket.release()

    # -- upload --------------------------------------------------------------------------------

    def _begin_put(self, msg: dict[str, Any]) -> None:
        token = filexfer.field_str(msg, "ticket", filexfer.TICKET_RE)
        ticket = self.service.claim(token, "put")
        if ticket is None or ticket.upload is None:
            self._fail("the ticket is unknown or expired: ask for a new one")
            return
        upload = ticket.upload
        if upload.handler is not None or upload.busy:
            # The previous connection of this upload is still on its way out (or silently dead): end
            # it; the client tries again in a moment and resumes where the disk is.
            previous = upload.handler
            if previous is not None and previous is not self:
                previous.transport.abort("the upload was resumed on a new connection")
            self._fail("busy: the previous connection of this upload is still closing; try again")
            return
        self.ticket, self.upload = ticket, upload
        upload.handler = self
        self._authenticated()
        if upload.partial is None:
            self.transport.offload(self.service.store.begin, token, done=self._begun)
        else:
            self._begun(upload.partial, None)

    def _begun(self, partial: Partial | None, error: BaseException | None) -> None:
        if self.state == OVER:
            return
        assert self.ticket is not None and self.upload is not None
        if error is not None or partial is None:
            self._fail(_why(error), end=True)
            return
        self.upload.partial = partial
        self.received = self.acked = partial.offset
        self.state = RECEIVING
        self.transport.write(filexfer.control(ok="put", offset=partial.offset))

    def _data(self, data: bytes) -> None:
        if self.state != RECEIVING:
            self._fail("file bytes where none were expected")
            return
        assert self.ticket is not None
        self.received += len(data)
        if self.received > self.ticket.size:
            self._fail(f"more bytes than declared ({self.ticket.size}): the upload was dropped", end=True)
            return
        self.batch.append(data)
        self.batch_size += len(data)
        if self.batch_size >= WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Hand the batch to a worker, unless one is being written (then pause once this one is full)."""
        if self.writing:
            if self.batch_size >= WRITE_BATCH and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        if self.batch_size:
            data = self.batch[0] if len(self.batch) == 1 else b"".join(self.batch)
            self.batch, self.batch_size = [], 0
            assert self.upload is not None and self.upload.partial is not None
            self.writing = True
            self.upload.busy += 1
            self.transport.offload(self.upload.partial.write, data, done=self._written)
        elif self.state == FINISHING:
            self._finish()

    def _written(self, offset: int | None, error: BaseException | None) -> None:
        upload, ticket = self.upload, self.ticket
        assert upload is not None and ticket is not None
        self.writing = False
        upload.busy -= 1
        if error is not None:
            if upload.handler is self:
                self._fail(_why(error), end=True)
            return
        if self.state == OVER:
            if upload.over and upload.partial is not None and not upload.busy:
                upload.partial.discard()  # failed for good while this write was pending
            return
        assert offset is not None
        if offset - self.acked >= ACK_EVERY:
            self.acked = offset
            self.transport.write(filexfer.control(ack=offset))
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.batch_size >= WRITE_BATCH or self.state == FINISHING:
            self._flush()

    def _finish(self) -> None:
        ticket, upload = self.ticket, self.upload
        assert ticket is not None and upload is not None and upload.partial is not None
        self._cancel_timer()
        partial = upload.partial
        upload.busy += 1
        self.transport.offload(self.service.complete, ticket, partial, self.declared, done=self._stored)

    def _stored(self, record: FileRecord | None, error: BaseException | None) -> None:
        ticket, upload = self.ticket, self.upload
        assert ticket is not None and upload is not None
        upload.busy -= 1
        upload.partial = None  # stored, or removed by finish()
        upload.handler = None
        self.service.done(ticket)
        if error is not None or record is None:
            self._fail(_why(error))
            return
        self.state = OVER
        self.transport.close(filexfer.control(ok="done", id=record.id), reason="upload stored")

    # -- download ------------------------------------------------------------------------------

    def _begin_get(self, msg: dict[str, Any]) -> None:
        token = filexfer.field_str(msg, "ticket", filexfer.TICKET_RE)
        offset = filexfer.field_int(msg, "offset")
        ticket = self.service.claim(token, "get")
        if ticket is None or ticket.record is None:
            self._fail("the ticket is unknown or expired: ask for a new one")
            return
        record = ticket.record
        if offset > record.size:
            self._fail(f"offset {offset} is past the end of the file ({record.size} bytes)")
            return
        self.ticket = ticket
        self._authenticated()
        self.sent = offset
        self.size = record.size
        self.reading = True
        self.transport.offload(open_at, self.service.store, record, offset, done=self._opened)

    def _opened(self, source: BinaryIO | None, error: BaseException | None) -> None:
        self.reading = False
        if self.state == OVER:
            if source is not None:
                source.close()
            return
        if error is not None or source is None:
            self._fail(_why(error))
            return
        record = self.ticket.record if self.ticket is not None else None
        assert record is not None
        self.source = source
        self.state = SENDING
        self.transport.write(filexfer.control(ok="get", name=record.name, size=record.size, sha256=record.sha256,
                                              offset=self.sent))
        self._pump()

    def _pump(self) -> None:
        """Read the next chunk unless one is being read or the outbox is full (then resume_writing)."""
        if self.reading or self.state != SENDING:
            return
        transport = self.transport
        if self.sent >= self.size:
            self.state = OVER
            self._cancel_timer()
            self._close_source()
            transport.close(filexfer.control(ok="done"), reason="download sent")
            return
        if transport.outbox_size >= transport.high_water:
            return
        assert self.source is not None
        self.reading = True
        # Never more than fits under the high-water mark (plus one frame): the outbox has a hard bound.
        room = max(CHUNK, transport.high_water - transport.outbox_size)
        transport.offload(self.source.read, min(READ_SIZE, room, self.size - self.sent), done=self._read)

    def _read(self, data: bytes | None, error: BaseException | None) -> None:
        self.reading = False
        if self.state == OVER:
            self._close_source()
            return
        if error is not None or not data:
            self._fail("the file cannot be read on the server" if error is not None else
                       "the file on the server is shorter than its record")
            return
        write = self.transport.write
        for start in range(0, len(data), CHUNK):
            piece = data[start:start + CHUNK]
            write(filexfer.data_header(len(piece)) + piece)
        self.sent += len(data)
        self._pump()

    def _close_source(self) -> None:
        source, self.source = self.source, None
        if source is not None:
            source.close()

    # -- endings -------------------------------------------------------------------------------

    def _fail(self, why: str, *, tell: bool = True, end: bool = False) -> None:
        """Stop: tell the client why (one line), close. ``end``: the upload is over for good (its
        partial file is removed), not resumable."""
        if self.state == OVER:
            return
        self.state = OVER
        self._cancel_timer()
        ticket, upload = self.ticket, self.upload
        if ticket is not None:
            log.info("%s of %s failed: %s", "upload" if ticket.op == "put" else "download",
                     ticket.name or (ticket.record.name if ticket.record else "?"), why)
        if end and ticket is not None and upload is not None and upload.handler is self:
            upload.handler = None
            upload.over = True
            self.service.done(ticket)  # the quota is given back; nothing can resume it
            if upload.partial is not None and not upload.busy:
                upload.partial.discard()
        elif ticket is not None and upload is not None and upload.handler is self:
            self.service.dropped(ticket)
        if tell:
            self.transport.close(filexfer.error(why), reason=why)
        else:
            self.transport.close(reason=why)

    def _timed_out(self, why: str) -> None:
        self.timer = None
        if self.state != OVER:
            self._fail(why)

    def _idle(self, moved: int) -> None:
        """Every IDLE_SECONDS while transferring: close if nothing moved since the last look."""
        self.timer = None
        if self.state == OVER:
            return
        now = self.received + self.sent
        if now == moved and not self.writing and not self.reading:
            self._fail(f"nothing moved for {IDLE_SECONDS:g} s")
            return
        self.timer = self.transport.call_later(IDLE_SECONDS, self._idle, now)

    def _cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()


def install(server: Any, service: FileService) -> None:
    """Share files on ``server`` (a ChatServer): ``/ticket`` on its sessions, file connections on its
    ALPN route. Before the server takes connections: the ALPN name is offered from then on."""
    server.files = service
    server.routes.add(filexfer.ALPN, lambda: FileHandler(service))


def open_at(store: Any, record: FileRecord, offset: int) -> BinaryIO:
    """``record``'s bytes from ``offset`` (blocking: a worker's job; fetched from another server if need be)."""
    source = store.open(record)
    if offset:
        source.seek(offset)
    return source


def _why(error: BaseException | None) -> str:
    if isinstance(error, TransferError):
        return str(error)
    if isinstance(error, OSError):
        return f"the server's disk refused: {error.strerror or error}"
    log.error("file transfer failed unexpectedly", exc_info=error)
    return "the server failed to handle the file"
