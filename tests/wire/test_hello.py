"""Reading the ALPN list from a ClientHello's cleartext bytes, as OpenSSL (through Python's ssl) writes them."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securechat.wire import hello


def client_hello(alpn: list[str] | None, server_hostname: str | None = "chat.lan") -> bytes:
    """The first flight of a real TLS client (OpenSSL), captured from a memory BIO."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


_REAL = client_hello(["http/1.1"])


@pytest.mark.parametrize("alpn", [["http/1.1"], ["h2", "http/1.1"], ["securechat-enroll/1"], None])
def test_the_offered_names_are_read_in_order(alpn: list[str] | None) -> None:
    data = client_hello(alpn)
    assert hello.offered_alpn(data) == tuple(alpn or ())


def test_no_sni_no_problem() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    assert hello.offered_alpn(outgoing.read()) == ("http/1.1",)


def test_a_partial_hello_asks_for_more_and_anything_else_is_nothing() -> None:
    data = client_hello(["http/1.1"])
    for cut in (0, 1, 4, 5, 40, len(data) - 1):
        assert hello.offered_alpn(data[:cut]) is None
    assert hello.offered_alpn(b"GET / HTTP/1.1\r\n") == ()
    assert hello.offered_alpn(b"\x16\x03\x01\x00\x00") == ()  # an empty record
    assert hello.offered_alpn(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == ()  # a ServerHello


@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    result = hello.offered_alpn(b"\x16\x03\x01" + data)  # an exception is the failure
    assert result is None or all(isinstance(name, str) for name in result)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=5, max_value=400), st.binary(min_size=1, max_size=8))
def test_corrupted_real_hellos_never_raise(at: int, junk: bytes) -> None:
    data = bytearray(_REAL)
    at = min(at, len(data) - 1)
    data[at:at + len(junk)] = junk
    result = hello.offered_alpn(bytes(data))
    assert result is None or isinstance(result, tuple)
