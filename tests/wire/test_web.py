"""The browser front door's codec, sans I/O: HTTP requests and the WebSocket, bytes in and bytes out.

The peer is wsproto's own client (a maintained implementation, not ours) for the WebSocket, and raw bytes
for what a browser never sends (garbage, huge heads, bodies, slowloris halves).
"""

from __future__ import annotations

import base64

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from securechat.wire import web
from securechat.wire.web import Closed, Reject, Request, ServerCodec, Text

HOST = "192.168.0.20:5555"
ORIGIN = f"https://{HOST}"


def _upgrade(client: WSConnection, origin: str | None = ORIGIN, target: str = "/ws") -> bytes:
    extra = [(b"origin", origin.encode())] if origin is not None else []
    return client.send(ws.Request(host=HOST, target=target, extra_headers=extra))


def _open() -> tuple[ServerCodec, WSConnection]:
    """A codec past the upgrade, and the client on the other end."""
    codec, client = ServerCodec(), WSConnection(ConnectionType.CLIENT)
    codec.receive_data(_upgrade(client))
    (request,) = list(codec.events())
    assert isinstance(request, Request) and request.websocket
    client.receive_data(codec.accept(request))
    assert isinstance(next(client.events()), ws.AcceptConnection)
    return codec, client


def _response(data: bytes) -> h11.Response:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", HOST)]))
    client.receive_data(data)
    event = client.next_event()
    assert isinstance(event, h11.Response)
    return event


def _headers(response: h11.Response) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in response.headers}


# -- HTTP --------------------------------------------------------------------------------------


