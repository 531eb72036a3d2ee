"""Moving files: the client's end of a file connection, its tickets, and where a received file is saved.

A transfer runs on a TLS connection of its own (ALPN ``securechat-file/1``) to the chat's server, in
the calling thread, so the chat connection keeps its pace: a 100 MiB file never delays a line. The
ticket comes from the chat session (:class:`TicketDesk`, fed by :class:`~securechat.client.chat.ChatClient`).

- :func:`upload`: sends the file in :data:`~securechat.wire.filexfer.CHUNK` frames, hashing as it
  goes, and declares the SHA-256 at the end; a dropped connection is resumed (same ticket) from the
  offset the server reports, up to :data:`RETRIES` times.
- :func:`download`: writes to a hidden partial file beside the target (``.securechat-ID.part``),
  checks the SHA-256 against the server's, and only then gives the file its name, never
  overwriting one (``report (1).pdf``); a dropped connection, or a later run, resumes the partial.

Every failure is a :class:`~securechat.wire.filexfer.TransferError` with one line for people.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import itertools
import os
import select
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from securechat.client.errors import ChatError
from securechat.wire import filexfer, protocol
from securechat.wire.conn import describe_error
from securechat.wire.filexfer import ALPN, CHUNK, HEADER, Control, Data, TransferError

# A dropped transfer is tried again this many times, after 1, 2, 4... seconds.
RETRIES = 5

# The server's answers (its first, its last) come within this on any LAN; the bytes in between
# may take as long as they take, as long as they keep moving (SILENCE).
ANSWER_SECONDS = 30.0
SILENCE_SECONDS = 60.0

# How long to wait for the answer to /ticket on the chat connection.
TICKET_SECONDS = 10.0

# How often a transfer that needs the chat looks whether a dropped chat is back (a fraction of the
# reconnection's first 1 s backoff).
LIVE_POLL = 0.02

# Acknowledgements are looked for every this many chunks sent (a select() each).
ACK_POLL_CHUNKS = 16

# Buffers hashed (and, downloading, written) by the helper thread while the network moves the next
# ones: enough to keep both busy, and what a transfer holds in memory (DEPTH x BATCH).
DEPTH = 4
BATCH = 1 << 20

# Names tried beside an existing file before giving up: "report (1).pdf" ... "report (999).pdf".
MAX_NAME_TRIES = 1000

Progress = Callable[[int, int], None]  # (bytes done, total)


class ChatClient(Protocol):
    """What a transfer needs of the chat connection (:class:`securechat.client.chat.ChatClient`)."""

    host: str
    port: int
    server_hostname: str | None
    tickets: TicketDesk

    @property
    def reconnecting(self) -> bool: ...

    def send(self, text: str) -> bool: ...

    def file_context(self) -> ssl.SSLContext: ...

    def open_socket(self, timeout: float) -> socket.socket: ...


def send_when_live(client: ChatClient, timeout: float = TICKET_SECONDS) -> Callable[[str], bool]:
    """``client.send``, once the chat is back if it is reconnecting: a line sent meanwhile is dropped
    ("not sent"), so a /ticket asked then would wait for an answer that never comes. A chat still
    away after ``timeout`` is "not connected" (False)."""

    def send(text: str) -> bool:
        deadline = time.monotonic() + timeout
        while client.reconnecting:
            if time.monotonic() > deadline:
                return False
            time.sleep(LIVE_POLL)
        return client.send(text)

    return send


class TicketDesk:
    """Matches ``/ticket`` answers to the questions (any thread asks; the connection thread answers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Any]] = {}  # tag -> [event, token, reason]
        self._tags = itertools.count(1)

    def ask(self, send: Callable[[str], bool], request: Callable[[str], str], timeout: float = TICKET_SECONDS) -> str:
        """Send ``request(tag)`` with ``send`` and wait for its ticket; TransferError with the server's reason."""
        tag = f"t{next(self._tags)}"
        slot: list[Any] = [threading.Event(), None, ""]
        with self._lock:
            self._waiting[tag] = slot
        try:
            if not send(request(tag)):
                raise TransferError("not connected to the server")
            if not slot[0].wait(timeout):
                raise TransferError(f"the server did not answer within {timeout:g} s (is it a securechat server "
                                    "with file sharing?)")
        finally:
            with self._lock:
                self._waiting.pop(tag, None)
        if slot[1] is None:
            raise TransferError(slot[2])
        return str(slot[1])

    def consume(self, line: str) -> bool:
        """True when ``line`` answers a question asked here (it is then not shown)."""
        if not line.startswith(protocol.NOTICE_PREFIX + filexfer.TICKET_REPLY):
            return False
        parsed = filexfer.parse_ticket_reply(line)
        if parsed is None:
            return False
        tag, token, reason = parsed
        with self._lock:
            slot = self._waiting.get(tag)
        if slot is None:
            return False
        slot[1], slot[2] = token, reason
        slot[0].set()
        return True


