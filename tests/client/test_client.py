"""ChatClient, the library: real ChatServers on 127.0.0.1, real TLS with trustme certificates.

The fixtures here are imported by test_client_cli.py and test_client_pty.py too (a shared
conftest.py belongs to others).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from securechat.client.chat import ChatClient
from securechat.client.errors import ChatError, NickRefused, ServerFull
from securechat.client.frontend import nick_style, own_echo
from securechat.server.engine import ChatServer
from securechat.wire import tls


@dataclass
class Certs:
    dir: Path
    ca: Path  # the CA that signed server.pem
    server: Path  # cert chain + key for localhost and 127.0.0.1
    other_ca: Path  # a second, unrelated CA
    wrong_name: Path  # signed by ``ca`` but only for other.example

    def server_context(self, pem: Path | None = None) -> ssl.SSLContext:
        pem = pem or self.server
        return tls.server_context(pem, pem)

    def client_context(self) -> ssl.SSLContext:
        return tls.client_context(self.ca)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    server.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.issue_cert("other.example").private_key_and_cert_chain_pem.write_to_path(str(d / "wrong_name.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other_ca.pem"))
    return Certs(d, d / "ca.pem", d / "server.pem", d / "other_ca.pem", d / "wrong_name.pem")


Served = tuple[ChatServer, int]
StartServer = Callable[..., Served]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start ChatServers on 127.0.0.1 port 0 in background threads; all shut down afterwards."""
    servers: list[ChatServer] = []

    def start(ssl_context: ssl.SSLContext | None, **kwargs: object) -> tuple[ChatServer, int]:
        server = ChatServer("127.0.0.1", 0, ssl_context, **kwargs)  # type: ignore[arg-type]
        _, port = server.start()
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        server.shutdown(timeout=1.0)


@pytest.fixture
def tls_server(certs: Certs, start_server: StartServer) -> Served:
    return start_server(certs.server_context())


def peer(port: int, nick: str, certs: Certs | None) -> ChatClient:
    """A registered library client (TLS when ``certs`` is given)."""
    client = ChatClient()
    client.connect("127.0.0.1", port, ssl_context=certs.client_context() if certs else None, timeout=5)
    assert client.register(nick, timeout=5) == nick
    return client


