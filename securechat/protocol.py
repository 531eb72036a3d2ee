"""The securechat wire protocol, sans I/O.

Everything on the wire is a newline-terminated UTF-8 text line, so ``openssl s_client``,
``ncat --ssl`` or ``socat`` can chat too. This module turns bytes into lines and commands and
lines back into bytes; it owns no socket, so nearly all of it is tested without a network.

=====================  =================================================================
client sends            meaning
=====================  =================================================================
first line              the nickname (asked again until one is accepted)
``text``                a chat line, relayed to every other client as ``[nick] text``
``/nick NEW``           change nickname
``/who``                list who is online
``/msg NICK text``      private message, delivered as ``[nick -> NICK] text``
``/me action``          an action, relayed as ``[nick] * action``
``/help``               list the commands
``/quit`` or ``exit``   leave
``//text``              a chat line that starts with ``/``
=====================  =================================================================

Lines from the server that start with ``* `` are server notices; no client can produce one,
because everything a client says is relayed behind its ``[nick]``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

ENCODING = "utf-8"

# IRC allows 512 bytes a line; 4 KiB lets a pasted paragraph through while bounding what one
# connection can make the server buffer before a newline arrives.
MAX_LINE_BYTES = 4096

# Long enough for "firstname_lastname", short enough to keep "[nick] " from eating the screen.
MAX_NICK_CHARS = 24

NOTICE_PREFIX = "* "

NICK_RE = re.compile(r"[A-Za-z0-9_-]{1,%d}\Z" % MAX_NICK_CHARS)

# Names a user could use to impersonate the server or address everybody.
RESERVED_NICKS = frozenset(
    {
        "admin", "administrator", "all", "anonymous", "chanserv", "everyone", "localhost", "me",
        "moderator", "nickserv", "nobody", "op", "operator", "root", "securechat", "server",
        "system", "you",
    }
)  # fmt: skip

# Characters that look alike in common terminal fonts are folded before comparing nicks, so
# "AIice" (capital i) cannot pose as "Alice". Case folding already joins I and i, and a capital I
# looks like l, so i, l and 1 all fold to one letter, and 0 to o (Unicode TR39's ASCII
# confusables, made transitive). Two nicks differing only there cannot both be online.
_LOOKALIKE = str.maketrans({"i": "l", "1": "l", "0": "o"})


class ProtocolError(Exception):
    """The peer broke the protocol badly enough to be disconnected."""


class LineTooLong(ProtocolError):
    """A line exceeded :data:`MAX_LINE_BYTES` before its newline arrived."""


class LineBuffer:
    """Splits a byte stream into lines, holding at most ``max_line`` bytes of an unfinished line.

    >>> buf = LineBuffer()
    >>> buf.feed(b"hello\\r\\nwor")
    [b'hello']
    >>> buf.feed(b"ld\\n")
    [b'world']
    """

    __slots__ = ("_partial", "max_line")

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete lines (without ``\\n`` or ``\\r\\n``).

        Raises :class:`LineTooLong` as soon as a line is longer than the bound, whether or not its
        newline has arrived, so a 10 MB line costs the server at most one bound plus one read.
        """
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.max_line:
            raise LineTooLong(f"line longer than {self.max_line} bytes")
        for i, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = lines[i] = line[:-1]
            if len(line) > self.max_line:
                raise LineTooLong(f"line longer than {self.max_line} bytes")
        return lines

    @property
    def partial(self) -> bytes:
        """Bytes of a line whose newline has not arrived yet."""
        return self._partial


def decode(raw: bytes) -> str:
    """Decode a received line; invalid UTF-8 becomes U+FFFD instead of an error."""
    return raw.decode(ENCODING, "replace")


# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings (ESC ] ... BEL or
# ESC \), and two-byte escapes; plus the 8-bit C1 forms of CSI and OSC-like strings.
_ESCAPE_SEQUENCE = re.compile(
    r"""
    \x1b\[[0-?]*[ -/]*[@-~]?                  # CSI
  | \x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?   # OSC, DCS, SOS, PM, APC strings
  | \x1b[ -/]*[0-~]?                          # other escapes (charset selection, RIS, ...)
  | \x9b[0-?]*[ -/]*[@-~]?                    # 8-bit CSI
  | [\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?  # 8-bit string introducers
    """,
    re.VERBOSE,
)

# Bidirectional overrides, embeddings, isolates and marks: they can make text display in an order
# other than the one it was sent in ("Trojan Source", CVE-2021-42574).
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029" + BIDI_CONTROLS + "]")


def sanitize(text: str) -> str:
    """Neutralise untrusted text so it cannot drive another user's terminal.

    Removes ANSI/VT escape sequences whole (so ``ESC [2J`` leaves nothing behind), every
    remaining C0/C1 control character, line/paragraph separators and Unicode bidi controls. A tab
    becomes a space. Everything else, emoji and accents included, is kept.
    """
    if text.isprintable():  # fast path: no Cc, Cf, Zl, Zp, ... at all
        return text
    text = text.replace("\t", " ")
    text = _ESCAPE_SEQUENCE.sub("", text)
    return _UNSAFE_CHARS.sub("", text)


