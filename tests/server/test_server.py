"""The chat server over real sockets on 127.0.0.1, with real TLS (trustme certificates)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from securechat.server.engine import ChatServer
from tests.conftest import LOOPBACK, LineClient

Serve = Callable[..., ChatServer]
Connect = Callable[..., LineClient]


def test_relay_no_echo_and_join_leave(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    assert alice.expect("* bob") == "* bob joined"
    carol = connect(server, "carol")
    alice.expect("* carol joined")
    bob.expect("* carol joined")

    alice.send("Hello, how are you?")
    assert bob.readline() == "[alice] Hello, how are you?"
    assert carol.readline() == "[alice] Hello, how are you?"
    assert alice.lines_until_quiet() == []  # no echo to the sender

    carol.send("/quit")
    carol.expect("* goodbye")
    assert alice.readline() == "* carol left"
    assert bob.readline() == "* carol left"


def test_commands(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")

    alice.send("/who")
    assert alice.readline() == "* 2 online: alice, bob"

    alice.send("/msg bob psst")
    assert bob.readline() == "[alice -> bob] psst"
    alice.send("/msg nobody_here hi")
    assert alice.readline() == "* no such nick: nobody_here"

    alice.send("/me waves")
    assert bob.readline() == "[alice] * waves"

    alice.send("/nick alicia")
    assert bob.readline() == "* alice is now alicia"
    assert alice.readline() == "* alice is now alicia"
    alice.send("hi")
    assert bob.readline() == "[alicia] hi"

    bob.send("/nick ALICIA")
    assert bob.readline().startswith("* nickname refused: 'ALICIA' is taken")

    bob.send("//slash")
    assert alice.readline() == "[bob] /slash"
    bob.send("/frobnicate")
    assert bob.readline().startswith("* unknown command /frobnicate")
    bob.send("/help")
    assert "/msg NICK text" in bob.readline()


def test_the_welcome_names_the_people_online_only_while_they_are_few(
        serve: Serve, connect: Connect, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past WELCOME_NICKS the welcome gives the count: a line naming thousands would outgrow the line
    bound clients enforce, and naming everyone to each arrival is quadratic."""
    from securechat.server import session

    monkeypatch.setattr(session, "WELCOME_NICKS", 2)
    server = serve()
    connect(server, "alice")
    bob = connect(server)
    bob.expect("* securechat: send your nickname")
    bob.send("bob")
    assert bob.readline() == "* welcome, bob! 2 online: alice, bob. /help lists commands"
    carol = connect(server)
    carol.expect("* securechat: send your nickname")
    carol.send("carol")
    assert carol.readline() == "* welcome, carol! 3 online (/who lists them). /help lists commands"
    carol.send("/who")
    assert carol.readline() == "* 3 online: alice, bob, carol"


def test_nick_refusals_then_acceptance(serve: Serve, connect: Connect) -> None:
    server = serve()
    connect(server, "alice")
    newcomer = connect(server)
    newcomer.expect("* securechat: send your nickname")
    for bad, why in [("Alice", "taken"), ("AIice", "taken"), ("bad nick", "letters"), ("x" * 25, "at most"),
                     ("server", "reserved"), ("", "empty")]:
        newcomer.send(bad)
        line = newcomer.readline()
        assert line.startswith("* nickname refused: ") and why in line, (bad, line)
    newcomer.send("bob")
    assert newcomer.readline().startswith("* welcome, bob! 2 online: alice, bob")


