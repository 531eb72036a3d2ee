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
``/who [ROOM]``         who is in the room (``* 2 online: a, b`` in the default room,
                        ``* 2 in #dev: a, b`` elsewhere)
``/join ROOM``          join a room (created on first join) and talk there; switch to it if
                        already joined. Everyone starts in ``#lobby``
``/part [ROOM]``        leave a room (default: the current one)
``/rooms``              the rooms with people in them: ``* 2 rooms: #dev (2), #lobby (5)``
``/history [N]``        N (default 50, at most 200) earlier lines of the current room
``/session``            opt in to ids and resuming: ``* session TOKEN GRACE``, then every room
                        line starts with ``@id=ID;room=NAME `` (the securechat client sends it)
``/resume TOKEN R=ID``  instead of a nickname, within GRACE seconds of a dropped connection:
                        same nick, same rooms, and the lines after each room's ID as missed
``/msg NICK text``      private message, delivered as ``[nick -> NICK] text``
``/me action``          an action, relayed as ``[nick] * action``
``/help``               list the commands
``/quit`` or ``exit``   leave
``//text``              a chat line that starts with ``/``
``/cap echo``           (client programs) get our own lines back as relayed, see CAP_ECHO
=====================  =================================================================

Lines from the server that start with ``* `` are server notices; no client can produce one,
because everything a client says is relayed behind its ``[nick]``. Lines of a room that is not
the one being typed into start with ``#room `` (``#dev [bob] hi``, ``#dev * carol joined``).
Replayed lines start with ``(history HH:MM) `` (on joining: the last 50, then
``* now live in #room``) or ``(missed HH:MM) `` (on resuming, or a returning person under
mutual TLS); a line from another day shows its date too.
"""

from __future__ import annotations

import functools
import json
import re
import string
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

ENCODING = "utf-8"

# The line protocol of the README's table. Announced on the LAN (securechat.wire.dnssd); raise it
# only when a client of one version can no longer talk to a server of the other.
PROTOCOL_VERSION = 1

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

# Look-alike nicknames are folded with Unicode TR39's confusables data (confusables.txt, as shipped
# by the confusable-homoglyphs package): two nicks are the same person when they look the same.
# TR39's own rows give I~l~1, 0~O and m~rn; it has no row for two other ASCII digraphs that read as
# one letter in terminal fonts, so these are added to it (the same ones disarm's "contractions"
# name). Collisions only matter while both nicks are online.
_DIGRAPH_LOOKALIKES = {"w": "vv", "d": "cl"}
_NICK_CHARS = string.ascii_letters + string.digits + "_-"

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
        # A line of exactly max_line bytes may be waiting for the "\n" of its "\r\n" (they can
        # arrive in different TLS records): the "\r" is a terminator, not part of the line.
        if len(self._partial) > self.max_line and not (
                len(self._partial) == self.max_line + 1 and self._partial.endswith(b"\r")):
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

# Characters str.isprintable() lets through that draw nothing: the combining grapheme joiner,
# Hangul fillers, Khmer inherent vowels, Mongolian free variation selectors, the braille blank, and
# the variation selectors (VS1-256: a run of them can carry a whole hidden message, "emoji
# smuggling"). Everything in category Cf (zero-width space/joiner, word joiner, BOM, soft hyphen,
# tag characters, bidi controls...) is invisible too and is removed by category.
_PRINTABLE_INVISIBLES = ("\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u2800\u3164\uffa0"
                         "\ufe00-\ufe0f\U000e0100-\U000e01ef")
_PRINTABLE_INVISIBLE = re.compile(f"[{_PRINTABLE_INVISIBLES}]")
_ASCII_CONTROLS = re.compile("[\x00-\x1f\x7f]")
_ZWJ = "\u200d"
_EMOJI_STYLE = "\ufe0e\ufe0f"  # VS15 (text style) and VS16 (emoji style) after a visible character
_PICTOGRAPHIC = ("So", "Sk")  # emoji and their skin-tone modifiers
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _visible_only(text: str) -> str:
    """Drop controls, format characters and other invisibles, keeping emoji sequences intact.

    A zero-width joiner survives only between two pictographs (the family and profession emoji
    👩‍💻 are built that way; between letters it hides text), and one VS15/VS16 only right after a
    visible character. Tag characters always go, so the subdivision flags (🏴 + tags) show as a
    plain black flag: the same characters spell hidden ASCII text ("ASCII smuggling").
    """
    out: list[str] = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch == _ZWJ:
            base = out[-2] if len(out) > 1 and out[-1] in _EMOJI_STYLE else (out[-1] if out else "")
            after = text[i + 1] if i < last else ""
            if (base and unicodedata.category(base) in _PICTOGRAPHIC and after
                    and unicodedata.category(after) == "So" and not _PRINTABLE_INVISIBLE.match(after)):
                out.append(ch)
        elif ch in _EMOJI_STYLE:
            if out and out[-1] not in _EMOJI_STYLE and out[-1] != _ZWJ:
                out.append(ch)
        elif unicodedata.category(ch) not in _DROPPED_CATEGORIES and not _PRINTABLE_INVISIBLE.match(ch):
            out.append(ch)
    if out and out[-1] == _ZWJ:  # a joiner whose next pictograph was itself dropped
        out.pop()
    return "".join(out)


def sanitize(text: str) -> str:
    """Neutralise untrusted text so it cannot drive another user's terminal or hide text in it.

    Removes ANSI/VT escape sequences whole (so ``ESC [2J`` leaves nothing behind), every
    remaining control character (C0, C1), line/paragraph separators, every format character
    (Unicode category Cf: bidi controls, zero-width space and joiner, word joiner, BOM, tags...)
    and the other invisibles (:data:`_PRINTABLE_INVISIBLES`), keeping emoji sequences whole. A tab
    becomes a space. Everything else, emoji and accents included, is kept.
    """
    # Fast path, the common case: isprintable() is False for any Cc, Cf, Zl, Zp...; ASCII has no
    # other invisible.
    if text.isprintable() and (text.isascii() or not _PRINTABLE_INVISIBLE.search(text)):
        return text
    text = _ESCAPE_SEQUENCE.sub("", text.replace("\t", " "))
    if text.isascii():  # only C0 controls and DEL can be left: no emoji sequence to keep whole
        return _ASCII_CONTROLS.sub("", text)
    return _visible_only(text)


def is_safe(text: str) -> bool:
    """True when ``text`` holds nothing :func:`sanitize` would remove."""
    return sanitize(text) == text


def _confusable_pairs() -> Iterator[tuple[str, str]]:
    """(character, look-alike) pairs of TR39's confusables.txt, from the confusable-homoglyphs data.

    The package stores each row both ways (source -> prototype and back); the direction does not
    matter here, only which characters end up in one class.
    """
    from importlib.resources import files

    data = json.loads(files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8"))
    for char, alikes in data.items():
        for alike in alikes:
            # Right-to-left characters come wrapped in LRM marks in the package's data.
            yield char.strip("\u200e\u200f"), alike["c"].strip("\u200e\u200f")


# functools.cache does not hold other callers back while the first one computes: twenty sessions
# joining at once each built their own table (a second of CPU and 60 MiB in the benchmark).
_FOLD_LOCK = threading.Lock()


def _fold_table() -> dict[int, str]:
    """The look-alike table, built once (thread-safe: the first caller builds, the others wait)."""
    table = _FOLD_TABLE
    if table is None:
        with _FOLD_LOCK:
            table = _FOLD_TABLE or _build_fold_table()
    return table


_FOLD_TABLE: dict[int, str] | None = None


def prepare() -> None:
    """Build the look-alike tables now (a server calls it at start, so no one's first join waits)."""
    nick_key("warm-up")


def _build_fold_table() -> dict[int, str]:
    """Character -> the string standing for its look-alike class (a ``str.translate`` table).

    Classes are the connected components of TR39's confusable rows, joined with each ASCII
    letter's other case (so capital I, which looks like l, also takes small i along) and the
    digraph rows above. A class holding a sequence (m ~ rn) is written as that sequence, so
    typing the sequence and typing the letter fold alike. Built once, on first use (~0.1 s).
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for a, b in _confusable_pairs():
        if a and b:
            union(a, b)
    for ch in string.ascii_uppercase:
        union(ch, ch.lower())
    for letter, digraph in _DIGRAPH_LOOKALIKES.items():
        union(letter, digraph)
    classes: dict[str, list[str]] = {}
    for member in list(parent):
        classes.setdefault(find(member), []).append(member)
    table: dict[int, str] = {}
    for members in classes.values():
        sequences = sorted(m for m in members if len(m) > 1)
        # Prefer a plain ASCII lower-case letter as the name of a class: keys stay readable.
        name = sequences[0] if sequences else min(members, key=lambda m: (not (m.isascii() and m.islower()), m))
        for m in members:
            if len(m) == 1:
                table[ord(m)] = name
    for _ in range(4):  # a class named by a sequence: fold the sequence's own letters too
        changed = False
        for code, name in table.items():
            if len(name) > 1:
                folded = name.translate(table)
                if folded != name and len(folded) < 64:
                    table[code], changed = folded, True
        if not changed:
            break
    global _FOLD_TABLE
    _FOLD_TABLE = table
    return table


@functools.cache
def _ascii_fold_table() -> dict[int, str]:
    """The part of :func:`_fold_table` for the characters a nickname may hold: the fast path."""
    table = _fold_table()
    return {ord(ch): table.get(ord(ch), ch.lower()) for ch in _NICK_CHARS}


def nick_key(nick: str) -> str:
    """The form in which two nicks are compared: case and look-alikes folded (TR39 skeleton classes).

    ``AIice``, ``alice`` and ``ALICE``, ``rn``/``m``, ``vv``/``w``, ``cl``/``d``, ``b0b``/``bob``
    share a key. Runs on every join, rename and /msg lookup, so a nickname (ASCII) takes one
    ``str.translate`` through a 64-entry table built once.
    """
    if nick.isascii():
        return nick.translate(_ascii_fold_table())
    return unicodedata.normalize("NFKC", nick).casefold().translate(_fold_table())


@functools.cache
def _reserved_keys() -> frozenset[str]:
    return frozenset(nick_key(n) for n in RESERVED_NICKS)


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
    if nick_key(nick) in _reserved_keys():
        return f"{nick!r} is reserved"
    return None


@dataclass(frozen=True, slots=True)
class Command:
    """A ``/command argument`` line; ``name`` is lower-case without the slash."""

    name: str
    arg: str


_COMMAND_RE = re.compile(r"/(\S*)\s*(.*)\Z", re.DOTALL)


def parse(line: str) -> Command | str:
    """Turn a decoded, sanitised line into a :class:`Command` or the chat text to relay.

    ``exit`` (the seed's word) is ``/quit``; ``//text`` sends ``/text`` as chat.
    """
    if line.startswith("/"):
        if line.startswith("//"):
            return line[1:]
        # Any whitespace ends the command name ("/who\t", "/msg\tbob hi"); tabs in the argument
        # are spaces, as in relayed text.
        name, arg = _COMMAND_RE.match(line).groups()  # type: ignore[union-attr]
        return Command(name.lower(), arg.replace("\t", " ").strip())
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
# Refusals of a client certificate after the handshake (invites and revocation, securechat.pki.enrollment).
CERT_REQUIRED = "this server requires a client certificate"
CERT_REVOKED = "your certificate has been revoked"
SHUTDOWN = "server shutting down"
LINE_TOO_LONG = "line too long"
SESSION = "session "  # "* session TOKEN GRACE": the answer to /session
RESUME_REFUSED = "resume refused: "
TOO_MANY = "too many connections"  # "* too many connections from IP (at most N); try again later"
# What a securechat server's first line can say: its greeting, or why it will not let this connection in.
# A client recognises it before sending anything (its nickname included), so that a service that is not
# securechat (an SMTP or IMAP server greets too, IMAP even with "* ") is told apart at once.
OPENING_NOTICES = (GREETING, SERVER_FULL, TOO_MANY, TLS_REQUIRED, CERT_REQUIRED, CERT_REVOKED, SHUTDOWN)


def is_opening(line: str) -> bool:
    """Whether ``line`` can be the first line of a securechat server (see :data:`OPENING_NOTICES`)."""
    return line.startswith(NOTICE_PREFIX) and line[len(NOTICE_PREFIX):].startswith(OPENING_NOTICES)


def welcome_nick(line: str) -> str | None:
    """The nick a ``* welcome, NICK! ...`` line confirms, or None for any other line."""
    prefix = NOTICE_PREFIX + WELCOME
    if not line.startswith(prefix):
        return None
    nick = line[len(prefix) :].split("!", 1)[0]
    return nick if NICK_RE.match(nick) else None


# A client program asks for capabilities after joining with ``/cap NAME``; people never need it,
# and clients that don't ask (ncat, openssl s_client) see nothing change. ``echo``: the server
# sends the client a copy of each of its chat, action and private lines exactly as the others get
# them, and a ``* not delivered (...): TEXT`` notice for each line it drops, so a client shows only
# what was really delivered. The answer also advertises the flood limit, which a client paces to.
CAP_COMMAND = "cap"
CAP_ECHO = "echo"
CAP_REPLY = "cap: "  # "* cap: echo on; flood 10 lines/s, burst 20" (rate 0: no limit)
NOT_DELIVERED = "not delivered"  # "* not delivered (flood control): TEXT"
NO_SUCH_NICK = "no such nick: "

_CAP_REPLY_RE = re.compile(r"\* cap: (\w+) on; flood ([0-9.]+) lines/s, burst ([0-9.]+)\Z")
_RENAMED_RE = re.compile(r"\* ([A-Za-z0-9_-]{1,%d}) is now ([A-Za-z0-9_-]{1,%d})\Z" % (MAX_NICK_CHARS, MAX_NICK_CHARS))


def cap_reply(name: str, rate: float, burst: float) -> str:
    """The server's answer to ``/cap NAME``, without the notice prefix."""
    return f"{CAP_REPLY}{name} on; flood {rate:g} lines/s, burst {burst:g}"


def parse_cap_reply(line: str) -> tuple[str, float, float] | None:
    """``(capability, flood rate, flood burst)`` from a ``* cap: ...`` line, or None for any other line."""
    m = _CAP_REPLY_RE.match(line)
    return (m.group(1), float(m.group(2)), float(m.group(3))) if m else None


def renamed(line: str) -> tuple[str, str] | None:
    """``(old, new)`` from a ``* old is now new`` notice, or None for any other line."""
    m = _RENAMED_RE.match(line)
    return (m.group(1), m.group(2)) if m else None


def is_notice(line: str) -> bool:
    """True for a server notice line."""
    return line.startswith(NOTICE_PREFIX)


_SENDER_RE = re.compile(r"\[([A-Za-z0-9_-]{1,%d})(?: -> [A-Za-z0-9_-]+)?\] " % MAX_NICK_CHARS)


def sender_of(line: str) -> str | None:
    """The nick that a relayed chat, action or private line comes from, or None."""
    m = _SENDER_RE.match(line)
    return m.group(1) if m else None


HELP_TEXT = (
    "commands: /join ROOM (join or switch), /part [ROOM], /rooms, /who [ROOM], /history [N], "
    "/nick NEW (rename), /msg NICK text (private), /me action, /help, /quit (or exit); "
    "//text sends a line starting with '/'"
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
