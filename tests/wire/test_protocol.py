"""The sans-IO protocol core (framing, sanitising, nicks, commands, formatting), then the same edges over real TLS."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securechat.server.engine import ChatServer
from securechat.wire import protocol
from securechat.wire.protocol import Command, LineBuffer, LineTooLong
from tests.conftest import LineClient

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


def test_a_full_length_line_whose_crlf_is_split_across_reads() -> None:
    buf = LineBuffer(max_line=10)
    assert buf.feed(b"x" * 10 + b"\r") == []
    assert buf.feed(b"\n") == [b"x" * 10]
    assert buf.feed(b"y" * 10 + b"\r") == []
    with pytest.raises(LineTooLong):  # a "\r" that turned out to be part of the line
        buf.feed(b"z")


@settings(max_examples=300)
@given(st.lists(st.binary(min_size=0, max_size=16).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
                max_size=10),
       st.lists(st.integers(min_value=1, max_value=20), min_size=1))
def test_lines_of_exactly_the_bound_pass_whatever_the_chunking(pads: list[bytes], sizes: list[int]) -> None:
    lines = [(pad * 16)[:16].ljust(16, b"x") for pad in pads]  # each exactly max_line bytes
    stream = b"".join(line + b"\r\n" for line in lines)
    buf = LineBuffer(max_line=16)
    got: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        got += buf.feed(stream[pos:pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    assert got == lines


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
VARIATION_SELECTORS = {chr(c) for c in range(0xFE00, 0xFE10)} | {chr(c) for c in range(0xE0100, 0xE01F0)}


def invisible(ch: str) -> bool:
    """What the README promises never reaches another user's screen."""
    return (ch in FORBIDDEN or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
            or ch in "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u2800\u3164\uffa0"
            or ch in VARIATION_SELECTORS)


def emoji_glue_is_legitimate(text: str) -> bool:
    """Each invisible left in sanitised text is a ZWJ between pictographs or one VS15/16 after a glyph."""
    for i, ch in enumerate(text):
        if ch == "\u200d":
            before = text[i - 2] if i > 1 and text[i - 1] in "\ufe0e\ufe0f" else text[i - 1] if i else ""
            after = text[i + 1] if i + 1 < len(text) else ""
            if not (before and unicodedata.category(before) in ("So", "Sk") and after
                    and unicodedata.category(after) == "So"):
                return False
        elif ch in "\ufe0e\ufe0f":
            if i == 0 or invisible(text[i - 1]):
                return False
        elif invisible(ch):
            return False
    return True


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
        # Invisible (category Cf and friends): hidden text, or text that looks like other text.
        ("pay\u200bpal", "paypal"),  # zero-width space
        ("a\u200cb\u200dc\u2060d\ufeffe\u00adf", "abcdef"),  # ZWNJ, ZWJ between letters, WJ, BOM, SHY
        ("hi\U000e0069\U000e0067\U000e006e\U000e006f\U000e0072\U000e0065", "hi"),  # tags: "ignore"
        ("ok\U000e0001", "ok"),  # language tag
        ("\u2061\u2062\u2063\u2064x", "x"),  # invisible operators
        ("a\u034fb\u3164c\u115fd\uffa0e\u2800f", "abcdef"),  # CGJ, Hangul fillers, braille blank
        ("x\ufe00\ufe01\U000e0100\U000e01ef", "x"),  # variation selectors carrying hidden bytes
        ("\u180ex\u180b", "x"),  # Mongolian vowel separator, free variation selector
        # Emoji sequences stay whole: ZWJ between pictographs, one VS16 after a visible character.
        ("👩\u200d💻 at work", "👩\u200d💻 at work"),
        ("👩🏽\u200d💻", "👩🏽\u200d💻"),  # with a skin tone
        ("❤\ufe0f\u200d🔥", "❤\ufe0f\u200d🔥"),
        ("1\ufe0f\u20e3", "1\ufe0f\u20e3"),  # keycap
        ("❤\ufe0f\ufe0f\ufe0f", "❤\ufe0f"),  # one selector, not a run
        ("👩\u200d\u200d💻", "👩\u200d💻"),
        ("👩\u200d", "👩"),  # a joiner at the end joins nothing
        ("👩\u200d\u2800x", "👩x"),  # nor one whose next pictograph was dropped
        ("🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "🏴"),  # flag of Scotland: tags
    ],
)
def test_sanitize_examples(dirty: str, clean: str) -> None:
    assert protocol.sanitize(dirty) == clean


