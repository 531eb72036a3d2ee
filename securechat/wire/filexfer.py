"""File transfer, sans I/O: the frames and messages of a file connection, tickets, names and sizes.

A file moves on a TLS connection of its own to the chat port, told apart by ALPN
(:data:`ALPN`), so a big file never delays a chat line. The chat session authorises it: the
client asks for a short-lived ticket with a chat command (``/ticket``, below) and presents it as
the first message of the file connection.

Frames, both directions: one type byte, a 4-byte big-endian length, the payload.

- ``C`` control: a JSON object (at most :data:`MAX_CONTROL` bytes);
- ``D`` data: file bytes (at most :data:`MAX_CHUNK`; senders use :data:`CHUNK`).

An upload (``put``)::

    client: C {"op": "put", "ticket": T}
    server: C {"ok": "put", "offset": N}        N > 0: resuming, send from byte N
    client: D ... D                             the bytes from N to the ticket's size
    server: C {"ack": M}                        now and then: M bytes are on the server's disk
    client: C {"op": "end", "sha256": H}        the SHA-256 of the whole file, declared
    server: C {"ok": "done", "id": ID}          verified (size and hash), stored, announced

A download (``get``)::

    client: C {"op": "get", "ticket": T, "offset": N}   N: bytes the client already has
    server: C {"ok": "get", "name": ..., "size": S, "sha256": H, "offset": N}
    server: D ... D                             the bytes from N to S
    server: C {"ok": "done"}

Either side may send ``C {"error": "one line"}`` and close; the receiver of a file checks its
SHA-256 itself (the server on upload, the client again on download). A dropped upload is resumed
with the same ticket: the server answers with the offset it has on disk.

The chat command (``/ticket``; the securechat client sends it and consumes the answer)::

    /ticket put TAG TARGET SIZE NAME    TARGET: #room, a nick, or - (the current room)
    /ticket get TAG ID
    * ticket TAG ok TOKEN               or: * ticket TAG refused: REASON

TAG is the client's, to match an answer to its question.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any

from securechat.wire import protocol

ALPN = "securechat-file/1"

HEADER = struct.Struct(">cI")  # frame type, payload length
CONTROL = b"C"
DATA = b"D"

# Control messages are a few fields; 8 KiB bounds what a peer can make the other buffer.
MAX_CONTROL = 8 * 1024

# What a sender puts in one data frame: large enough that framing costs nothing next to TLS's 16 KiB
# records, small enough to stop a transfer promptly. A receiver accepts up to MAX_CHUNK.
CHUNK = 256 * 1024
MAX_CHUNK = 1024 * 1024

# How often the server confirms what is on its disk during an upload (the resume point the client
# shows): 64 acknowledgements for a 256 MiB file.
ACK_EVERY = 4 * 1024 * 1024

# A file name is shown in every member's room line: a sentence's worth, and well under the 255 bytes
# every file system allows (a UTF-8 character takes up to 4).
MAX_NAME_CHARS = 100

# File ids: 10 characters of an alphabet without look-alikes (no 0/o, 1/l/i): 31^10, about 2^49.5.
# Typed after /get; guessing one at the flood limit (10 lines/s) takes millennia.
ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"
ID_LENGTH = 10
ID_RE = re.compile(f"[{ID_ALPHABET}]{{{ID_LENGTH}}}\\Z")

# Tags and tickets: what the chat command carries.
TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,16}\Z")
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")
SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")

TICKET_COMMAND = "ticket"
TICKET_REPLY = "ticket "  # after the notice prefix: "* ticket TAG ok TOKEN"
CURRENT_ROOM = "-"


class TransferError(Exception):
    """A transfer failed; the message is one line for people."""


class FrameError(protocol.ProtocolError):
    """The peer sent something that is not a frame of this protocol."""


@dataclass(frozen=True, slots=True)
class Control:
    """A control message (a JSON object)."""

    msg: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Data:
    """File bytes: a piece of a data frame (frames are handed on as they arrive, never buffered whole)."""

    data: bytes


Event = Control | Data


class Decoder:
    """Bytes in, :class:`Control` and :class:`Data` events out; holds at most one control message."""

    __slots__ = ("_buf", "_left", "_max_chunk")

    def __init__(self, max_chunk: int = MAX_CHUNK) -> None:
        self._buf = b""  # an unfinished frame header or control payload
        self._left = 0  # bytes of the current data frame still to come
        self._max_chunk = max_chunk

    def feed(self, data: bytes) -> list[Event]:
        """The events in ``data`` (and what came before); raises :class:`FrameError` on garbage."""
        if len(data) <= self._left:  # the middle of a data frame, the common case: nothing to parse
            self._left -= len(data)
            return [Data(data)] if data else []
        out: list[Event] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                n = min(self._left, end - pos)
                out.append(Data(view[pos:pos + n].tobytes() if (pos or n < end) else data))
                self._left -= n
                pos += n
                continue
            if len(self._buf) < HEADER.size:
                take = HEADER.size - len(self._buf)
                self._buf += bytes(view[pos:pos + take])
                pos += take
                if len(self._buf) < HEADER.size:
                    break
            kind, length = HEADER.unpack(self._buf[:HEADER.size])
            if kind == DATA:
                if length > self._max_chunk:
                    raise FrameError(f"a data frame of {length} bytes (at most {self._max_chunk})")
                self._buf = b""
                self._left = length
                continue
            if kind != CONTROL:
                raise FrameError("not a securechat file connection (unknown frame type)")
            if length > MAX_CONTROL:
                raise FrameError(f"a control message of {length} bytes (at most {MAX_CONTROL})")
            need = HEADER.size + length - len(self._buf)
            self._buf += bytes(view[pos:pos + need])
            pos += min(need, end - pos)
            if len(self._buf) < HEADER.size + length:
                break
            payload, self._buf = self._buf[HEADER.size:], b""
            out.append(Control(_loads(payload)))
        return out

    @property
    def idle(self) -> bool:
        """No frame is half received."""
        return not self._buf and not self._left

    @property
    def data_left(self) -> int:
        """Bytes of the current data frame still to come (0 between frames): a receiver may read that
        many straight into its own buffer and say so with :meth:`skip`, instead of feeding them."""
        return self._left

    def skip(self, n: int) -> None:
        """``n`` bytes of the current data frame were taken by the caller (at most :attr:`data_left`)."""
        if not 0 <= n <= self._left:
            raise ValueError(f"skip({n}) with {self._left} bytes of the frame left")
        self._left -= n


def _loads(payload: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FrameError("a control message that is not JSON") from None
    if not isinstance(msg, dict):
        raise FrameError("a control message that is not a JSON object")
    return msg


def control(**msg: Any) -> bytes:
    """A control frame."""
    payload = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(payload) > MAX_CONTROL:
        raise ValueError("control message too long")
    return HEADER.pack(CONTROL, len(payload)) + payload


def data_header(length: int) -> bytes:
    """The header of a data frame of ``length`` bytes (the bytes follow it)."""
    return HEADER.pack(DATA, length)


def error(text: str) -> bytes:
    """A control frame saying why the sender gives up (one line)."""
    return control(error=protocol.sanitize(text)[:500])


# -- reading control messages -----------------------------------------------------------------

def field_int(msg: dict[str, Any], key: str, low: int = 0, high: int = 1 << 62) -> int:
    """``msg[key]`` as a whole number in range; FrameError otherwise."""
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FrameError(f"{key!r} is not a whole number from {low} to {high}")
    return value


def field_str(msg: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    """``msg[key]`` as a string (matching ``pattern``); FrameError otherwise."""
    value = msg.get(key)
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise FrameError(f"{key!r} is missing or malformed")
    return value


# -- names, sizes, ids ------------------------------------------------------------------------

# Characters that mean something to a file system or a shell on some platform (Windows refuses
# these in names): replaced, so a name is a name wherever it is saved. ":" also keeps a name from
# imitating the ": /get ID" that ends the room's line.
_UNSAFE = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')
_SPACES = re.compile(r"\s+")
# Names Windows reserves for devices, with or without an extension.
_DEVICE = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?\Z", re.IGNORECASE)


def clean_name(raw: str) -> str:
    """A file name from the network made harmless for any screen and any file system.

    Escape sequences, control, format (bidi) and invisible characters are removed
    (:func:`~securechat.wire.protocol.sanitize`); path separators and the characters file systems
    refuse become ``_``, so the result is one name, never a path; whitespace runs become one
    space; leading dots (hidden files, ``..``) and dashes (options to a command) and trailing
    dots and spaces go; NFC normalised; at most :data:`MAX_NAME_CHARS` characters, keeping the
    extension. Never empty (``file``).
    """
    name = protocol.sanitize(unicodedata.normalize("NFC", raw))
    name = _SPACES.sub(" ", _UNSAFE.sub("_", name)).strip()
    name = name.lstrip(".-_ ").rstrip(". ")
    if _DEVICE.match(name):
        name = "_" + name
    if len(name) > MAX_NAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 16 and stem:
            name = stem[:MAX_NAME_CHARS - len(ext) - 1].rstrip(". ") + "." + ext
        else:
            name = name[:MAX_NAME_CHARS].rstrip(". ")
    return name or "file"


_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def human_size(n: int) -> str:
    """``2.1 MiB``, ``340 KiB``, ``12 bytes``."""
    for unit, scale in _UNITS:
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} byte{'s' if n != 1 else ''}"


_SIZE_RE = re.compile(r"(\d{1,15})\s*([kmgt]?)(?:i?b)?\Z", re.IGNORECASE)
_SIZE_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``100M`` -> 104857600 (K, M, G, T are powers of 1024; a plain number is bytes); ValueError."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size: a whole number with an optional K, M, G or T (100M, 1G)")
    return int(m.group(1)) * _SIZE_SCALE[m.group(2).lower()]


def new_id() -> str:
    """A fresh file id (:data:`ID_RE`)."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def new_ticket() -> str:
    """A fresh ticket: 128 random bits."""
    return secrets.token_urlsafe(16)