class Digest:
    """SHA-256 (and, for a download, writing) in a helper thread, in order, beside the network.

    hashlib and file writes release the GIL, as TLS does: on two cores, hashing a file costs its
    transfer almost nothing. At most :data:`DEPTH` buffers are in flight; :meth:`feed` waits for the
    oldest beyond that, so memory stays bounded, and an error in the thread comes out of the next call.
    """

    def __init__(self, out: BinaryIO | None = None, where: str = "", hasher: Any = None) -> None:
        self._hash = hasher if hasher is not None else hashlib.sha256()
        self._out = out
        self._where = where
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix="securechat-digest")
        self._flight: collections.deque[futures.Future[None]] = collections.deque()

    def _work(self, data: bytes | memoryview) -> None:
        if self._out is not None:
            try:
                self._out.write(data)
            except OSError as exc:
                raise TransferError(f"cannot save into {self._where}: {describe_error(exc)}") from None
        self._hash.update(data)

    def feed(self, data: bytes | memoryview) -> None:
        while len(self._flight) >= DEPTH:
            self._flight.popleft().result()
        self._flight.append(self._pool.submit(self._work, data))

    def wait(self) -> None:
        """Until everything fed is hashed (and written)."""
        while self._flight:
            self._flight.popleft().result()

    def hexdigest(self) -> str:
        self.wait()
        return self._hash.hexdigest()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wait()
        self._pool.shutdown()


# -- the connection ---------------------------------------------------------------------------

def open_connection(client: ChatClient, timeout: float) -> ssl.SSLSocket:
    """A verified TLS connection with ALPN ``securechat-file/1`` to ``client``'s current server."""
    try:
        context = client.file_context()
        raw = client.open_socket(timeout)
    except ChatError as exc:
        raise TransferError(str(exc)) from None
    context.set_alpn_protocols([ALPN])
    name = client.server_hostname or client.host
    try:
        sock = context.wrap_socket(raw, server_hostname=name)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise TransferError(f"cannot open a file connection to the server: {describe_error(exc)}") from None
    if sock.selected_alpn_protocol() != ALPN:
        sock.close()
        raise TransferError("the server does not take files (it is an older securechat, or runs with --no-files)")
    return sock