@settings(max_examples=500)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_sanitize_never_lets_a_control_or_escape_through(text: str) -> None:
    out = protocol.sanitize(text)
    assert not FORBIDDEN & set(out)
    assert emoji_glue_is_legitimate(out)
    assert protocol.is_safe(out)
    assert protocol.sanitize(out) == out  # idempotent


@settings(max_examples=500)
@given(st.lists(st.one_of(
    st.sampled_from(["a", "b", " ", "👩", "💻", "🏽", "❤", "1", "\u20e3", "\u200d", "\u200b", "\ufe0f", "\ufe0e",
                     "\ufe00", "\U000e0041", "\U000e007f", "\u2800", "\u3164", "\u00ad", "\u2060", "\ufeff"]),
    st.characters(categories=("Cf", "Mn", "So", "Sk"))), max_size=40).map("".join))
def test_invisibles_and_emoji_glue(text: str) -> None:
    """Dense mixes of joiners, selectors, tags, pictographs: nothing invisible survives alone."""
    out = protocol.sanitize(text)
    assert emoji_glue_is_legitimate(out), (text, out)
    assert protocol.sanitize(out) == out
    visible = [ch for ch in text if not invisible(ch)]
    assert [ch for ch in out if not invisible(ch)] == visible  # only invisibles were removed


@settings(max_examples=300)
@given(st.binary(max_size=500))
def test_arbitrary_bytes_decode_and_sanitize_to_safe_text(raw: bytes) -> None:
    out = protocol.sanitize(protocol.decode(raw))
    assert "\x1b" not in out and not FORBIDDEN & set(out)


@given(st.text(alphabet=st.characters(categories=("L", "N", "P", "S", "Zs")), max_size=100))
def test_printable_text_is_kept(text: str) -> None:
    if not any(invisible(ch) for ch in text):
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


@pytest.mark.parametrize(("a", "b"), [
    ("Alice", "alice"), ("AIice", "alice"), ("ALICE", "alice"), ("b0b", "BOB"), ("l33t", "I33T"),
    ("rn", "m"), ("jirn", "jim"), ("RN", "m"), ("vv", "w"), ("VVill", "will"), ("cl", "d"), ("cIaire", "daire"),
    ("a1ice", "alice"),
])
def test_lookalike_nicks_collide(a: str, b: str) -> None:
    assert protocol.nick_key(a) == protocol.nick_key(b)


@pytest.mark.parametrize(("a", "b"), [("alice", "alicia"), ("sam", "fam"), ("bob", "rob"), ("ann", "anna")])
def test_different_nicks_stay_different(a: str, b: str) -> None:
    assert protocol.nick_key(a) != protocol.nick_key(b)


def test_the_fold_comes_from_the_unicode_confusables_data() -> None:
    """Rows nobody would hand-write: Cyrillic, Greek and mathematical look-alikes of Latin letters."""
    assert protocol.nick_key("\u0430lice") == protocol.nick_key("alice")  # Cyrillic a
    assert protocol.nick_key("b\u03bfb") == protocol.nick_key("bob")  # Greek omicron
    assert protocol.nick_key("\u217e") == protocol.nick_key("d")  # SMALL ROMAN NUMERAL FIVE HUNDRED
    assert len(protocol._fold_table()) > 5000


@given(st.from_regex(protocol.NICK_RE, fullmatch=True))
def test_nick_key_is_a_fixed_point_and_ignores_case(nick: str) -> None:
    key = protocol.nick_key(nick)
    assert protocol.nick_key(key) == key
    assert protocol.nick_key(nick.upper()) == protocol.nick_key(nick.lower()) == key
    assert protocol.nick_key(nick) == protocol.unicodedata.normalize("NFKC", nick).casefold().translate(
        protocol._fold_table())  # the ASCII fast path agrees with the general one


