"""The sans-IO protocol core: framing, sanitising, nicks, commands, formatting. No network."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securechat import protocol
from securechat.protocol import Command, LineBuffer, LineTooLong

# -- framing --------------------------------------------------------------------------------


def test_lines_split_across_reads_and_crlf_stripped() -> None:
    buf = LineBuffer()
    assert buf.feed(b"hel") == []
    assert buf.feed(b"lo\r\nworld\npart") == [b"hello", b"world"]
    assert buf.partial == b"part"
    assert buf.feed(b"ial\n") == [b"partial"]


def test_line_over_the_bound_is_refused_before_its_newline() -> None:
    buf = LineBuffer(max_line=10)
    assert buf.feed(b"x" * 10) == []
    with pytest.raises(LineTooLong):
        buf.feed(b"y")


def test_complete_line_over_the_bound_is_refused() -> None:
    with pytest.raises(LineTooLong):
        LineBuffer(max_line=4).feed(b"12345\n")


def test_ten_megabytes_without_newline_never_held_beyond_the_bound() -> None:
    buf = LineBuffer()
    chunk = b"a" * 16384
    with pytest.raises(LineTooLong):
        for _ in range(640):
            buf.feed(chunk)
            assert len(buf.partial) <= protocol.MAX_LINE_BYTES


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1))
def test_framing_recovers_lines_whatever_the_chunking(lines: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    buf = LineBuffer(max_line=1000)
    got: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        size = sizes[i % len(sizes)]
        got += buf.feed(stream[pos : pos + size])
        pos += size
        i += 1
    expected = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    assert got == expected
    assert buf.partial == b""


@given(st.binary(max_size=2000))
def test_decode_never_raises(raw: bytes) -> None:
    assert isinstance(protocol.decode(raw), str)


# -- sanitising ------------------------------------------------------------------------------

FORBIDDEN = {chr(c) for c in range(0x20)} | {chr(c) for c in range(0x7F, 0xA0)} | set(protocol.BIDI_CONTROLS) | {
    "\u2028", "\u2029"}


@pytest.mark.parametrize(
    ("dirty", "clean"),
    [
        ("\x1b[2Jcleared", "cleared"),
        ("\x1b]0;owned\x07title", "title"),
        ("\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("bell\x07", "bell"),
        ("tab\there", "tab here"),
        ("\x9b31mred", "red"),
        ("evil\u202egnp.exe", "evilgnp.exe"),
        ("\x1bcreset", "reset"),
        ("a\rb", "ab"),
        ("plain text, émoji 🎉", "plain text, émoji 🎉"),
    ],
)
def test_sanitize_examples(dirty: str, clean: str) -> None:
    assert protocol.sanitize(dirty) == clean


@settings(max_examples=500)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_sanitize_never_lets_a_control_or_escape_through(text: str) -> None:
    out = protocol.sanitize(text)
    assert not FORBIDDEN & set(out)
    assert protocol.is_safe(out)
    assert protocol.sanitize(out) == out  # idempotent


@settings(max_examples=300)
@given(st.binary(max_size=500))
def test_arbitrary_bytes_decode_and_sanitize_to_safe_text(raw: bytes) -> None:
    out = protocol.sanitize(protocol.decode(raw))
    assert "\x1b" not in out and not FORBIDDEN & set(out)


@given(st.text(alphabet=st.characters(categories=("L", "N", "P", "S", "Zs")), max_size=100))
def test_printable_text_is_kept(text: str) -> None:
    if all(ch not in FORBIDDEN and unicodedata.category(ch) not in ("Cc", "Cf") for ch in text):
        assert protocol.sanitize(text) == text


# -- nicks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("nick", ["alice", "Bob_2", "x", "a" * 24, "dash-ed"])
def test_good_nicks(nick: str) -> None:
    assert protocol.nick_error(nick) is None


@pytest.mark.parametrize(
    ("nick", "why"),
    [
        ("", "empty"),
        ("a" * 25, "at most 24"),
        ("has space", "letters"),
        ("\x1b[31mred", "letters"),
        ("ünï", "letters"),
        ("Server", "reserved"),
        ("ADMIN", "reserved"),
        ("r00t", "reserved"),
        ("[alice]", "letters"),
        ("*", "letters"),
    ],
)
def test_bad_nicks(nick: str, why: str) -> None:
    error = protocol.nick_error(nick)
    assert error is not None and why in error


def test_lookalike_nicks_collide() -> None:
    assert protocol.nick_key("Alice") == protocol.nick_key("alice")
    assert protocol.nick_key("AIice") == protocol.nick_key("alice")  # capital i for l
    assert protocol.nick_key("b0b") == protocol.nick_key("BOB")
    assert protocol.nick_key("alice") != protocol.nick_key("alicia")


# -- commands and formatting ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("hello", "hello"),
        ("/nick bob", Command("nick", "bob")),
        ("/MSG bob  hi there ", Command("msg", "bob  hi there")),
        ("/who", Command("who", "")),
        ("//not a command", "/not a command"),
        ("exit", Command("quit", "")),
        ("/quit", Command("quit", "")),
        ("exit stage left", "exit stage left"),
    ],
)
def test_parse(line: str, parsed: object) -> None:
    assert protocol.parse(line) == parsed


def test_formats() -> None:
    assert protocol.chat("nickname1", "Hello, how are you?") == b"[nickname1] Hello, how are you?\n"
    assert protocol.action("bob", "waves") == b"[bob] * waves\n"
    assert protocol.private("a", "b", "psst") == b"[a -> b] psst\n"
    assert protocol.notice("bob joined") == b"* bob joined\n"


def test_client_side_recognisers() -> None:
    assert protocol.welcome_nick("* welcome, alice! 2 online: alice, bob.") == "alice"
    assert protocol.welcome_nick("[alice] * welcome, mallory!") is None
    assert protocol.sender_of("[bob] hi") == "bob"
    assert protocol.sender_of("[bob -> alice] psst") == "bob"
    assert protocol.sender_of("* bob joined") is None
    assert protocol.is_notice("* server shutting down")


@settings(max_examples=300)
@given(st.from_regex(protocol.NICK_RE, fullmatch=True), st.text(max_size=200))
def test_no_relayed_line_can_pass_for_a_notice(nick: str, text: str) -> None:
    for line in (protocol.chat(nick, text), protocol.action(nick, text), protocol.private(nick, "x", text)):
        assert not line.startswith(protocol.NOTICE_PREFIX.encode())


# -- flood control --------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = protocol.TokenBucket(rate=10, burst=20, now=0.0)
    assert all(bucket.allow(0.0) for _ in range(20))
    assert not bucket.allow(0.0)
    assert bucket.allow(0.1)  # one token back after 1/rate seconds
    assert not bucket.allow(0.1)
    assert all(bucket.allow(100.0) for _ in range(20))  # refills to the burst, no further
    assert not bucket.allow(100.0)


def test_token_bucket_off() -> None:
    bucket = protocol.TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.allow(0.0) for _ in range(1000))
