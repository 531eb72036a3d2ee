"""The terminal client in a real terminal (tmux), against real servers on 127.0.0.1 (issue 11).

Each test types, pastes and resizes as a person would, reads the screen as tmux renders it, and
checks what the other participants (library clients) really received.
"""

# The fixtures come from test_client.py; test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator

import pytest

from securechat.client.chat import ChatClient
from tests.client.test_client import Certs, Served, certs, expect, peer, start_server, tls_server  # noqa: F401
from tests.tmuxterm import Tmux, needs_tmux

pytestmark = [needs_tmux, pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="POSIX")]


@pytest.fixture
def terms() -> Iterator[list[Tmux]]:
    started: list[Tmux] = []
    yield started
    for term in started:
        term.close()


def connect_argv(port: int, certs: Certs | None, *extra: str) -> list[str]:
    trust = ["--ca", str(certs.ca)] if certs is not None else ["--plain"]
    return [sys.executable, "-m", "securechat", "connect", "127.0.0.1", "--port", str(port), *trust, *extra]


def start(terms: list[Tmux], port: int, certs: Certs | None, *extra: str, **kwargs: object) -> Tmux:
    term = Tmux(connect_argv(port, certs, *extra), **kwargs)  # type: ignore[arg-type]
    terms.append(term)
    return term


def joined(terms: list[Tmux], port: int, certs: Certs | None, nick: str, *extra: str, **kwargs: object) -> Tmux:
    term = start(terms, port, certs, "--nick", nick, *extra, **kwargs)
    wait_prompt(term, nick)
    return term


def wait_prompt(term: Tmux, nick: str) -> str:
    """Wait for the input line's ``nick>`` prompt (tmux drops the trailing space)."""
    return term.wait_until(lambda screen: any(line.startswith(f"{nick}>") for line in screen.splitlines()),
                           history=False)


def silent(client: ChatClient, wait: float = 0.5) -> list[str]:
    """Lines that arrive within ``wait`` seconds."""
    got = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        line = client.recv_line(left)
        if line is not None:
            got.append(line)
    return got


def chat_lines(screen: str) -> list[str]:
    """The screen's lines without the HH:MM stamps."""
    return [re.sub(r"^\d\d:\d\d ", "", line) for line in screen.splitlines()]


# -- bugs -------------------------------------------------------------------------------------


