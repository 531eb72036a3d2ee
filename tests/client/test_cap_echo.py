"""``/cap echo`` (issue 11): a client that asks gets its own lines back exactly as relayed, a notice for
each line the server dropped, and the flood limit; one that doesn't ask (ncat, openssl) sees nothing new.
Real servers on 127.0.0.1, real TLS, raw line clients."""

from __future__ import annotations

from securechat.client.ui import Display, Pacer, Roster, TabCompleter, split_input
from securechat.wire import protocol


def test_echo_is_opt_in_and_exact(serve, connect) -> None:
    server = serve(flood_rate=10, flood_burst=20)
    bob = connect(server, "bob")
    alice = connect(server, "alice")
    bob.expect("* alice joined")
    alice.send("/cap echo")
    assert alice.readline() == "* cap: echo on; flood 10 lines/s, burst 20"
    assert protocol.parse_cap_reply("* cap: echo on; flood 10 lines/s, burst 20") == ("echo", 10.0, 20.0)
    alice.send("tab\there \x1b[31mred")
    assert bob.readline() == "[alice] tab here red"
    assert alice.readline() == "[alice] tab here red"  # what bob got, byte for byte
    alice.send("/me waves")
    assert alice.readline() == bob.readline() == "[alice] * waves"
    alice.send("/msg bob psst")
    assert alice.readline() == bob.readline() == "[alice -> bob] psst"
    alice.send("/msg carol hi")
    assert alice.readline() == "* no such nick: carol"
    # bob never asked: his own lines are not echoed
    bob.send("hello")
    assert alice.readline() == "[bob] hello"
    assert bob.lines_until_quiet(0.3) == []


def test_dropped_lines_are_reported_to_an_echo_client(serve, connect) -> None:
    server = serve(flood_rate=0.5, flood_burst=3)
    bob = connect(server, "bob")
    alice = connect(server, "alice")  # nickname: 1 of the 3
    alice.send("/cap echo")  # 2 of 3
    assert alice.readline().startswith("* cap: echo on; flood 0.5 lines/s, burst 3")
    for word in ("one", "two", "three"):
        alice.send(word)
    got = alice.lines_until_quiet(0.5)
    assert got[0] == "[alice] one"
    assert "* not delivered (flood control): two" in got and "* not delivered (flood control): three" in got
    assert not any(line in got for line in ("[alice] two", "[alice] three"))
    assert [line for line in bob.lines_until_quiet(0.3) if line.startswith("[")] == ["[alice] one"]


def test_unknown_capability(serve, connect) -> None:
    alice = connect(serve(), "alice")
    alice.send("/cap telepathy")
    assert alice.readline() == "* cap: unknown capability 'telepathy'; known: echo"


def test_pacer_keeps_under_the_servers_bucket() -> None:
    now = 100.0
    pacer = Pacer(10, 20, now)
    bucket = protocol.TokenBucket(10, 20, now)
    assert bucket.allow(now) and bucket.allow(now)  # the nickname and /cap lines
    sent = 0
    while sent < 60:  # a 60-line paste
        wait = pacer.wait(now)
        if wait > 0:
            now += wait
            continue
        pacer.spend()
        assert bucket.allow(now + 0.05), f"line {sent} would be dropped"  # arriving 50 ms later
        sent += 1
    assert 4.0 < now - 100.0 < 6.0  # 17 at once, then 9 a second
    assert Pacer(0, 20, now).wait(now) == 0.0  # no limit advertised: no pacing


def test_roster_and_tab_completion() -> None:
    roster = Roster()
    for line in ("* welcome, alice! 3 online: alice, bob, Bobby. /help lists commands", "* carol joined",
                 "* bob is now robert", "* carol left (connection lost)", "[dave] hi"):
        roster.feed(line)
    assert roster.nicks() == ["alice", "Bobby", "dave", "robert"]
    tab = TabCompleter(roster, lambda: "alice")
    assert tab.complete("/m", 2) in (("/me ", 4), ("/msg ", 5))
    assert tab.complete("/ms", 3) == ("/msg ", 5)
    assert tab.complete("al", 2) is None  # not yourself
    assert tab.complete("b", 1) == ("Bobby: ", 7)
    assert tab.complete("hi ro and", 5) == ("hi robert  and", 10)
    roster.feed("* 2 online: alice, zed")
    assert roster.nicks() == ["alice", "zed"]


def test_display_marks_mentions_own_lines_and_undelivered() -> None:
    display = Display(lambda: "alice", timestamps=False)
    assert display.render("[bob] hey ALICE!").bell
    assert not display.render("[bob] malice aforethought").bell
    assert display.render("[bob -> alice] psst").bell
    assert not display.render("[alice] alice talks about herself").bell
    assert not Display(lambda: "alice", timestamps=False, bell=False).render("[bob] alice").bell
    undelivered = display.render("* not delivered (flood control): two").fragments
    assert undelivered[0][0] == "bold fg:ansired"
    assert split_input("one\r\ntwo\n\n  \nthree\n") == ["one", "two", "three"]


def test_chat_client_asks_after_the_welcome_and_keeps_the_answer_to_itself(serve) -> None:
    from securechat.client.chat import ChatClient
    from tests.conftest import LOOPBACK

    server = serve(tls=False, flood_rate=7, flood_burst=9)
    client = ChatClient()
    client.want_echo = True
    client.connect(LOOPBACK, server.address[1], ssl_context=None, timeout=5)
    assert client.register("alice", timeout=5) == "alice"
    assert client.wait_capabilities(5)
    assert client.echo and client.flood_limit == (7.0, 9.0)
    client.send("hi")
    lines = [client.recv_line(2) for _ in range(2)]
    assert lines[0].startswith("* welcome, alice!")
    assert lines[1] == "[alice] hi"  # the "* cap: ..." answer was consumed, not delivered
    client.close()