# -- the chat command ---------------------------------------------------------------------------

def put_request(tag: str, target: str, size: int, name: str) -> str:
    """The chat line asking for an upload ticket (``target``: ``#room``, a nick, or ``-``)."""
    return f"/{TICKET_COMMAND} put {tag} {target or CURRENT_ROOM} {size} {name}"


def get_request(tag: str, file_id: str) -> str:
    """The chat line asking for a download ticket."""
    return f"/{TICKET_COMMAND} get {tag} {file_id}"


def ticket_ok(tag: str, token: str) -> str:
    return f"{TICKET_REPLY}{tag} ok {token}"


def ticket_refused(tag: str, reason: str) -> str:
    return f"{TICKET_REPLY}{tag} refused: {reason}"


def parse_ticket_reply(line: str) -> tuple[str, str | None, str] | None:
    """``* ticket TAG ok TOKEN`` -> (TAG, TOKEN, ""); ``... refused: WHY`` -> (TAG, None, WHY); else None."""
    head = protocol.NOTICE_PREFIX + TICKET_REPLY
    if not line.startswith(head):
        return None
    tag, _, rest = line[len(head):].partition(" ")
    if not TAG_RE.match(tag):
        return None
    if rest.startswith("ok "):
        token = rest[3:].strip()
        return (tag, token, "") if TICKET_RE.match(token) else None
    if rest.startswith("refused: "):
        return tag, None, rest[len("refused: "):]
    return None


def progress(verb: str, name: str, done: int, total: int, rate: float) -> str:
    """``sending report.pdf: 45% of 2.1 MiB, 12 MiB/s`` (a status line)."""
    pct = 100 if total <= 0 else min(100, done * 100 // total)
    speed = f", {human_size(int(rate))}/s" if rate > 0 else ""
    return f"{verb} {name}: {pct}% of {human_size(total)}{speed}"