def test_own_nick_follows_a_confirmed_rename_and_not_a_refused_one(certs: Certs, tls_server: Served,
                                                                   terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        expect(bob, "* alice joined")
        term.type("/nick bob\r")  # taken: refused, nothing changes
        term.wait_for("* nickname refused: 'bob' is taken")
        term.type("still alice\r")
        expect(bob, "[alice] still alice")
        term.wait_for("[alice] still alice")
        term.type("/nick alicia\r")
        expect(bob, "* alice is now alicia")
        wait_prompt(term, "alicia")
        term.type("hello\r")
        expect(bob, "[alicia] hello")
        screen = term.wait_for("[alicia] hello")
        assert "[alice] hello" not in screen


def test_multi_line_paste_is_sent_and_shown_line_by_line(certs: Certs, tls_server: Served,
                                                         terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        term.paste("pasted one\npasted two\npasted three")
        term.keys("Enter")
        received = [expect(bob, lambda line: line.startswith("[alice]")) for _ in range(3)]
        assert received == ["[alice] pasted one", "[alice] pasted two", "[alice] pasted three"]
        screen = term.wait_for("[alice] pasted three")
        shown = [line for line in chat_lines(screen) if line.startswith("[alice]")]
        assert shown == received  # what the sender sees is exactly what the others got


@pytest.mark.parametrize(("typed", "relayed"), [
    ("abc\x1b[31mdef", "abc[31mdef"),  # looks like a mouse report to prompt_toolkit: it used to crash
    ("x\x1b[<0;1;1My", "x[<0;1;1My"),  # an SGR mouse report, with mouse reporting off
    ("a\x1b[2Jb", "a[2Jb"),  # ESC is a key of its own (ignored here); what follows is text
    ("t\x1b]0;pwned\x07u", "t]0;pwnedu"),
])
def test_escape_sequence_at_the_prompt_is_harmless(certs: Certs, tls_server: Served, terms: list[Tmux],
                                                   typed: str, relayed: str) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        term.type(typed)
        term.keys("Enter")
        line = expect(bob, lambda line: line.startswith("[alice]"))
        assert line == f"[alice] {relayed}"  # the rest of the line survives
        screen = term.wait_for(line)
        assert "Traceback" not in screen and "Unhandled exception" not in screen
        assert "Press ENTER" not in screen
        term.type("still here\r")
        expect(bob, "[alice] still here")


def test_fast_typing_leaves_nothing_on_stray_lines(certs: Certs, tls_server: Served, terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        words = [f"quick{i:02d}" for i in range(15)]
        for word in words:
            term.type(word + "\r")  # no pause: as fast as tmux writes
        for word in words:
            expect(bob, f"[alice] {word}")
        screen = term.wait_for(f"[alice] {words[-1]}")
        for line in chat_lines(screen):
            if "quick" in line:
                assert re.fullmatch(r"\[alice\] quick\d\d", line), f"stray text on the screen: {line!r}\n{screen}"
        assert sum("quick" in line for line in chat_lines(screen)) == len(words)


def test_private_message_to_nobody_is_not_shown_as_sent(certs: Certs, tls_server: Served,
                                                        terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        term.type("/msg carol hi\r")
        screen = term.wait_for("* no such nick: carol")
        assert "-> carol]" not in screen
        term.type("/msg bob psst\r")
        expect(bob, "[alice -> bob] psst")
        term.wait_for("[alice -> bob] psst")


@pytest.mark.parametrize(("rate", "burst", "count"), [(10, 20, 30), (8, 6, 18)])  # the defaults; a tight one
def test_long_paste_is_paced_to_the_flood_limit_and_nothing_dropped(certs: Certs, start_server, terms: list[Tmux],
                                                                    rate: int, burst: int, count: int) -> None:
    _, port = start_server(certs.server_context(), flood_rate=rate, flood_burst=burst)
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        lines = [f"line {i:02d}" for i in range(count)]
        term.paste("\n".join(lines))
        term.wait_for(f"Send {count} pasted lines?", history=False)
        term.type("y")
        term.wait_for(f"sending {count} lines...", history=False)
        for line in lines:
            expect(bob, f"[alice] {line}", timeout=10)
        screen = term.wait_for(f"[alice] line {count - 1}")
        assert "slow down" not in screen and "not delivered" not in screen
        term.wait_until(lambda s: "sending" not in s, history=False)


def test_a_line_the_server_dropped_is_marked_not_delivered(certs: Certs, start_server,
                                                            terms: list[Tmux]) -> None:
    # A server slower than it advertises (a rate change, or a bucket shared with a second session of the
    # same user) can still drop: the client must then say so, never show the line as sent.
    server, port = start_server(certs.server_context(), flood_rate=50, flood_burst=50)
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        server.flood_rate, server.flood_burst = 0.5, 1  # new sessions only...
        for session in list(server._sessions):
            session.bucket = type(session.bucket)(0.5, 1, time.monotonic())  # ...and alice's, now
        term.paste("one\ntwo\nthree")
        term.keys("Enter")
        expect(bob, "[alice] one")
        screen = term.wait_for("* not delivered (flood control): three")
        assert "* not delivered (flood control): two" in screen
        assert "[alice] two" not in screen and "[alice] three" not in screen
        assert silent(bob, 0.3) == []


def test_plain_client_reaching_a_tls_server_says_so_before_asking_for_a_nick(certs: Certs, tls_server: Served,
                                                                            terms: list[Tmux]) -> None:
    _, port = tls_server
    term = start(terms, port, None)
    screen = term.wait_for("it probably requires TLS")
    assert "Enter your nickname" not in screen
    assert "drop --plain" in screen
    assert term.exit_status() == 1


# -- what a terminal chat client is expected to have -------------------------------------------


def test_timestamps_on_every_line_and_off_with_an_option(certs: Certs, tls_server: Served,
                                                          terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        stamped = joined(terms, port, certs, "alice")
        bare = joined(terms, port, certs, "carol", "--no-timestamps")
        bob.send("tick")
        for term in (stamped, bare):
            term.wait_for("[bob] tick")
        assert re.search(r"^\d\d:\d\d \[bob\] tick$", stamped.screen(), re.MULTILINE), stamped.screen()
        assert re.search(r"^\d\d:\d\d \* carol joined$", stamped.screen(), re.MULTILINE)
        assert re.search(r"^\[bob\] tick$", bare.screen(), re.MULTILINE), bare.screen()


def test_day_change_line() -> None:
    from datetime import datetime

    from securechat.client.ui import Display

    times = iter([datetime(2026, 11, 26, 23, 59), datetime(2026, 11, 27, 0, 1)])
    display = Display(lambda: "alice", clock=lambda: next(times))
    first = "".join(text for _, text in display.render("[bob] late").fragments)
    second = "".join(text for _, text in display.render("[bob] early").fragments)
    assert first == "23:59 [bob] late\n"
    assert second == "--- Day changed to Friday 27 November 2026\n00:01 [bob] early\n"


SGR = re.compile(r"\x1b\[([0-9;]*)m")


def styled(screen: str, text: str) -> str:
    """The SGR parameters in force where ``text`` starts on an ``escapes=True`` capture."""
    plain, where, i = [], [], 0  # the text without escapes, and where each of its characters is
    while i < len(screen):
        m = SGR.match(screen, i)
        if m:
            i = m.end()
            continue
        plain.append(screen[i])
        where.append(i)
        i += 1
    state: list[str] = []
    for code in SGR.findall(screen[:where["".join(plain).index(text)]]):  # tmux writes only changes: replay them all
        for param in code.split(";") if code else ["0"]:
            if param in ("0", ""):
                state = []
            elif param == "39":
                state = [p for p in state if not (30 <= int(p) <= 37 or 90 <= int(p) <= 97)]
            elif param != "49":
                state.append(param)
    return ";".join(state)


def test_nick_colours_are_stable_own_lines_stand_out_and_notices_are_dim(certs: Certs, tls_server: Served,
                                                                          terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob, peer(port, "dave", certs) as dave:
        first = joined(terms, port, certs, "alice", "--no-timestamps")
        second = joined(terms, port, certs, "erin", "--no-timestamps")
        bob.send("one")
        dave.send("two")
        first.type("mine\r")
        for term in (first, second):
            term.wait_for("[dave] two")
        first.wait_for("[alice] mine")
        a, b = first.screen(escapes=True), second.screen(escapes=True)
        bob_colour = styled(a, "bob] one")
        assert bob_colour and bob_colour == styled(b, "bob] one")  # same colour in every client
        assert styled(a, "dave] two") == styled(b, "dave] two") != bob_colour
        assert "7" in styled(a, "alice] mine").split(";")  # own nick: reverse video, whatever the palette
        assert "90" in styled(a, "* erin joined").split(";")  # notices: dim grey


def test_mention_is_highlighted_and_rings_the_bell_unless_turned_off(certs: Certs, tls_server: Served) -> None:
    from tests.client.test_client_pty import Terminal, client_argv

    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        ringing = Terminal(client_argv(port, certs, "--nick", "alice"))
        quiet = Terminal(client_argv(port, certs, "--nick", "carol", "--no-bell"))
        try:
            for term, nick in ((ringing, "alice"), (quiet, "carol")):
                term.wait_prompt(term.wait_for(f"welcome, {nick}!"))
            mark_r, mark_q = ringing.mark(), quiet.mark()
            bob.send("nothing for anyone")
            ringing.wait_for("nothing for anyone", start=mark_r)
            quiet.wait_for("nothing for anyone", start=mark_q)
            assert b"\x07" not in ringing.output[mark_r:]
            mark_r, mark_q = ringing.mark(), quiet.mark()
            bob.send("Alice, carol: look")
            ringing.wait_for("look", start=mark_r)
            quiet.wait_for("look", start=mark_q)
            time.sleep(0.2)
            assert b"\x07" in ringing.output[mark_r:]
            assert b"\x07" not in quiet.output[mark_q:]
            assert b"\x1b[0;31;1mAlice, carol: look" in quiet.output[mark_q:]  # highlighted in red
            mark_r = ringing.mark()
            bob.send("/msg alice psst")
            ringing.wait_for("psst", start=mark_r)
            time.sleep(0.2)
            assert b"\x07" in ringing.output[mark_r:]  # a private message is a mention
        finally:
            ringing.close()
            quiet.close()


def test_tab_completes_commands_and_online_nicks(certs: Certs, tls_server: Served, terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob, peer(port, "bobby", certs):
        term = joined(terms, port, certs, "alice")
        term.type("/wh")
        term.keys("Tab")
        term.wait_until(lambda s: "alice> /who" in s, history=False)
        term.keys("Enter")
        term.wait_for("* 3 online: alice, bob, bobby")
        term.type("bo")
        term.keys("Tab")
        screen = term.wait_until(lambda s: "alice> bob: " in s or "alice> bob:" in s, history=False)
        assert "bob  bobby" in screen  # the choices, on the status line
        term.keys("Tab")
        term.wait_until(lambda s: "alice> bobby:" in s, history=False)
        term.keys("Tab")
        term.wait_until(lambda s: "alice> bob:" in s and "bobby:" not in s.split("alice> ")[-1], history=False)
        term.type("hi")
        term.keys("Enter")
        expect(bob, "[alice] bob: hi")


def test_a_long_paste_can_be_refused_and_a_short_one_is_not_asked(certs: Certs, tls_server: Served,
                                                                   terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice", "--paste-verify", "3")
        expect(bob, "* alice joined")
        term.paste("a1\na2\na3\na4")
        term.wait_for("Send 4 pasted lines? y = send, n = discard", history=False)
        term.type("n")
        term.wait_for("-!- paste of 4 lines discarded")
        assert silent(bob, 0.3) == []
        term.paste("b1\nb2\nb3")
        term.keys("Enter")
        assert [expect(bob, f"[alice] b{i}") for i in (1, 2, 3)]
        assert "Send 3" not in term.screen(history=True)


def test_scrollback_survives_resizes(certs: Certs, start_server, terms: list[Tmux]) -> None:
    _, port = start_server(certs.server_context(), flood_rate=0)  # bob's 40 lines at once
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice", width=100, height=20)
        for i in range(40):
            bob.send(f"history line {i:02d}")
        term.wait_for("history line 39")
        for width, height in ((60, 12), (130, 30), (80, 24)):
            term.resize(width, height)
            time.sleep(0.3)
        term.type("after\r")
        screen = term.wait_for("[alice] after")
        lines = chat_lines(screen)
        for i in range(40):
            assert lines.count(f"[bob] history line {i:02d}") == 1, screen
        wait_prompt(term, "alice")


@pytest.mark.parametrize(("term", "stdout_tty"), [("xterm-256color", False), ("dumb", False), ("dumb", True)])
def test_no_colour_and_no_bell_when_stdout_is_not_a_terminal(certs: Certs, tls_server: Served, term: str,
                                                              stdout_tty: bool) -> None:
    import os
    import pty
    import subprocess

    from tests.client.test_client_pty import client_argv

    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        master, slave = pty.openpty()  # stdin a terminal; stdout a pipe, or a terminal that says it is dumb
        out_r, out_w = pty.openpty() if stdout_tty else os.pipe()
        proc = subprocess.Popen(client_argv(port, certs, "--nick", "alice"), stdin=slave, stdout=out_w,
                                stderr=subprocess.PIPE, env={**os.environ, "TERM": term})
        os.close(out_w)
        os.close(slave)
        try:
            expect(bob, "* alice joined")
            bob.send("alice: are you there?")
            bob.send("/msg alice psst")
            time.sleep(0.5)
            os.write(master, b"\x04")  # EOF
            proc.communicate(timeout=10)
            out = b""
            while True:
                try:
                    chunk = os.read(out_r, 65536)
                except OSError:  # a pty's EIO once the child has gone
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
            os.close(out_r)
        out = out.replace(b"\r\n", b"\n")
        assert b"[bob] alice: are you there?\n" in out and b"[bob -> alice] psst\n" in out
        assert b"\x1b" not in out and b"\x07" not in out


def test_up_recalls_a_line_and_an_overlong_line_is_not_sent(certs: Certs, tls_server: Served,
                                                            terms: list[Tmux]) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        expect(bob, "* alice joined")
        term.type("first\r")
        expect(bob, "[alice] first")
        # prompt_toolkit reloads the input history in the background after a line is accepted; the
        # server's echo on our screen comes after that, so Up has something to recall.
        term.wait_for("[alice] first", history=False)
        term.keys("Up")
        term.wait_until(lambda s: "alice> first" in s, history=False)
        term.keys("Enter")
        expect(bob, "[alice] first")
        term.paste("x" * 5000)  # over the protocol's 4096 bytes: the server would cut us off
        term.keys("Enter")
        term.wait_for("-!- not sent: line too long (5001 bytes, at most 4096)")
        assert silent(bob, 0.3) == []
        term.type("still connected\r")
        expect(bob, "[alice] still connected")


def test_a_server_without_cap_echo_gets_local_echo(certs: Certs, tls_server: Served, terms: list[Tmux],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from securechat.server import session as server_module

    monkeypatch.delitem(server_module.COMMANDS, "cap")  # the server as it was before /cap existed
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = joined(terms, port, certs, "alice")
        term.type("hello\r")
        expect(bob, "[alice] hello")
        screen = term.wait_for("[alice] hello")
        assert "unknown command" not in screen  # the client's own question is not shown
        term.type("/nick alicia\r")
        wait_prompt(term, "alicia")
        term.type("again\r")
        expect(bob, "[alicia] again")
        term.wait_for("[alicia] again")


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.06])
def test_typing_right_after_the_nickname_is_neither_lost_nor_echoed_raw(certs: Certs, tls_server: Served,
                                                                         terms: list[Tmux], delay: float) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        term = start(terms, port, certs)
        term.wait_for("Enter your nickname:")
        term.type("alice\r")
        time.sleep(delay)  # while the nickname is being registered
        term.type("early bird\rsecond\r")  # before the chat line has even appeared
        expect(bob, "[alice] early bird")
        expect(bob, "[alice] second")
        screen = term.wait_for("[alice] second")
        assert [line for line in chat_lines(screen) if "early bird" in line] == ["[alice] early bird"], screen


def test_ctrl_c_at_the_nickname_prompt_leaves_cleanly(certs: Certs, tls_server: Served, terms: list[Tmux]) -> None:
    _, port = tls_server
    term = start(terms, port, certs)
    term.wait_for("Enter your nickname:")
    term.keys("C-c")
    assert term.exit_status() == 0
    assert "Traceback" not in term.screen(history=True)
