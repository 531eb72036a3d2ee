"""The file-transfer protocol without a network: frames split anywhere, garbage, hostile names, sizes, tickets."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securechat.wire import filexfer, protocol
from securechat.wire.filexfer import Control, Data, Decoder, FrameError


def _frames() -> tuple[bytes, list[object]]:
    payload = os.urandom(70_000)
    stream = (filexfer.control(op="put", ticket="T" * 22) + filexfer.data_header(len(payload)) + payload
              + filexfer.data_header(0) + filexfer.control(op="end", sha256="0" * 64))
    return stream, [{"op": "put", "ticket": "T" * 22}, payload, {"op": "end", "sha256": "0" * 64}]


def _collect(events: list[filexfer.Event]) -> list[object]:
    """Data pieces joined, controls as dicts, in order."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Data):
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(bytes(event.data))
        else:
            assert isinstance(event, Control)
            out.append(event.msg)
    return out


def test_a_stream_decodes_to_its_messages_and_bytes() -> None:
    stream, expected = _frames()
    assert _collect(Decoder().feed(stream)) == expected


@given(st.lists(st.integers(min_value=1, max_value=5000), max_size=40))
def test_frames_split_at_any_points_decode_the_same(cuts: list[int]) -> None:
    stream, expected = _frames()
    decoder, events, pos = Decoder(), [], 0
    for cut in cuts:
        events += decoder.feed(stream[pos:pos + cut])
        pos += cut
    events += decoder.feed(stream[pos:])
    assert _collect(events) == expected
    assert decoder.idle


@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=20_000)), max_size=40))
def test_a_receiver_taking_frame_bytes_itself_gets_the_same_stream(steps: list[tuple[bool, int]]) -> None:
    """What the downloading client does: inside a data frame it reads up to ``data_left`` bytes into a
    buffer of its own and calls ``skip``; elsewhere it feeds the decoder. Same bytes, same messages."""
    stream, expected = _frames()
    decoder, events, pos = Decoder(), [], 0
    for direct, n in [*steps, (False, len(stream))]:
        if direct and decoder.data_left:
            n = min(n, decoder.data_left)
            decoder.skip(n)
            events.append(Data(stream[pos:pos + n]))
        else:
            events += decoder.feed(stream[pos:pos + n])
        pos += n
    assert _collect(events) == expected
    assert decoder.idle


def test_skipping_past_the_frame_is_refused() -> None:
    decoder = Decoder()
    decoder.feed(filexfer.data_header(10) + b"abc")
    assert decoder.data_left == 7
    with pytest.raises(ValueError, match="skip"):
        decoder.skip(8)
    decoder.skip(7)
    assert decoder.idle and decoder.data_left == 0


def test_one_byte_at_a_time() -> None:
    stream, expected = _frames()
    decoder = Decoder()
    events = [e for i in range(len(stream)) for e in decoder.feed(stream[i:i + 1])]
    assert _collect(events) == expected