def test_nick_key_is_cheap() -> None:
    protocol.nick_key("warm-up")
    start = time.perf_counter()
    for _ in range(10_000):
        protocol.nick_key("Alice_Wonderland-42")
    assert time.perf_counter() - start < 0.5  # ~1 us each; 50 us would still pass


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
        ("/who\t", Command("who", "")),
        ("/who \t ", Command("who", "")),
        ("/msg\tbob\thi", Command("msg", "bob hi")),
        ("/nick\u3000bob", Command("nick", "bob")),  # any Unicode whitespace
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


# -- the same edges over real TLS sockets -----------------------------------------------------


def test_a_4096_byte_line_whose_cr_and_lf_arrive_in_different_tls_records(serve: Callable[..., ChatServer],
                                                                           connect: Callable[..., LineClient]
                                                                           ) -> None:
    server = serve()
    alice, bob = connect(server, "alice"), connect(server, "bob")
    alice.expect("* bob joined")
    line = "x" * protocol.MAX_LINE_BYTES
    alice.send((line + "\r").encode())  # one TLS record...
    time.sleep(0.2)  # ...read by the server on its own
    alice.send(b"\n")  # and the newline in the next record
    assert bob.expect("[alice] ") == f"[alice] {line}"
    alice.send("still here")
    assert bob.expect("[alice] ") == "[alice] still here"


def test_invisible_characters_are_not_relayed(serve: Callable[..., ChatServer],
                                              connect: Callable[..., LineClient]) -> None:
    server = serve()
    alice, bob = connect(server, "alice"), connect(server, "bob")
    alice.expect("* bob joined")
    alice.send("pay\u200bpal\u2060 \U000e0068\U000e0069hi\ufeff 👩\u200d💻")
    assert bob.expect("[alice] ") == "[alice] paypal hi 👩\u200d💻"
    alice.send("/me waves\u200b\u200d")
    assert bob.expect("[alice] ") == "[alice] * waves"
    alice.send("/msg bob psst\u2062")
    assert bob.expect("[alice -> bob] ") == "[alice -> bob] psst"


def test_commands_take_any_whitespace(serve: Callable[..., ChatServer], connect: Callable[..., LineClient]) -> None:
    server = serve()
    alice, bob = connect(server, "alice"), connect(server, "bob")
    alice.expect("* bob joined")
    alice.send("/who\t")
    assert alice.expect("* ").startswith("* 2 online: ")
    alice.send("/msg\tbob\thello")
    assert bob.expect("[alice -> bob] ") == "[alice -> bob] hello"


@pytest.mark.parametrize(("first", "second"), [("m", "rn"), ("will", "VViII"), ("dan", "clan"), ("alice", "AIice")])
def test_lookalike_nick_is_refused_by_the_server(first: str, second: str, serve: Callable[..., ChatServer],
                                                 connect: Callable[..., LineClient]) -> None:
    server = serve()
    connect(server, first)
    other = connect(server)
    other.expect("* securechat: send your nickname")
    other.send(second)
    assert other.expect("* nickname refused").startswith("* nickname refused: ")


def test_sessions_joining_at_once_share_one_look_alike_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table is built once even when many first joins race for it (each used to build its own)."""
    import threading

    monkeypatch.setattr(protocol, "_FOLD_TABLE", None)
    built: list[int] = []
    real_build = protocol._build_fold_table

    def counting_build() -> dict[int, str]:
        built.append(1)
        return real_build()

    monkeypatch.setattr(protocol, "_build_fold_table", counting_build)
    start = threading.Barrier(16)
    tables: list[dict[int, str]] = []

    def first_join() -> None:
        start.wait()
        tables.append(protocol._fold_table())

    threads = [threading.Thread(target=first_join) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    assert all(table is tables[0] for table in tables)