class Link:
    """One file connection: frames out, events in (the calling thread owns the socket)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.decoder = filexfer.Decoder()
        self.events: list[Control | Data] = []
        self._timeout: float | None = None

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def _set_timeout(self, timeout: float) -> None:
        if timeout != self._timeout:  # settimeout is a system call (FIONBIO): once, not per record
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def next_event(self, timeout: float) -> Control | Data:
        """The next event; TransferError("...") for the peer's error, ConnectionError when it drops."""
        while not self.events:
            self._set_timeout(timeout)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise ConnectionError(f"the server went silent for {timeout:g} s") from None
            if not data:
                raise ConnectionError("the server closed the connection")
            self.events = self.decoder.feed(data)
        event = self.events.pop(0)
        if isinstance(event, Control) and "error" in event.msg:
            raise TransferError(protocol.sanitize(str(event.msg["error"])))
        return event

    def data_left(self) -> int:
        """Bytes of a data frame that may be read straight into a buffer (:meth:`recv_into`): none while
        decoded events are waiting, since those come first."""
        return 0 if self.events else self.decoder.data_left

    def recv_into(self, view: memoryview, timeout: float) -> int:
        """Read file bytes of the current data frame into ``view`` (at most :meth:`data_left`); how many."""
        self._set_timeout(timeout)
        try:
            n = self.sock.recv_into(view)
        except TimeoutError:
            raise ConnectionError(f"the server went silent for {timeout:g} s") from None
        if not n:
            raise ConnectionError("the server closed the connection")
        self.decoder.skip(n)
        return n

    def control(self, timeout: float = ANSWER_SECONDS) -> dict[str, Any]:
        event = self.next_event(timeout)
        if not isinstance(event, Control):
            raise filexfer.FrameError("file bytes where a message was expected")
        return event.msg

    def ready(self) -> bool:
        """Something to read now (an acknowledgement, or the server's error)."""
        return bool(self.events) or self.sock.pending() > 0 or bool(select.select([self.sock], [], [], 0)[0])

    def last_word(self) -> str | None:
        """After a failed send: the error the server sent before closing, if it did."""
        try:
            while True:
                event = self.next_event(1.0)
                if isinstance(event, Control) and "error" in event.msg:
                    return str(event.msg["error"])
        except TransferError as exc:
            return str(exc)
        except (OSError, ssl.SSLError, filexfer.FrameError):
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _retrying(attempt: Callable[[int], Any], say: Callable[[str], None]) -> Any:
    """Run ``attempt(n)`` until it returns; a dropped connection is tried again (backing off), and
    the server's "busy" (the previous connection still closing) too. Anything else ends it."""
    for n in range(RETRIES + 1):
        delay = 2 ** n
        try:
            return attempt(n)
        except TransferError as exc:
            if not str(exc).startswith("busy") or n == RETRIES:
                raise
            say(f"{exc}: trying again in {delay} s")
        except (ConnectionError, OSError, ssl.SSLError, filexfer.FrameError) as exc:
            if n == RETRIES:
                raise TransferError(f"the connection kept dropping ({_reason(exc)}); gave up after {RETRIES} "
                                    "tries") from None
            say(f"connection lost ({_reason(exc)}): resuming in {delay} s")
        time.sleep(delay)
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    return describe_error(exc) if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) else str(exc)


# -- upload -----------------------------------------------------------------------------------

def upload(connect: Callable[[], ssl.SSLSocket], ticket: str, source: BinaryIO, size: int,
           progress: Progress = lambda done, total: None, say: Callable[[str], None] = lambda text: None) -> str:
    """Send ``size`` bytes of ``source`` with ``ticket``; the new file's id once the server stored it."""

    def attempt(n: int) -> str:
        link = Link(connect())
        try:
            return _upload_once(link, ticket, source, size, progress)
        finally:
            link.close()

    return str(_retrying(attempt, say))


def _upload_once(link: Link, ticket: str, source: BinaryIO, size: int, progress: Progress) -> str:
    link.send(filexfer.control(op="put", ticket=ticket))
    answer = link.control()
    offset = filexfer.field_int(answer, "offset", 0, size)
    digest = Digest()
    try:
        return _upload_from(link, source, size, offset, digest, progress)
    finally:
        digest.close()


def _upload_from(link: Link, source: BinaryIO, size: int, offset: int, digest: Digest, progress: Progress) -> str:
    # A ring of DEPTH + 1 frame buffers: the helper thread hashes one while the next is read and sent.
    ring = [bytearray(HEADER.size + CHUNK) for _ in range(DEPTH + 1)]
    source.seek(0)
    pos = 0
    while pos < offset:  # resuming: the part the server has still counts in the hash
        data = source.read(min(BATCH, offset - pos))
        if not data:
            raise TransferError("the file got shorter while it was being sent")
        digest.feed(data)
        pos += len(data)
    progress(offset, size)
    chunks = 0
    try:
        while pos < size:
            buf = ring[chunks % len(ring)]
            view = memoryview(buf)
            n = source.readinto(view[HEADER.size:HEADER.size + min(CHUNK, size - pos)])  # type: ignore[attr-defined]
            if not n:
                raise TransferError("the file got shorter while it was being sent")
            HEADER.pack_into(buf, 0, filexfer.DATA, n)
            link.send(view[:HEADER.size + n])
            digest.feed(view[HEADER.size:HEADER.size + n])  # DEPTH in flight: this buffer is reused last
            pos += n
            chunks += 1
            if chunks % ACK_POLL_CHUNKS == 0:
                while link.ready():
                    link.control()  # an acknowledgement (or the server's error, raised)
                progress(pos, size)
        link.send(filexfer.control(op="end", sha256=digest.hexdigest()))
    except (OSError, ssl.SSLError) as exc:
        word = link.last_word()  # the server may have said why it hung up (quota, disk, size)
        if word is not None:
            raise TransferError(word) from None
        raise ConnectionError(_reason(exc)) from None
    progress(size, size)
    while True:
        answer = link.control(SILENCE_SECONDS)
        if answer.get("ok") == "done":
            return filexfer.field_str(answer, "id", filexfer.ID_RE)