@pytest.mark.parametrize("garbage, words", [
    (b"GET / HTTP/1.1\r\n\r\n", "unknown frame type"),
    (filexfer.HEADER.pack(b"C", 9) + b"not json!", "not JSON"),
    (filexfer.HEADER.pack(b"C", 2) + b"[]", "not a JSON object"),
    (filexfer.HEADER.pack(b"C", filexfer.MAX_CONTROL + 1), "control message of"),
    (filexfer.HEADER.pack(b"D", filexfer.MAX_CHUNK + 1), "data frame of"),
    (filexfer.HEADER.pack(b"C", 2) + b"\xff\xfe", "not JSON"),
])
def test_garbage_is_refused_in_words(garbage: bytes, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        Decoder().feed(garbage)


def test_a_huge_declared_control_message_costs_no_memory() -> None:
    decoder = Decoder()
    with pytest.raises(FrameError):
        decoder.feed(filexfer.HEADER.pack(b"C", 1 << 31))


def test_fields_are_checked() -> None:
    assert filexfer.field_int({"offset": 5}, "offset") == 5
    for bad in ({"offset": -1}, {"offset": "5"}, {"offset": True}, {"offset": 1.5}, {}):
        with pytest.raises(FrameError):
            filexfer.field_int(bad, "offset")
    with pytest.raises(FrameError):
        filexfer.field_str({"sha256": "XYZ"}, "sha256", filexfer.SHA256_RE)


def test_an_error_frame_is_one_sanitised_line() -> None:
    msg = json.loads(filexfer.error("disk \x1b[2J full\nnext")[filexfer.HEADER.size:])
    assert msg == {"error": "disk  fullnext"}


# -- hostile names ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ("report.pdf", "report.pdf"),
    ("../../etc/passwd", "etc_passwd"),
    ("..", "file"),
    ("a/b\\c", "a_b_c"),
    ("/etc/shadow", "etc_shadow"),
    ("\x1b[2J\x1b]0;pwned\x07evil.txt", "evil.txt"),
    ("invoice\u202egpj.exe", "invoicegpj.exe"),  # the bidi override that shows it as "exe.jpg"
    ("zero\u200bwidth.txt", "zerowidth.txt"),
    ("x (1 KiB): /get abcdefghjk", "x (1 KiB)_ _get abcdefghjk"),  # cannot imitate the room's line
    (".bashrc", "bashrc"),
    ("-rf", "rf"),
    ("  many   spaces\tand\ttabs  ", "many spaces and tabs"),
    ("CON", "_CON"),
    ("nul.txt", "_nul.txt"),
    ("name. . .", "name"),
    ("", "file"),
    ("\x00\x01\x02", "file"),
    ("Ce\u0301line.txt", "C\u00e9line.txt"),  # NFC
    ("👩‍💻 notes.md", "👩‍💻 notes.md"),
])
def test_hostile_names_become_harmless(raw: str, clean: str) -> None:
    assert filexfer.clean_name(raw) == clean


def test_a_long_name_keeps_its_extension_and_the_bound() -> None:
    name = filexfer.clean_name("x" * 500 + ".tar.gz")
    assert len(name) <= filexfer.MAX_NAME_CHARS and name.endswith(".gz") and name.startswith("xxx")
    assert len(filexfer.clean_name("é" * 1000)) == filexfer.MAX_NAME_CHARS


@given(st.text(max_size=300))
def test_any_name_is_one_safe_name(raw: str) -> None:
    name = filexfer.clean_name(raw)
    assert name and len(name) <= filexfer.MAX_NAME_CHARS
    assert "/" not in name and "\\" not in name and ":" not in name and name not in (".", "..")
    assert not name.startswith((".", "-")) and protocol.is_safe(name)
    assert filexfer.clean_name(name) == name  # cleaning is stable: what the server shows, the client saves


# -- sizes, ids, tickets -------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("100M", 100 << 20), ("1G", 1 << 30), ("512k", 512 << 10), ("7", 7),
                                         ("2GiB", 2 << 30), ("3 MB", 3 << 20), ("0", 0)])
def test_sizes_parse(text: str, value: int) -> None:
    assert filexfer.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5G", "1e9", "nan", "0x10", "1,5", "9" * 40, "5X"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        filexfer.parse_size(text)


def test_human_sizes() -> None:
    assert [filexfer.human_size(n) for n in (1, 12, 2048, int(2.1 * (1 << 20)), 256 << 20, 3 << 30)] == \
        ["1 byte", "12 bytes", "2.0 KiB", "2.1 MiB", "256 MiB", "3.0 GiB"]


def test_ids_are_random_and_unambiguous() -> None:
    ids = {filexfer.new_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(filexfer.ID_RE.match(i) for i in ids)
    assert not set("".join(ids)) & set("01ilo")


def test_ticket_lines_round_trip() -> None:
    token = filexfer.new_ticket()
    assert filexfer.parse_ticket_reply("* " + filexfer.ticket_ok("t1", token)) == ("t1", token, "")
    assert filexfer.parse_ticket_reply("* " + filexfer.ticket_refused("t2", "over your quota")) == \
        ("t2", None, "over your quota")
    for line in ("[bob] * ticket t1 ok " + token, "* ticket t1 ok short", "* ticket bad/tag ok " + token,
                 "* ticket t1 maybe"):
        assert filexfer.parse_ticket_reply(line) is None
    assert filexfer.put_request("t3", "#dev", 10, "a b.txt") == "/ticket put t3 #dev 10 a b.txt"
    assert filexfer.put_request("t3", "", 10, "x") == "/ticket put t3 - 10 x"