def is_safe(text: str) -> bool:
    """True when ``text`` holds nothing :func:`sanitize` would remove."""
    return _UNSAFE_CHARS.search(text) is None


def nick_key(nick: str) -> str:
    """The form in which two nicks are compared: case and look-alike characters folded."""
    return unicodedata.normalize("NFKC", nick).casefold().translate(_LOOKALIKE)


_RESERVED_KEYS = frozenset(nick_key(n) for n in RESERVED_NICKS)


def nick_error(nick: str) -> str | None:
    """Why ``nick`` is not acceptable as a nickname, or None when it is.

    Uniqueness among connected users is the room's business, not checked here.
    """
    if not nick:
        return "a nickname cannot be empty"
    if len(nick) > MAX_NICK_CHARS:
        return f"a nickname has at most {MAX_NICK_CHARS} characters"
    if not NICK_RE.match(nick):
        return "a nickname uses only letters A-Z, digits, '_' and '-'"
    if nick_key(nick) in _RESERVED_KEYS:
        return f"{nick!r} is reserved"
    return None


@dataclass(frozen=True, slots=True)
class Command:
    """A ``/command argument`` line; ``name`` is lower-case without the slash."""

    name: str
    arg: str


def parse(line: str) -> Command | str:
    """Turn a decoded, sanitised line into a :class:`Command` or the chat text to relay.

    ``exit`` (the seed's word) is ``/quit``; ``//text`` sends ``/text`` as chat.
    """
    if line.startswith("/"):
        if line.startswith("//"):
            return line[1:]
        name, _, arg = line[1:].partition(" ")
        return Command(name.lower(), arg.strip())
    if line.strip().lower() == "exit":
        return Command("quit", "")
    return line


def encode(text: str) -> bytes:
    """One wire line."""
    return (text + "\n").encode(ENCODING)


def chat(nick: str, text: str) -> bytes:
    """A relayed chat line, in the seed's format: ``[nick] text``."""
    return f"[{nick}] {text}\n".encode(ENCODING)


def action(nick: str, text: str) -> bytes:
    """A ``/me`` action: ``[nick] * text`` (behind the nick, so it can never pass for a notice)."""
    return f"[{nick}] * {text}\n".encode(ENCODING)


def private(sender: str, recipient: str, text: str) -> bytes:
    """A private message as both ends see it: ``[sender -> recipient] text``."""
    return f"[{sender} -> {recipient}] {text}\n".encode(ENCODING)


def notice(text: str) -> bytes:
    """A server notice: ``* text``."""
    return f"{NOTICE_PREFIX}{text}\n".encode(ENCODING)


# Server notices that a client program needs to recognise. Each is the start of the line after
# "* "; the rest is for people.
GREETING = "securechat: send your nickname"
WELCOME = "welcome, "  # "* welcome, alice! 3 online: alice, bob, carol. /help lists commands"
NICK_REFUSED = "nickname refused: "
SERVER_FULL = "server full"
TLS_REQUIRED = "this server requires TLS"
# Refusals of a client certificate after the handshake (invites and revocation, securechat.enroll).
CERT_REQUIRED = "this server requires a client certificate"
CERT_REVOKED = "your certificate has been revoked"
SHUTDOWN = "server shutting down"
LINE_TOO_LONG = "line too long"


def welcome_nick(line: str) -> str | None:
    """The nick a ``* welcome, NICK! ...`` line confirms, or None for any other line."""
    prefix = NOTICE_PREFIX + WELCOME
    if not line.startswith(prefix):
        return None
    nick = line[len(prefix) :].split("!", 1)[0]
    return nick if NICK_RE.match(nick) else None


def is_notice(line: str) -> bool:
    """True for a server notice line."""
    return line.startswith(NOTICE_PREFIX)


_SENDER_RE = re.compile(r"\[([A-Za-z0-9_-]{1,%d})(?: -> [A-Za-z0-9_-]+)?\] " % MAX_NICK_CHARS)


def sender_of(line: str) -> str | None:
    """The nick that a relayed chat, action or private line comes from, or None."""
    m = _SENDER_RE.match(line)
    return m.group(1) if m else None


HELP_TEXT = (
    "commands: /nick NEW (rename), /who (who is online), /msg NICK text (private), "
    "/me action, /help, /quit (or exit); //text sends a line starting with '/'"
)


class TokenBucket:
    """Flood control: ``rate`` lines a second on average, bursts of up to ``burst``.

    Time is passed in, so it is tested without waiting. ``rate <= 0`` disables it.
    """

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._last = now

    def allow(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.rate <= 0:
            return True
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