# -- download ---------------------------------------------------------------------------------

def partial_path(directory: Path, file_id: str) -> Path:
    """Where a download of ``file_id`` into ``directory`` gathers its bytes (and a later run resumes)."""
    return directory / f".securechat-{file_id}.part"


def download(connect: Callable[[], ssl.SSLSocket], ticket: Callable[[], str], file_id: str, directory: Path,
             progress: Progress = lambda done, total: None, say: Callable[[str], None] = lambda text: None,
             named: Callable[[str], None] = lambda name: None) -> Path:
    """Fetch ``file_id`` into ``directory``; the path it was saved as. ``ticket()`` asks for a fresh
    ticket (one per connection); ``named(name)`` is told the file's (cleaned) name once the server said it."""
    part = partial_path(directory, file_id)

    def attempt(n: int) -> Path:
        link = Link(connect())
        try:
            return _download_once(link, ticket(), part, directory, progress, named)
        finally:
            link.close()

    return Path(_retrying(attempt, say))


def _open_partial(part: Path, directory: Path) -> BinaryIO:
    """``part`` for reading what an earlier try brought and appending the rest, created 0600 if need be.

    Never through whatever someone else planted at its name in a shared directory such as /tmp (the
    id is known to a whole room): a symbolic link (to the victim's ``~/.bashrc``) is not followed, a
    FIFO or a device is not waited on. TransferError in one line.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    not_regular = f"cannot save into {directory}: {part.name} is not a regular file (remove it)"
    try:
        fd = os.open(part, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TransferError(not_regular) from None
        raise TransferError(f"cannot save into {directory}: {describe_error(exc)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TransferError(not_regular)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b", buffering=0)


def _download_once(link: Link, ticket: str, part: Path, directory: Path, progress: Progress,
                   named: Callable[[str], None]) -> Path:
    out = _open_partial(part, directory)
    with out:
        have = os.fstat(out.fileno()).st_size
        try:
            link.send(filexfer.control(op="get", ticket=ticket, offset=have))
            answer = link.control()
        except BaseException as exc:
            if not have:  # made just now: nothing to resume, so nothing left behind
                part.unlink()
            elif isinstance(exc, TransferError) and "past the end" in str(exc):  # a partial of another file
                part.unlink()
                raise TransferError(f"removed {part.name}, a partial download longer than the file: try again") \
                    from None
            raise
        size = filexfer.field_int(answer, "size")
        sha = filexfer.field_str(answer, "sha256", filexfer.SHA256_RE)
        name = filexfer.clean_name(filexfer.field_str(answer, "name"))  # the server's word is not trusted either
        named(name)
        if filexfer.field_int(answer, "offset") != have:
            raise filexfer.FrameError("the server resumed from another offset")
        hasher = hashlib.sha256()
        while chunk := out.read(BATCH):  # what an earlier try brought still counts in the hash
            hasher.update(chunk)
        digest = Digest(out, str(directory), hasher)  # the helper appends what arrives, and hashes it
        try:
            got = _receive(link, digest, have, size, progress)
            sha_got = digest.hexdigest()
        finally:
            digest.close()
    if got != size or sha_got != sha:
        part.unlink()
        raise TransferError(f"{name} arrived damaged (its SHA-256 does not match): removed; try again")
    return place(part, directory, name)


def _receive(link: Link, digest: Digest, got: int, size: int, progress: Progress) -> int:
    """The file's bytes into ``digest`` (written and hashed there) until the server's "done"; the total.

    Inside a data frame the bytes go straight from TLS into one of DEPTH + 1 buffers in turn (the
    helper holds at most DEPTH, see :meth:`Digest.feed`): no object per TLS record, no copy to batch
    them. Frame headers and control messages go through the decoder as usual.
    """
    buffers = [bytearray(BATCH) for _ in range(DEPTH + 1)]
    turn, view, filled = 0, memoryview(buffers[0]), 0
    last = time.monotonic()
    progress(got, size)

    def add(n: int) -> None:
        """``n`` more bytes are in the buffer; a full one goes to the helper and the next takes over."""
        nonlocal got, filled, turn, view, last
        got += n
        filled += n
        if got > size:
            raise TransferError("the server sent more bytes than the file has")
        if filled == BATCH:
            digest.feed(view)
            turn = (turn + 1) % len(buffers)
            view, filled = memoryview(buffers[turn]), 0
            if time.monotonic() - last > 0.1:
                progress(got, size)
                last = time.monotonic()

    while True:
        left = link.data_left()
        if left:
            add(link.recv_into(view[filled:filled + min(left, BATCH - filled)], SILENCE_SECONDS))
            continue
        event = link.next_event(SILENCE_SECONDS)
        if isinstance(event, Control):
            if event.msg.get("ok") == "done":
                break
            continue
        data = memoryview(event.data)
        while data:  # bytes that came with a frame header: into the buffer, a batch at a time
            n = min(len(data), BATCH - filled)
            view[filled:filled + n] = data[:n]
            data = data[n:]
            add(n)
    if filled:
        digest.feed(view[:filled])
    progress(got, size)
    return got


def place(part: Path, directory: Path, name: str) -> Path:
    """Give the finished ``part`` the name ``name`` in ``directory`` without replacing any file there:
    ``report.pdf``, else ``report (1).pdf``, ``report (2).pdf``..."""
    stem, dot, ext = name.rpartition(".")
    if not stem:  # ".bashrc"-like names were cleaned already; "README" has no extension
        stem, dot, ext = name, "", ""
    for i in range(MAX_NAME_TRIES):
        target = directory / (name if i == 0 else f"{stem} ({i}){dot}{ext}")
        try:
            os.link(part, target)  # fails if the name is taken, whatever happens in between
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: the same check, not atomic
            if target.exists():
                continue
            os.replace(part, target)
            return target
        part.unlink()
        return target
    raise TransferError(f"{directory} already holds {MAX_NAME_TRIES} files called like {name}")


# -- what both CLI and screen need -------------------------------------------------------------

def send_file(client: ChatClient, path: Path, target: str, progress: Progress = lambda done, total: None,
              say: Callable[[str], None] = lambda text: None, timeout: float = 10.0) -> tuple[str, str, int]:
    """Share ``path`` with ``target`` (``#room``, a nick, or ``-`` for the current room) over
    ``client``'s server; (file id, name as shared, size)."""
    try:
        # Not blocking: a FIFO or a device would otherwise hang the open before we could refuse it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {describe_error(exc)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TransferError(f"{path} is not a file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        name = filexfer.clean_name(path.name)
        token = client.tickets.ask(send_when_live(client), lambda tag: filexfer.put_request(tag, target, size, name))
        file_id = upload(lambda: open_connection(client, timeout), token, source, size, progress, say)
    return file_id, name, size


def get_file(client: ChatClient, file_id: str, directory: Path, progress: Progress = lambda done, total: None,
             say: Callable[[str], None] = lambda text: None, timeout: float = 10.0,
             named: Callable[[str], None] = lambda name: None) -> Path:
    """Fetch ``file_id`` into ``directory`` over ``client``'s server; where it was saved. ``named(name)``:
    the file's name, once known (a progress line shows it instead of the id)."""
    if not filexfer.ID_RE.match(file_id):
        raise TransferError(f"{file_id!r} is not a file id (the {filexfer.ID_LENGTH} characters after /get)")
    if not directory.is_dir():
        raise TransferError(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK):
        raise TransferError(f"cannot write to {directory}")

    def ticket() -> str:
        return client.tickets.ask(send_when_live(client), lambda tag: filexfer.get_request(tag, file_id))

    first = [ticket()]  # asked before any connection: "no such file" needs none

    def fresh() -> str:  # the first connection uses that one; a resumed one asks again
        return first.pop() if first else ticket()

    return download(lambda: open_connection(client, timeout), fresh, file_id, directory, progress, say, named)