def test_text_is_sanitised_and_invalid_utf8_survives(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    bob.send("\x1b[2J\x1b]0;pwned\x07clear\u202eevil\x9b1m\x07")
    assert alice.readline() == "[bob] clearevil"
    bob.send(b"caf\xc3\xa9 \xff\xfe broken\n")
    assert alice.readline() == "[bob] caf\u00e9 \ufffd\ufffd broken"
    bob.send("still here")
    assert alice.readline() == "[bob] still here"


def test_oversize_line_disconnects_only_its_sender(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    mallory = connect(server, "mallory")
    alice.expect("* mallory joined")
    try:
        mallory.send(b"A" * (10 * 1024 * 1024))  # 10 MB, no newline
    except OSError:
        pass  # the server may cut us off before we finish sending
    assert alice.expect("* mallory left").startswith("* mallory left (line too long")
    bob = connect(server, "bob")
    bob.send("fine")
    alice.expect("[bob] fine")


def test_plaintext_client_to_tls_port_gets_an_explanation(serve: Serve, connect: Connect) -> None:
    server = serve()
    plain = connect(server, tls=False)
    plain.send("alice")
    line = plain.readline()
    assert line.startswith("* this server requires TLS")
    with pytest.raises(EOFError):
        plain.readline()


def test_tls_client_to_plain_server_fails_handshake(serve: Serve, connect: Connect) -> None:
    import ssl

    server = serve(tls=False)
    with pytest.raises(ssl.SSLError):
        connect(server, tls=True)


def test_plain_mode_chats(serve: Serve, connect: Connect) -> None:
    server = serve(tls=False)
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    bob.send("clear text")
    assert alice.readline() == "[bob] clear text"


def _reset(client: LineClient) -> None:
    """Close with an RST instead of a FIN, as a killed process behind a firewall might."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def test_abrupt_disconnects_are_removed_and_the_rest_go_on(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    carol = connect(server, "carol")
    alice.expect("* carol joined")
    _reset(bob)
    assert alice.expect("* bob left").startswith("* bob left (")
    carol.sock.sendall(b"half a line without newl")
    carol.sock.close()
    alice.expect("* carol left")
    dave = connect(server, "dave")
    dave.send("anyone?")
    assert alice.expect("[dave]") == "[dave] anyone?"
    assert server.client_count == 2


def test_server_full(serve: Serve, connect: Connect) -> None:
    server = serve(max_clients=2)
    connect(server, "alice")
    connect(server, "bob")
    third = connect(server)
    assert third.readline().startswith("* server full (2 clients)")
    with pytest.raises(EOFError):
        third.readline()


def test_per_address_limit(serve: Serve, connect: Connect) -> None:
    server = serve(max_per_ip=2)
    connect(server, "alice")
    connect(server, "bob")
    third = connect(server)
    assert third.readline().startswith("* too many connections from 127.0.0.1")


def test_login_timeout(serve: Serve, connect: Connect) -> None:
    server = serve(login_timeout=0.5)
    idle = connect(server)
    idle.expect("* securechat: send your nickname")
    assert idle.readline(timeout=5).startswith("* no nickname within 0.5 s")
    with pytest.raises(EOFError):
        idle.readline(timeout=5)


def test_flood_is_dropped_but_a_calm_client_gets_through(serve: Serve, connect: Connect) -> None:
    server = serve(flood_rate=5, flood_burst=5)
    alice = connect(server, "alice")
    flooder = connect(server, "flooder")
    calm = connect(server, "calm")
    alice.expect("* calm joined")
    flooder.send(b"".join(b"spam %d\n" % i for i in range(50)))
    calm.send("hello")
    got = alice.lines_until_quiet(0.5)
    assert "[calm] hello" in got
    spam = [line for line in got if line.startswith("[flooder]")]
    assert 1 <= len(spam) <= 5  # the burst, less the token the nickname line spent
    assert flooder.expect("* slow down").startswith("* slow down: at most 5 lines a second")


def test_persistent_flooder_is_disconnected(serve: Serve, connect: Connect) -> None:
    server = serve(flood_rate=1, flood_burst=1)
    alice = connect(server, "alice")
    flooder = connect(server, "flooder")
    alice.expect("* flooder joined")
    flooder.send(b"x\n" * 500)
    assert alice.expect("* flooder left").startswith("* flooder left")


def test_shutdown_notifies_everyone(server_ctx: object, connect: Connect) -> None:
    server = ChatServer(LOOPBACK, 0, server_ctx)  # type: ignore[arg-type]
    server.start()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    started = time.monotonic()
    server.shutdown()
    assert time.monotonic() - started < 2
    for client in (alice, bob):
        assert client.expect("* server") == "* server shutting down"
        with pytest.raises(EOFError):
            client.readline()


def test_never_handshaking_connections_do_not_delay_others(serve: Serve, connect: Connect) -> None:
    server = serve()
    threads = len(os.listdir("/proc/self/task"))
    silent = [socket.create_connection((LOOPBACK, server.address[1])) for _ in range(50)]
    try:
        started = time.monotonic()
        alice = connect(server, "alice")
        bob = connect(server, "bob")
        alice.send("not delayed")
        assert bob.readline() == "[alice] not delayed"
        # A serial accept loop, or a handshake blocking a shared thread, would take 50 x 10 s here.
        assert time.monotonic() - started < 5
        # The silent ones wait in their loops' tables, and the chatters too: no thread of their own.
        assert server.connection_count == 52
        assert len(os.listdir("/proc/self/task")) == threads
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.slow
def test_reader_that_stops_reading_is_cut_off_and_others_get_everything(serve: Serve, connect: Connect) -> None:
    server = serve(flood_rate=0, outbox_limit=256 * 1024)
    alice = connect(server, "alice")
    slow = connect(server, "slow")
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    talker = connect(server, "talker")
    alice.expect("* talker joined")
    payload = "x" * 3000
    received: list[str] = []
    sent = 0
    cut_off = False
    # Alice keeps reading as the talker talks; the slow client never reads.
    while not cut_off:
        assert sent < 20000, "the slow reader was never cut off"
        talker.send(f"{sent} {payload}")
        sent += 1
        if sent % 50 == 0:
            for line in alice.lines_until_quiet(0.01):
                if line.startswith("* slow left"):
                    assert "not reading" in line
                    cut_off = True
                else:
                    received.append(line)
    talker.send("done")
    for line in alice.lines_until_quiet(0.5):
        received.append(line)
    talker_lines = [line for line in received if line.startswith("[talker]")]
    assert talker_lines[:sent] == [f"[talker] {i} {payload}" for i in range(sent)]
    assert talker_lines[-1] == "[talker] done"


@pytest.mark.slow
def test_stress_concurrent_senders_every_line_exactly_once_in_order(serve: Serve, connect: Connect) -> None:
    """The test the naive design (sender threads writing to other clients' TLS sockets) fails."""
    clients_n, senders_n, lines_n = 24, 6, 400
    server = serve(flood_rate=0)
    nicks = [f"user{i}" for i in range(clients_n)]
    clients = [connect(server, nick) for nick in nicks]
    # Let every join notice land before the race starts.
    time.sleep(0.2)
    for c in clients:
        c.lines_until_quiet(0.05)
    senders = nicks[:senders_n]
    barrier = threading.Barrier(clients_n)
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        client, nick = clients[index], nicks[index]
        try:
            expected = (senders_n - (1 if nick in senders else 0)) * lines_n
            barrier.wait()
            if nick in senders:
                client.send(b"".join(f"{nick} line {i}\n".encode() for i in range(lines_n)))
            got: list[str] = []
            while len(got) < expected:
                line = client.readline(timeout=20)
                if not line.startswith("*"):
                    got.append(line)
            results[nick] = got
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for nick in nicks:
        got = results[nick]
        for sender in senders:
            if sender == nick:
                assert not any(line.startswith(f"[{nick}]") for line in got)
                continue
            mine = [line for line in got if line.startswith(f"[{sender}] ")]
            assert mine == [f"[{sender}] {sender} line {i}" for i in range(lines_n)], (nick, sender)
    # The server is alive and still relays.
    clients[0].send("after the storm")
    assert clients[1].expect("[user0] after") == "[user0] after the storm"
    assert server.client_count == clients_n


def test_big_rooms_do_not_announce_every_arrival(serve: Serve, connect: Connect) -> None:
    server = serve(announce_limit=2)
    alice = connect(server, "alice")
    connect(server, "bob")
    assert alice.readline() == "* bob joined"
    carol = connect(server, "carol")  # the third: over the limit
    dave = connect(server, "dave")
    carol.send("/quit")
    carol.expect("* goodbye")
    with pytest.raises(EOFError):  # gone from the room before dave goes
        carol.readline()
    _reset(dave)  # a departure with a reason is always told
    assert alice.expect("* ").startswith("* dave left (")
    alice.send("/who")
    assert alice.readline() == "* 2 online: alice, bob"


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
def test_accepted_sockets_find_dead_peers_within_two_minutes(serve: Serve, connect: Connect) -> None:
    server = serve()
    connect(server, "alice")
    (session,) = server._sessions
    sock = session.conn.sock  # options only: a syscall on the descriptor, not the SSL object
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) * sock.getsockopt(
        socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
    assert idle + probes <= 120
    # The same bound while unacknowledged data is outstanding (keepalive is silent then).
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == (idle + probes) * 1000