def test_a_get_and_its_answer_carry_every_security_header_and_no_cookie() -> None:
    codec = ServerCodec()
    codec.receive_data(f"GET /app.js?v=1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    (request,) = list(codec.events())
    assert isinstance(request, Request)
    assert (request.method, request.path, request.query, request.host, request.websocket) == \
        ("GET", "/app.js", "v=1", HOST, False)
    headers = _headers(_response(codec.respond(200, b"x", host=HOST)))
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert f"wss://{HOST}" in csp and "object-src 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    assert "set-cookie" not in headers and "strict-transport-security" not in headers
    assert not codec.must_close  # kept alive for the next request


def test_keep_alive_serves_requests_in_turn_and_closes_after_the_bound() -> None:
    codec = ServerCodec(max_requests=3)
    one = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    codec.receive_data(one * 4)  # pipelined: each waits for the answer to the one before
    answered = 0
    for event in codec.events():
        assert isinstance(event, Request)
        codec.respond(200, b"ok", host=HOST)
        answered += 1
    assert answered == 3 and codec.must_close and codec.state == web.CLOSED


def test_a_head_gets_the_headers_without_the_body() -> None:
    codec = ServerCodec()
    codec.receive_data(f"HEAD / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    list(codec.events())
    out = codec.respond(200, b"hello world", host=HOST)
    assert out.endswith(b"\r\n\r\n") and b"Content-Length: 11" in out


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (web.MAX_REQUEST_HEAD + 10), 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nabcde", 413),
    (b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n\r\n", 413),
])
def test_bad_requests_are_rejected_with_a_status_and_closed(data: bytes, status: int) -> None:
    codec = ServerCodec()
    codec.receive_data(data)
    events = list(codec.events())
    assert events[:1] == [Reject(status, events[0].reason)] if events else False
    out = codec.respond(status, b"no")
    assert out.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in out
    assert codec.must_close
    assert b"Content-Security-Policy" in out  # even a refusal carries the headers


def test_a_head_that_never_ends_is_bounded_not_buffered() -> None:
    codec = ServerCodec()
    codec.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n")
    for _ in range(100):
        codec.receive_data(b"X-Slow: " + b"z" * 100 + b"\r\n")
    events = list(codec.events())
    assert isinstance(events[0], Reject) and events[0].status == 431


def test_the_peer_closing_is_an_event() -> None:
    codec = ServerCodec()
    codec.receive_data(b"")
    assert list(codec.events()) == [Closed(1006)]


@pytest.mark.parametrize("host, ok", [
    ("192.168.0.20:5555", True), ("chat.lan", True), ("[::1]:5555", True), ("[fe80::1%25eth0]:5555", True),
    ("localhost:1", True), ("evil.com/x", False), ("a b", False), ("", False), ('x"onload=1', False),
    ("a" * 300, False), ("<script>", False),
])
def test_host_headers_are_plain_names_and_ports(host: str, ok: bool) -> None:
    assert web.valid_host(host) is ok


@pytest.mark.parametrize("origin, host, ok", [
    ("https://192.168.0.20:5555", "192.168.0.20:5555", True),
    ("https://CHAT.lan:5555", "chat.lan:5555", True),
    ("http://192.168.0.20:5555", "192.168.0.20:5555", False),  # the plaintext page's origin
    ("https://evil.example", "192.168.0.20:5555", False),
    ("https://192.168.0.20:5556", "192.168.0.20:5555", False),
    ("https://192.168.0.20", "192.168.0.20:5555", False),
    ("null", "192.168.0.20:5555", False),  # a sandboxed frame or a file:// page
    (None, "192.168.0.20:5555", False),  # not a browser page
    ("https://a:1", "a:1/evil", False),
])
def test_only_the_pages_own_origin_may_open_the_websocket(origin: str | None, host: str, ok: bool) -> None:
    assert web.same_origin(origin, host) is ok


# -- the upgrade -----------------------------------------------------------------------------------


def test_a_well_formed_upgrade_is_accepted_and_leftover_bytes_are_frames() -> None:
    codec, client = ServerCodec(), WSConnection(ConnectionType.CLIENT)
    upgrade = _upgrade(client)
    codec.receive_data(upgrade)
    (request,) = list(codec.events())
    assert request.websocket and web.same_origin(request.headers["origin"], request.host)
    response = codec.accept(request)
    assert response.startswith(b"HTTP/1.1 101 ")
    client.receive_data(response)
    assert isinstance(next(client.events()), ws.AcceptConnection)  # the client checked Sec-WebSocket-Accept
    # A message sent right behind the upgrade, in the same read:
    codec2, client2 = ServerCodec(), WSConnection(ConnectionType.CLIENT)
    data = _upgrade(client2)
    codec2.receive_data(data)
    (request2,) = list(codec2.events())
    codec2.accept(request2)
    assert codec2.state == web.WEBSOCKET


@pytest.mark.parametrize("change", ["version", "key", "method", "upgrade"])
def test_a_malformed_upgrade_is_an_ordinary_request(change: str) -> None:
    key = base64.b64encode(b"0123456789abcdef").decode()
    headers = {"Host": HOST, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": key, "Origin": ORIGIN}
    method = "GET"
    if change == "version":
        headers["Sec-WebSocket-Version"] = "8"
    elif change == "key":
        headers["Sec-WebSocket-Key"] = "c2hvcnQ="  # 5 bytes, not 16
    elif change == "method":
        method = "OPTIONS"
    else:
        headers["Upgrade"] = "h2c"
    head = f"{method} /ws HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    codec = ServerCodec()
    codec.receive_data(head.encode())
    (request,) = list(codec.events())
    assert isinstance(request, Request) and not request.websocket
    out = codec.respond(426, b"no", headers=[("Upgrade", "websocket")], host=HOST)
    assert out.startswith(b"HTTP/1.1 426 ")


# -- WebSocket -----------------------------------------------------------------------------------


def test_text_messages_arrive_in_parts_and_whole() -> None:
    codec, client = _open()
    codec.receive_data(client.send(ws.Message(data="hel", message_finished=False))
                       + client.send(ws.Message(data="lo é", message_finished=True)))
    events = list(codec.events())
    assert "".join(e.text for e in events if isinstance(e, Text)) == "hello é"
    assert [e.finished for e in events if isinstance(e, Text)][-1] is True


def test_a_ping_is_answered_by_the_codec() -> None:
    codec, client = _open()
    codec.receive_data(client.send(ws.Ping(b"are you there")))
    assert list(codec.events()) == []
    client.receive_data(codec.data_to_send())
    (pong,) = list(client.events())
    assert isinstance(pong, ws.Pong) and pong.payload == b"are you there"


def test_binary_messages_close_the_websocket_with_1003() -> None:
    codec, client = _open()
    codec.receive_data(client.send(ws.BytesMessage(b"\x00\x01")))
    (closed,) = list(codec.events())
    assert isinstance(closed, Closed) and closed.code == web.UNSUPPORTED_DATA
    client.receive_data(codec.data_to_send())
    (close,) = list(client.events())
    assert isinstance(close, ws.CloseConnection) and close.code == web.UNSUPPORTED_DATA


def test_invalid_utf8_and_unmasked_frames_are_protocol_errors() -> None:
    codec, _ = _open()
    codec.receive_data(b"\x81\x82\x00\x00\x00\x00\xff\xfe")  # a masked text frame of invalid UTF-8
    (closed,) = list(codec.events())
    assert isinstance(closed, Closed) and closed.code == 1007
    codec2, _ = _open()
    codec2.receive_data(b"\x81\x02hi")  # a client's frame must be masked (RFC 6455 5.1)
    (closed2,) = list(codec2.events())
    assert isinstance(closed2, Closed) and closed2.code == 1002


def test_the_close_handshake() -> None:
    codec, client = _open()
    codec.receive_data(client.send(ws.CloseConnection(code=1001, reason="tab closed")))
    assert list(codec.events()) == [Closed(1001, "tab closed")]
    client.receive_data(codec.data_to_send())
    (reply,) = list(client.events())
    assert isinstance(reply, ws.CloseConnection)


def test_lines_leave_as_one_text_message_each() -> None:
    codec, client = _open()
    client.receive_data(web.frame_lines(b"[bob] <img src=x onerror=alert(1)>\n* carol joined\n")
                        + web.frame_lines("[é] ünïcode\n".encode()) + web.frame_close(1000, "bye"))
    got = list(client.events())
    assert [e.data for e in got if isinstance(e, ws.TextMessage)] == \
        ["[bob] <img src=x onerror=alert(1)>", "* carol joined", "[é] ünïcode"]
    assert isinstance(got[-1], ws.CloseConnection) and got[-1].reason == "bye"


def test_a_line_sent_to_many_is_framed_once() -> None:
    line = b"[bob] hi everyone\n"
    first = web.frame_lines(line)
    assert web.frame_lines(line) is first  # the same bytes object: the fan-out's case
    assert web.frame_lines(b"[bob] hi everyone\n") == first  # equal, framed again
    assert web.frame_lines(b"x" * 70000 + b"\n")[:4] == b"\x81\x7f\x00\x00"  # 64-bit length form


def test_close_reasons_get_close_codes() -> None:
    assert web.close_code_for("line too long: over 4096 bytes") == web.MESSAGE_TOO_BIG
    assert web.close_code_for("server shutting down") == web.GOING_AWAY
    assert web.close_code_for("certificate revoked") == web.POLICY_VIOLATION
    assert web.close_code_for("closed") == web.NORMAL_CLOSURE
