"""Under mutual TLS a name is a person: offline private messages and read positions, kept in a real SQLite file."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from securechat.server.engine import ChatServer
from securechat.store.history import SqliteLog
from securechat.wire import tls
from tests.conftest import LOOPBACK, LineClient

MISSED = re.compile(r"\(missed \d\d:\d\d\) (.*)\Z")


@pytest.fixture(scope="module")
def people() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def mtls(cert_files: dict[str, Path], people: trustme.CA, tmp_path: Path) -> Iterator[Callable[..., ChatServer]]:
    """Start (and restart) a mutual-TLS server whose history is tmp_path/h.sqlite3."""
    ca_file = tmp_path / "people.pem"
    people.cert_pem.write_to_path(str(ca_file))
    ctx = tls.server_context(cert_files["cert"], cert_files["key"], client_ca=ca_file, require_client_cert=True)
    servers: list[ChatServer] = []

    def start(**options: object) -> ChatServer:
        for s in servers:
            s.shutdown()
        servers.clear()
        server = ChatServer(LOOPBACK, 0, ctx, roomlog=SqliteLog(tmp_path / "h.sqlite3"), offline_messages=True,
                            flood_rate=0, **options)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()


@pytest.fixture
def person(cert_files: dict[str, Path], people: trustme.CA) -> Iterator[Callable[[ChatServer, str], LineClient]]:
    clients: list[LineClient] = []
    leaves: dict[str, trustme.LeafCert] = {}

    def login(server: ChatServer, name: str) -> LineClient:
        leaf = leaves.setdefault(name, people.issue_cert(common_name=name))
        ctx = tls.client_context(cert_files["ca"])
        leaf.configure_cert(ctx)
        raw = socket.create_connection((LOOPBACK, server.address[1]), timeout=10)
        client = LineClient(ctx.wrap_socket(raw, server_hostname="localhost"))
        clients.append(client)
        client.expect("* securechat")
        client.send(name)
        client.expect(f"* welcome, {name}!")
        return client

    yield login
    for c in clients:
        c.close()


def _leave(client: LineClient) -> None:
    client.send("/quit")
    client.expect("* goodbye")
    client.close()


def _missed(lines: list[str]) -> list[str]:
    return [m[1] for line in lines if (m := MISSED.match(line))]


def test_a_message_to_someone_offline_waits_for_their_next_login(mtls: Callable[..., ChatServer],
                                                                  person: Callable[[ChatServer, str], LineClient]
                                                                  ) -> None:
    server = mtls()
    alice = person(server, "alice")
    alice.send("/msg bob see you tomorrow")
    assert alice.readline() == "* bob is offline: kept for their next login"
    server = mtls()  # and it survives a restart
    bob = person(server, "bob")
    seen = bob.lines_until_quiet()
    assert "* 1 private message while you were away:" in seen
    assert _missed(seen) == ["[alice -> bob] see you tomorrow"]
    _leave(bob)
    bob = person(server, "bob")
    assert _missed(bob.lines_until_quiet()) == []  # nothing twice


def test_private_messages_between_people_online_are_still_not_stored(
        mtls: Callable[..., ChatServer], person: Callable[[ChatServer, str], LineClient], tmp_path: Path) -> None:
    server = mtls()
    alice = person(server, "alice")
    bob = person(server, "bob")
    alice.send("/msg bob online secret")
    bob.expect("[alice -> bob] online secret")
    server.rooms.log.flush()  # type: ignore[attr-defined]
    import sqlite3
    with sqlite3.connect(tmp_path / "h.sqlite3") as db:
        assert not db.execute("SELECT 1 FROM lines WHERE text = 'online secret'").fetchall()


def test_a_returning_person_sees_exactly_what_it_missed_in_its_rooms(
        mtls: Callable[..., ChatServer], person: Callable[[ChatServer, str], LineClient]) -> None:
    server = mtls()
    carol = person(server, "carol")
    alice = person(server, "alice")
    carol.send("/join dev")
    carol.expect("* you joined #dev")
    alice.send("/join dev")
    alice.expect("* you joined #dev")
    alice.send("seen by carol")
    carol.expect("[alice] seen by carol")
    _leave(carol)
    alice.send("while away in dev")
    alice.send("/join lobby")
    alice.send("while away in lobby")
    alice.send("/rooms")
    alice.expect("* 2 rooms")
    server = mtls()  # a restart in between changes nothing
    carol = person(server, "carol")
    seen = carol.lines_until_quiet()
    missed = _missed(seen)
    assert "#dev [alice] while away in dev" in missed or "[alice] while away in dev" in missed
    assert any(line.endswith("[alice] while away in lobby") for line in missed)
    assert not any("seen by carol" in line for line in missed)
    assert not any("carol" in line.split("]")[0] for line in missed if line.startswith("["))  # not her own
    carol.send("/join")
    rooms = carol.expect("* you are in").removeprefix("* you are in ").split(";")[0]
    assert sorted(rooms.split(", ")) == ["#dev", "#lobby"]
    _leave(carol)
    carol = person(server, "carol")
    assert _missed(carol.lines_until_quiet()) == []  # nothing twice


def test_without_mutual_tls_a_message_to_someone_offline_is_refused(serve: Callable[..., ChatServer],
                                                                    connect: Callable[..., LineClient],
                                                                    tmp_path: Path) -> None:
    server = serve(roomlog=SqliteLog(tmp_path / "h.sqlite3"))
    alice = connect(server, "alice")
    alice.send("/msg nobody hello")
    assert alice.readline() == "* no such nick: nobody"


def test_a_session_token_is_useless_with_another_certificate(mtls: Callable[..., ChatServer],
                                                             person: Callable[[ChatServer, str], LineClient],
                                                             cert_files: dict[str, Path],
                                                             people: trustme.CA) -> None:
    server = mtls()
    alice = person(server, "alice")
    alice.send("/session")
    token = alice.expect("* session ").split()[2]
    ctx = tls.client_context(cert_files["ca"])
    people.issue_cert(common_name="mallory").configure_cert(ctx)
    mallory = LineClient(ctx.wrap_socket(socket.create_connection((LOOPBACK, server.address[1]), timeout=10),
                                         server_hostname="localhost"))
    try:
        mallory.expect("* securechat")
        mallory.send(f"/resume {token}")
        assert mallory.readline() == "* resume refused: unknown or expired session; send your nickname"
        alice.send("/who")
        assert alice.expect("* ").startswith("* 1 online: alice")  # alice was not taken over
    finally:
        mallory.close()


def test_a_person_whose_held_session_waits_can_log_in_afresh(mtls: Callable[..., ChatServer],
                                                            person: Callable[[ChatServer, str], LineClient]
                                                            ) -> None:
    server = mtls()
    watcher = person(server, "watcher")
    alice = person(server, "alice")
    alice.send("/session")
    alice.expect("* session ")
    watcher.expect("* alice joined")
    alice.close()  # dropped, not quit: held for its resume
    deadline = time.monotonic() + 5
    while (held := server.rooms.find("alice")) is None or held.held_private is None:
        assert time.monotonic() < deadline, "the dropped session was never held"
        time.sleep(0.02)
    again = person(server, "alice")  # a new client, same certificate: not locked out for the grace period
    again.send("hello")
    assert watcher.expect("[alice]") == "[alice] hello"


def _leave_notes(server: ChatServer, person: Callable[[ChatServer, str], LineClient], sender: str, count: int,
                 size: int = 0) -> list[str]:
    """``sender`` logs in, leaves ``count`` messages for alice (offline), and leaves; returns their texts."""
    client = person(server, sender)
    texts = [f"{sender} note {i:03d} {'x' * size}".rstrip() for i in range(count)]
    for text in texts:
        client.send(f"/msg alice {text}")
    for _ in texts:
        client.expect("* alice is offline: kept for their next login")
    _leave(client)
    return texts


def test_a_flood_of_kept_messages_arrives_whole_in_one_login(mtls: Callable[..., ChatServer],
                                                             person: Callable[[ChatServer, str], LineClient]) -> None:
    """Issue 17, finding 5: a few hundred kept messages overflowed the outbox at login; the person was cut
    off, and the read position was saved as if all had been delivered: lost for good."""
    server = mtls()
    # 360 messages of 3 KB: more than a connection's whole outbox (1 MiB) at once.
    sent = {sender: _leave_notes(server, person, sender, 90, 3000) for sender in ("s0", "s1", "s2", "s3")}
    alice = person(server, "alice")
    seen: list[str] = []
    deadline = time.monotonic() + 60  # generous: a loaded machine; the server paces the batches itself
    while len([line for line in _missed(seen) if " -> alice] " in line]) < 360:
        seen.append(alice.readline(max(0.1, deadline - time.monotonic())))
    seen += alice.lines_until_quiet(0.5)  # and nothing more
    kept = [line for line in _missed(seen) if " -> alice] " in line]
    for sender, texts in sent.items():  # every one, once, in each sender's order
        assert [line.split("] ", 1)[1] for line in kept if line.startswith(f"[{sender} -> alice] ")] == texts
    assert len(kept) == 360
    assert "* 200 or more private messages while you were away:" in seen
    alice.send("/who")
    assert alice.expect("* ").startswith("* 1 online: alice")  # still connected
    _leave(alice)
    alice = person(server, "alice")
    assert _missed(alice.lines_until_quiet()) == []  # nothing twice


def test_one_sender_may_leave_one_person_only_so_many_messages(mtls: Callable[..., ChatServer],
                                                              person: Callable[[ChatServer, str], LineClient]) -> None:
    per_sender = 100  # securechat.server.inbox.MAX_INBOX_PER_SENDER (checked at the end)
    server = mtls()
    _leave_notes(server, person, "bob", per_sender)
    bob = person(server, "bob")
    bob.send("/msg alice one too many")
    assert bob.expect("* alice") == (f"* alice has {per_sender} of your messages waiting already: the next ones "
                                     "once they have read those")
    assert _leave_notes(server, person, "carol", 1) == ["carol note 000"]  # others still may
    alice = person(server, "alice")
    assert len([line for line in _missed(alice.lines_until_quiet(1.0)) if " -> alice] " in line]) == per_sender + 1
    _leave(alice)
    from securechat.server import inbox

    assert inbox.MAX_INBOX_PER_SENDER == per_sender
    deadline = time.monotonic() + 5
    while server.rooms.find("alice") is not None:  # gone (not merely saying goodbye): a /msg is kept again
        assert time.monotonic() < deadline
        time.sleep(0.02)
    bob.send("/msg alice read yet?")  # read now: bob may write again
    assert bob.expect("* alice is") == "* alice is offline: kept for their next login"
