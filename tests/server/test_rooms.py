"""Rooms over real TLS sockets: /join, /part, /rooms, /who, per-room notices, the other-room marker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from securechat.server.engine import ChatServer
from securechat.server.room import MAX_JOINED
from securechat.store.roomlog import LocalDirectory
from tests.conftest import LineClient

Serve = Callable[..., ChatServer]
Connect = Callable[..., LineClient]


def test_everyone_starts_in_the_lobby_with_the_seeds_format(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    bob.send("hello")
    assert alice.readline() == "[bob] hello"
    alice.send("/who")
    assert alice.readline() == "* 2 online: alice, bob"


def test_join_creates_a_room_and_only_its_members_hear_it(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    carol = connect(server, "carol")
    alice.expect("* carol joined")
    bob.expect("* carol joined")
    alice.send("/join dev")
    assert alice.readline() == "* you joined #dev (1 here); now talking in #dev"
    bob.send("/join #Dev")  # same room: case and '#' folded
    alice.expect("* bob joined")
    bob.send("in dev")
    assert alice.expect("[bob]") == "[bob] in dev"
    carol.send("in lobby")
    # alice and bob still follow the lobby; it is not where they type, so it is marked
    assert alice.expect("#lobby") == "#lobby [carol] in lobby"
    assert bob.expect("#lobby") == "#lobby [carol] in lobby"
    carol.send("/who dev")
    assert carol.expect("* 2 in") == "* 2 in #dev: alice, bob"
    carol.send("/rooms")
    assert carol.expect("* 2 rooms") == "* 2 rooms: #dev (2), #lobby (3)"
    # carol is not in #dev: she never saw "in dev"
    carol.send("/who")
    seen = carol.lines_until_quiet(0.5)
    assert "[bob] in dev" not in seen and not any("in dev" in line and "[" in line for line in seen)


def test_join_an_already_followed_room_switches_to_it(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    alice.send("/join dev")
    alice.send("/join lobby")
    alice.expect("* now talking in #lobby")
    alice.send("hi lobby")
    assert bob.expect("[alice]") == "[alice] hi lobby"
    alice.send("/join")
    assert alice.expect("* you are in") == "* you are in #lobby, #dev; talking in #lobby; /join NAME joins or switches"


def test_part_tells_the_room_and_stops_delivery(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    bob.send("/join dev")
    bob.expect("* you joined #dev")
    alice.send("/join dev")
    bob.expect("* alice joined")
    alice.send("/part")
    assert bob.expect("* alice left") == "* alice left"
    assert alice.expect("* you left") == "* you left #dev"
    assert alice.readline() == "* now talking in #lobby"
    bob.send("only dev hears this")
    bob.send("/part dev")  # back to the lobby only, where alice is
    bob.expect("* you left #dev")
    bob.send("lobby again")
    assert alice.expect("[bob]") == "[bob] lobby again"  # "only dev hears this" never came
    alice.send("/part nowhere")
    assert alice.expect("* you are not") == "* you are not in #nowhere"


def test_parting_every_room_leaves_you_roomless_not_broken(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    alice.send("/part")
    alice.expect("* you left #lobby")
    alice.send("anyone?")
    assert alice.expect("* you are in no room") == "* you are in no room: /join NAME"
    alice.send("/who")
    assert alice.expect("* you are in no room").startswith("* you are in no room")
    alice.send("/rooms")
    assert alice.expect("* 0 rooms") == "* 0 rooms: "


def test_bad_room_names_are_refused(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    for bad in ("a b", "x" * 33, "\x1b[2Jroom", "dev!", "@bob", "#"):
        alice.send(f"/join {bad}")
        assert alice.expect("* a room name is").startswith("* a room name is 1-32 of letters")
    alice.send("/rooms")
    assert alice.expect("* 1 room") == "* 1 room: #lobby (1)"


def test_look_alike_room_names_are_one_room(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    alice.send("/join devil")
    alice.expect("* you joined #devil")
    bob.send("/join DEV1L")  # 1 and I fold to l, case folds
    alice.expect("* bob joined")
    bob.send("/rooms")
    assert bob.expect("* 2 rooms") == "* 2 rooms: #devil (2), #lobby (2)"


def test_a_person_follows_a_bounded_number_of_rooms(serve: Serve, connect: Connect) -> None:
    server = serve(flood_rate=0)
    alice = connect(server, "alice")
    for i in range(MAX_JOINED):
        alice.send(f"/join r{i}")
    assert alice.expect("* you follow") == f"* you follow {MAX_JOINED} rooms already: /part one first"


def test_rename_and_leave_are_told_in_every_room(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    alice.expect("* bob joined")
    alice.send("/join dev")
    alice.expect("* you joined #dev")
    bob.send("/join dev")
    alice.expect("* bob joined")
    bob.send("/nick robert")
    got = {alice.readline(), alice.readline()}
    assert got == {"* bob is now robert", "#lobby * bob is now robert"}
    bob.send("/quit")
    got = {alice.readline(), alice.readline()}
    assert got == {"* robert left", "#lobby * robert left"}
    assert server.rooms.rooms() == [("dev", 1), ("lobby", 1)]


def test_an_empty_room_disappears(serve: Serve, connect: Connect) -> None:
    server = serve()
    alice = connect(server, "alice")
    alice.send("/join tmp")
    alice.send("/part tmp")
    alice.expect("* you left #tmp")
    assert server.rooms.rooms() == [("lobby", 1)]


class _SlowDirectory(LocalDirectory):
    """A nick directory that takes its time over one claim, as Redis does across a slow or cut network."""

    def __init__(self, slow: str) -> None:
        self.slow = slow
        self.asked = threading.Event()
        self.answer = threading.Event()

    def claim(self, nick: str) -> bool:
        if nick == self.slow:
            self.asked.set()
            self.answer.wait(5)
        return True


def test_a_slow_nick_claim_holds_up_nobody(serve: Serve, connect: Connect) -> None:
    """The directory is asked outside the rooms' lock: joins, /who and chat go on meanwhile (issue #24)."""
    directory = _SlowDirectory("slowpoke")
    server = serve(directory=directory)
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    slow = connect(server)
    slow.expect("* securechat")
    slow.send("slowpoke")
    assert directory.asked.wait(5)
    started = time.monotonic()
    alice.send("/join dev")
    assert alice.expect("* you joined") == "* you joined #dev (1 here); now talking in #dev"
    bob.send("/join dev")
    assert alice.expect("* bob joined") == "* bob joined"
    bob.send("/who")
    assert bob.expect("* 2 in") == "* 2 in #dev: alice, bob"
    twin = connect(server)
    twin.expect("* securechat")
    twin.send("SLOWPOKE")  # the same nick, while it is being claimed: taken
    assert twin.expect("* nickname refused") == "* nickname refused: 'SLOWPOKE' is taken; send another"
    assert time.monotonic() - started < 2
    directory.answer.set()
    assert slow.expect("* welcome").startswith("* welcome, slowpoke!")