def expect(client: ChatClient, wanted: str | Callable[[str], bool], timeout: float = 5.0) -> str:
    """Read lines until one equals ``wanted`` (or satisfies it); fail with what came instead."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = client.recv_line(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            if client.closed:
                break
            continue
        seen.append(line)
        if (line == wanted) if isinstance(wanted, str) else wanted(line):
            return line
    raise AssertionError(f"never got {wanted!r}; got {seen!r} (closed={client.closed})")


# -- the library -------------------------------------------------------------------------------


def test_two_clients_chat_over_tls(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    bob = peer(port, "bob", certs)
    alice = peer(port, "alice", certs)
    try:
        assert alice.tls and alice.nick == "alice"
        expect(bob, "* alice joined")
        alice.send("hello bob")
        expect(bob, "[alice] hello bob")
        bob.send("/msg alice psst")
        expect(alice, "[bob -> alice] psst")
        assert alice.recv_line(timeout=0.05) is None and not alice.closed
    finally:
        alice.quit()
        bob.close()
    assert alice.closed


def test_plain_clients_chat(start_server: StartServer) -> None:
    _, port = start_server(None)
    with peer(port, "bob", None) as bob, peer(port, "alice", None) as alice:
        alice.send("in the clear")
        expect(bob, "[alice] in the clear")


def test_refused_nick_can_be_retried_on_the_same_connection(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    with peer(port, "bob", certs):
        client = ChatClient()
        client.connect("127.0.0.1", port, ssl_context=certs.client_context(), timeout=5)
        with client:
            with pytest.raises(NickRefused) as info:
                client.register("BOB")  # nicks compare case-insensitively
            assert "taken" in info.value.reason and "send another" not in info.value.reason
            with pytest.raises(NickRefused, match="reserved"):
                client.register("admin")
            assert client.register("carol") == "carol"


def test_on_line_callback_gets_lines_after_registration(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    got: list[str] = []
    arrived = threading.Event()

    def on_line(line: str) -> None:
        got.append(line)
        if line == "[bob] hi":
            arrived.set()

    alice = ChatClient(on_line=on_line)
    alice.connect("127.0.0.1", port, ssl_context=certs.client_context())
    with alice, peer(port, "bob", certs) as bob:
        alice.register("alice")
        assert got and got[0].startswith("* welcome, alice!")  # the welcome is delivered too
        bob.send("hi")
        assert arrived.wait(5), got


def test_server_shutdown_ends_the_connection(certs: Certs, tls_server: Served) -> None:
    server, port = tls_server
    alice = peer(port, "alice", certs)
    server.shutdown()
    expect(alice, "* server shutting down")
    assert alice.wait_closed(5)
    assert alice.recv_line(timeout=1) is None
    assert alice.server_shut_down and alice.end_message() == "the server shut down"
    assert not alice.send("anyone?")
    alice.close()


def test_server_full(certs: Certs, start_server: StartServer) -> None:
    _, port = start_server(certs.server_context(), max_clients=1)
    with peer(port, "bob", certs):
        client = ChatClient()
        client.connect("127.0.0.1", port, ssl_context=certs.client_context())
        with client, pytest.raises(ServerFull, match="server full"):
            client.wait_greeting(5)


def test_connect_errors_are_chat_errors(certs: Certs, start_server: StartServer) -> None:
    _, plain_port = start_server(None)
    with pytest.raises(ChatError, match="server probably runs without encryption"):
        ChatClient().connect("127.0.0.1", plain_port, ssl_context=certs.client_context(), timeout=5)
    _, tls_port = start_server(certs.server_context())
    with pytest.raises(ChatError, match="not signed by the CA"):
        ChatClient().connect("127.0.0.1", tls_port, ssl_context=tls.client_context(certs.other_ca), timeout=5)
    # server_hostname decides which name the certificate must carry
    with pytest.raises(ChatError, match="not valid for 'other.example'"):
        ChatClient().connect("127.0.0.1", tls_port, ssl_context=certs.client_context(),
                             server_hostname="other.example", timeout=5)


# -- display helpers ---------------------------------------------------------------------------


def test_nick_colours_are_stable_and_case_blind() -> None:
    assert nick_style("alice") == nick_style("Alice") == nick_style("alice")
    assert len({nick_style(f"user{i}") for i in range(50)}) > 3  # the palette is actually used


def test_received_lines_are_shown_as_literal_sanitised_text() -> None:
    from securechat.client.ui import Display

    def fragments(line: str) -> list[tuple[str, str]]:
        return Display(lambda: "carol", timestamps=False).render(line).fragments

    assert fragments("* bob joined") == [("italic fg:ansibrightblack", "* bob joined"), ("", "\n")]
    chat = fragments("[bob] <b>bold</b> \x1b[31mred\x1b[0m")
    assert "".join(text for _, text in chat) == "[bob] <b>bold</b> red\n"
    assert chat[1] == (nick_style("bob"), "bob")
    private = fragments("[bob -> alice] hi")
    assert "".join(t for _, t in private) == "[bob -> alice] hi\n" and private[1] == (nick_style("bob"), "bob")
    assert fragments("no sender here") == [("", "no sender here"), ("", "\n")]


def test_own_echo() -> None:
    assert own_echo("alice", "hi") == "[alice] hi"
    assert own_echo("alice", "//not a command") == "[alice] /not a command"
    assert own_echo("alice", "/me waves") == "[alice] * waves"
    assert own_echo("alice", "/msg bob psst") == "[alice -> bob] psst"
    assert own_echo("alice", "/who") is None
    assert own_echo("alice", "   ") is None
