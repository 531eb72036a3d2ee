"""The terminal chat screen: what ``securechat connect`` shows when stdin and stdout are a terminal.

One prompt_toolkit application runs from joining to leaving, so the terminal never drops back to
cooked mode between two lines (typed text can't leak onto stray lines), and received lines are
printed above the input line in batches, never through what is being typed. The terminal keeps
the history: it is ordinary scrollback (Shift-PgUp, tmux copy mode), which the terminal re-wraps
when resized, so nothing is lost to a redraw.

What the user sees of their own lines comes from the server: the client asks for ``/cap echo``
(:data:`securechat.wire.protocol.CAP_ECHO`), so a line shows as sent only once the server has relayed
it, exactly as the others got it; a line the server dropped comes back as ``* not delivered``. The
same answer advertises the server's flood limit, and :class:`Pacer` keeps under it, with a
visible "sending N lines..." state, so a long paste is delivered rather than dropped. Against a
server without ``/cap`` the client falls back to showing its own lines locally.

The pieces that decide what is shown (:class:`Display`, :class:`Roster`, :class:`TabCompleter`,
:class:`Pacer`) do no I/O and take their clock as an argument; :class:`TerminalUI` wires them to the
connection and the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.application import Application
from prompt_toolkit.application.current import set_app
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import FormattedText, StyleAndTextTuples
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent, merge_key_bindings
from prompt_toolkit.key_binding.defaults import load_key_bindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import HSplit, Layout, VSplit, Window
from prompt_toolkit.layout.containers import ConditionalContainer
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.layout.dimension import Dimension
from prompt_toolkit.shortcuts import print_formatted_text

from securechat.client.errors import NickRefused
from securechat.client.frontend import NOTICE_STYLE, Frontend, is_quit, nick_style, own_echo
from securechat.wire import addr, protocol

# irssi's paste_verify_line_count default: a paste of more lines than this asks before sending.
PASTE_VERIFY_LINES = 5

# Pacing: send at 90 % of the advertised rate and keep 3 lines of the burst in reserve (the nickname
# and /cap lines already spent, plus one for lines bunching up on the way), so the server's bucket,
# which counts arrival times, never runs dry.
PACE_RATE_SHARE = 0.9
PACE_BURST_RESERVE = 3.0

# How long to wait for the answer to "/cap echo"; a LAN answers in milliseconds.
CAP_WAIT = 3.0

# The input area grows with a multi-line paste, up to this many rows (the chat stays visible).
INPUT_MAX_ROWS = 8

# Tab completes every command the server's /help lists (read from the text itself, so they never drift
# apart; "//text" is not a command), room names after the commands taking one, nicks after /msg.
COMMANDS = tuple(sorted({"/" + name for name in re.findall(r"(?<![/\w])/([a-z]+)\b", protocol.HELP_TEXT)}))
ROOM_COMMANDS = frozenset({"/join", "/part", "/who"})
ROOMS_COMMAND = "rooms"
NICK_COMMANDS = frozenset({"/msg"})

TIME_STYLE = "fg:ansibrightblack"
DAY_STYLE = "bold fg:ansibrightblack"
OWN_STYLE = "bold reverse"  # the user's own nick: distinguishable whatever the palette gives others
MENTION_STYLE = "bold fg:ansired"
UNDELIVERED_STYLE = "bold fg:ansired"
LOCAL_STYLE = "fg:ansibrightblack"  # the client's own remarks, "-!- ..."
STATUS_STYLE = "reverse"

Fragments = list[tuple[str, str]]

_NICK = r"[A-Za-z0-9_-]{1,%d}" % protocol.MAX_NICK_CHARS
_JOINED_RE = re.compile(rf"\* ({_NICK}) joined\Z")
_LEFT_RE = re.compile(rf"\* ({_NICK}) left(?: \(.*\))?\Z")
_ONLINE_RE = re.compile(rf"\d+ online: ((?:{_NICK})(?:, {_NICK})*)")
_MEMBERS_RE = re.compile(rf"\* \d+ in #[A-Za-z0-9_-]+: ((?:{_NICK})(?:, {_NICK})*)\Z")  # /who ROOM
_ROOM = r"#([A-Za-z0-9_-]{1,32})"
# Where the server names a room (never in text a person wrote): its answer to /rooms, joining and
# switching, history and catch-up, and the room in front of a line of a room followed but not current.
_ROOMS_REPLY_RE = re.compile(r"\* \d+ rooms?: ")
_ROOM_NOTICE_RE = re.compile(rf"\* (?:you joined |(?:.*; )?now talking in |history of |missed in |now live in ){_ROOM}")
_ROOM_PREFIX_RE = re.compile(rf"{_ROOM} [\[*]")


@dataclass
class Shown:
    """One printed line (or two, with a day-change line): style fragments, and whether to ring."""

    fragments: Fragments
    bell: bool = False


def _mentions(body: str, nick: str) -> bool:
    """True when ``body`` names ``nick`` as a word (any case): "bob:", "hi Bob!", not "bobby"."""
    pattern = r"(?<![A-Za-z0-9_-])" + re.escape(nick) + r"(?![A-Za-z0-9_-])"
    return re.search(pattern, body, re.IGNORECASE) is not None


class Display:
    """Turns chat lines into what the screen shows: time, colours, own lines, mentions.

    ``me`` returns the user's current nick (it follows renames). Nick colours come from
    :func:`securechat.client.frontend.nick_style`, stable per nick; under mutual TLS a nick *is* its
    certificate's name and cannot be changed, so a colour there belongs to a certificate.
    """

    def __init__(self, me: Callable[[], str | None], *, timestamps: bool = True, bell: bool = True,
                 clock: Callable[[], dt.datetime] = dt.datetime.now) -> None:
        self.me = me
        self.timestamps = timestamps
        self.bell = bell
        self.clock = clock
        self._day: dt.date | None = None

    def _stamp(self) -> Fragments:
        if not self.timestamps:
            return []
        now = self.clock()
        out: Fragments = []
        if self._day is not None and now.date() != self._day:
            out.append((DAY_STYLE, f"--- Day changed to {now:%A %d %B %Y}\n"))
        self._day = now.date()
        out.append((TIME_STYLE, f"{now:%H:%M} "))
        return out

    def local(self, text: str) -> Shown:
        """A remark of the client's own (not from the server): ``-!- text``, dimmed."""
        return Shown([*self._stamp(), (LOCAL_STYLE, "-!- " + protocol.sanitize(text)), ("", "\n")])

    def render(self, line: str) -> Shown:
        """A line from the server (or the local echo of ours)."""
        out = self._stamp()
        line = protocol.sanitize(line)
        if protocol.is_notice(line):
            undelivered = line.startswith(protocol.NOTICE_PREFIX + protocol.NOT_DELIVERED)
            out.append((UNDELIVERED_STYLE if undelivered else NOTICE_STYLE, line))
            return Shown([*out, ("", "\n")])
        sender = protocol.sender_of(line)
        if sender is None:
            return Shown([*out, ("", line), ("", "\n")])
        me = self.me()
        own = me is not None and protocol.nick_key(sender) == protocol.nick_key(me)
        close = line.index("] ")
        head, body = line[1:close], line[close + 2:]
        to_me = me is not None and head.endswith(f" -> {me}")
        mention = not own and me is not None and (to_me or _mentions(body, me))
        out += [("", "["), (OWN_STYLE if own else nick_style(sender), sender), ("", head[len(sender):]),
                ("", "] "), (MENTION_STYLE if mention else "", body), ("", "\n")]
        return Shown(out, bell=mention and self.bell)


class Roster:
    """Who is online and which rooms exist, as far as the server's lines tell: for Tab completion."""

    def __init__(self) -> None:
        self._nicks: dict[str, str] = {}  # nick_key -> nick as written
        self._rooms: dict[str, str] = {}  # room key (folded) -> room as written

    def add(self, nick: str) -> None:
        self._nicks[protocol.nick_key(nick)] = nick

    def add_room(self, name: str) -> None:
        self._rooms[protocol.nick_key(name)] = name

    def feed_rooms(self, line: str) -> bool:
        """The server's answer to /rooms (``* 2 rooms: #dev (2), #lobby (5)``): the whole list; True if it was one."""
        if not _ROOMS_REPLY_RE.match(line):
            return False
        self._rooms = {}
        for name in re.findall(rf"{_ROOM} \(\d+\)", line):
            self.add_room(name)
        return True

    def feed(self, line: str) -> None:
        """Learn from one received line (welcome and /who lists, joins, leaves, renames, senders, rooms)."""
        if m := _ROOM_PREFIX_RE.match(line):  # a line of a room followed but not current
            self.add_room(m.group(1))
            return
        if protocol.is_notice(line):
            if self.feed_rooms(line):
                return
            if m := _ROOM_NOTICE_RE.match(line):
                self.add_room(m.group(1))
            if m := _MEMBERS_RE.match(line):
                for nick in m.group(1).split(", "):
                    self.add(nick)
            elif m := _ONLINE_RE.search(line):
                self._nicks = {}
                for nick in m.group(1).split(", "):
                    self.add(nick)
            elif m := _JOINED_RE.match(line):
                self.add(m.group(1))
            elif m := _LEFT_RE.match(line):
                self._nicks.pop(protocol.nick_key(m.group(1)), None)
            elif rename := protocol.renamed(line):
                self._nicks.pop(protocol.nick_key(rename[0]), None)
                self.add(rename[1])
        elif (sender := protocol.sender_of(line)) is not None:
            self.add(sender)

    def nicks(self) -> list[str]:
        return sorted(self._nicks.values(), key=str.casefold)

    def rooms(self) -> list[str]:
        return sorted(self._rooms.values(), key=str.casefold)


@dataclass
class _Cycle:
    text: str
    cursor: int
    start: int
    after: str
    suffix: str
    candidates: list[str]
    index: int = 0


class TabCompleter:
    """irssi-style Tab: completes the word before the cursor; Tab again cycles through the matches.

    A word starting with ``/`` at the start of the line completes to a command, the word after
    ``/join``, ``/part`` or ``/who`` to a room, anything else to an online nick (``bob: `` at the
    start of a line, ``bob `` elsewhere, after ``/msg`` too).
    """

    def __init__(self, roster: Roster, me: Callable[[], str | None]) -> None:
        self.roster = roster
        self.me = me
        self._cycle: _Cycle | None = None

    def candidates(self, text: str, cursor: int) -> tuple[int, list[str], str]:
        """(where the word starts, its completions, the suffix to add)."""
        start = text.rfind(" ", 0, cursor) + 1
        word = text[start:cursor]
        if start == 0 and word.startswith("/"):
            return start, [c for c in COMMANDS if c.startswith(word.lower())], " "
        before = text[:start].split()
        command = before[0].lower() if len(before) == 1 else ""
        if self.room_word(text, cursor):
            hash_ = "#" if word.startswith("#") else ""
            key = word.removeprefix("#").casefold()
            return start, [hash_ + r for r in self.roster.rooms() if r.casefold().startswith(key)], " "
        if not word and command not in NICK_COMMANDS:
            return start, [], ""
        me = self.me()
        key = word.casefold()
        found = [n for n in self.roster.nicks() if n.casefold().startswith(key) and n != me]
        return start, found, ": " if start == 0 else " "

    def room_word(self, text: str, cursor: int) -> bool:
        """Whether the word before the cursor is a room name (after /join, /part, /who)."""
        before = text[:text.rfind(" ", 0, cursor) + 1].split()
        return len(before) == 1 and before[0].lower() in ROOM_COMMANDS

    def complete(self, text: str, cursor: int) -> tuple[str, int] | None:
        """The new (text, cursor) after Tab, or None when nothing matches."""
        cycle = self._cycle
        if cycle is not None and cycle.text == text and cycle.cursor == cursor and len(cycle.candidates) > 1:
            cycle.index = (cycle.index + 1) % len(cycle.candidates)
        else:
            start, found, suffix = self.candidates(text, cursor)
            if not found:
                self._cycle = None
                return None
            cycle = self._cycle = _Cycle(text, cursor, start, text[cursor:], suffix, found)
        word = cycle.candidates[cycle.index] + cycle.suffix
        new_text = text[:cycle.start] + word + cycle.after
        cycle.text, cycle.cursor = new_text, cycle.start + len(word)
        return cycle.text, cycle.cursor

    @property
    def choices(self) -> list[str]:
        """The matches being cycled through (shown on the status line), empty when none."""
        return self._cycle.candidates if self._cycle is not None and len(self._cycle.candidates) > 1 else []

    def reset(self) -> None:
        self._cycle = None


@dataclass
class Pacer:
    """Keeps a client under the server's flood limit: a token bucket like the server's, a little slower.

    ``rate`` 0 means no limit. Sans-IO: time is passed in.
    """

    rate: float
    burst: float
    now: float
    _tokens: float = field(init=False)

    def __post_init__(self) -> None:
        self.rate *= PACE_RATE_SHARE
        self.burst = max(1.0, self.burst - PACE_BURST_RESERVE)
        self._tokens = self.burst

    def wait(self, now: float) -> float:
        """Seconds until the next line may go (0: now)."""
        if self.rate <= 0:
            return 0.0
        self._tokens = min(self.burst, self._tokens + (now - self.now) * self.rate)
        self.now = now
        # (the epsilon: waiting exactly the computed time must be enough, despite float rounding)
        return 0.0 if self._tokens >= 1.0 - 1e-9 else (1.0 - self._tokens) / self.rate

    def spend(self) -> None:
        """One line went out."""
        if self.rate > 0:
            self._tokens -= 1.0


@contextlib.contextmanager
def _no_echo(stream: TextIO) -> Iterator[None]:
    """The terminal neither echoes nor collects lines (signals still work: Ctrl-C interrupts)."""
    try:
        import termios  # POSIX only; elsewhere there is no line discipline to quieten
    except ImportError:
        yield
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (AttributeError, OSError, ValueError, termios.error):  # not a terminal: nothing to do
        yield
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def split_input(text: str) -> list[str]:
    """The chat lines in what was typed or pasted: one per line, blank ones dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [line for line in text.split("\n") if line.strip()]


class TerminalUI(Frontend):
    """The interactive front end: one prompt_toolkit application from joining to leaving."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pacer = Pacer(0.0, 1.0, time.monotonic())
        self.display = Display(lambda: self.client.nick, timestamps=getattr(self.args, "timestamps", True),
                               bell=getattr(self.args, "bell", True))
        self.roster = Roster()
        self.completer = TabCompleter(self.roster, lambda: self.client.nick)
        self.paste_verify = int(getattr(self.args, "paste_verify", PASTE_VERIFY_LINES))
        self._queue: deque[str] = deque()  # typed lines waiting for the pacer
        self._batch = 0  # lines queued since the queue was last empty
        self._pumping = False
        self._waiting = False
        self._paste: str | None = None  # a long paste waiting for y/n
        self._out: list[Shown] = []
        self._flushing = False
        self._ended = False
        self._app: Application[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rooms_asked = 0  # quiet /rooms sent, whose answers feed Tab completion instead of the screen
        self._tab_waiting: tuple[str, int] | None = None  # a room Tab waiting for that answer

    @property
    def app(self) -> Application[None]:
        """The running application (only used once :meth:`_chat` has made it)."""
        assert self._app is not None
        return self._app

    # -- joining ---------------------------------------------------------------------------

    def run(self) -> int:
        print(f"Connecting to {addr.join(self.args.host, self.args.port)}...", flush=True)
        self.connect()
        print(f"Connected ({'TLS' if self.client.tls else 'NOT ENCRYPTED'}).", flush=True)
        session: PromptSession[str] = PromptSession()
        self.client.want_echo = True
        # From here until the chat line is up the terminal does not echo: keys typed between the
        # nickname prompt and the chat line wait for the latter instead of showing as stray text.
        # (prompt_toolkit's own raw mode nests inside and restores this one.)
        with _no_echo(sys.stdin):  # whatever happens (a refusal, a lost connection), echo comes back
            nick = self._choose_nick(session, self.wanted_nick)
            if nick is None:
                return self.leave()
            self._negotiate()
            self._chat()
        if self._ended or self.client.closed:
            self.client.close()
            self.client._raise_ended()
        return self.leave()

    def _choose_nick(self, session: PromptSession[str], nick: str | None) -> str | None:
        """Ask (or use --nick) until the server accepts one; None when the user gives up."""
        while True:
            if nick is None:
                try:
                    nick = session.prompt("Enter your nickname: ").strip()
                except (EOFError, KeyboardInterrupt):
                    return None
            error = protocol.nick_error(nick)
            if error is not None:
                # Checked here first so the answer is instant; the server checks again anyway.
                print(f"That nickname won't do: {error}.", flush=True)
                nick = None
                continue
            try:
                return self.client.register(nick, timeout=self.args.timeout)
            except NickRefused as exc:
                print(f"Nickname refused: {exc.reason}. Choose another.", flush=True)
                nick = None

    def _negotiate(self) -> None:
        """Wait for the answer to ``/cap echo`` (ChatClient asks right after the welcome)."""
        if self.client.wait_capabilities(CAP_WAIT) and self.client.flood_limit is not None:
            self.pacer = Pacer(*self.client.flood_limit, time.monotonic())

    # -- chatting --------------------------------------------------------------------------

    def _chat(self) -> None:

        buffer = Buffer(multiline=False, history=InMemoryHistory(), accept_handler=self._accept,
                        on_text_changed=lambda _: self._typed())
        self.buffer = buffer
        confirming = Condition(lambda: self._paste is not None)
        kb = KeyBindings()

        @kb.add("tab", filter=~confirming)
        def _tab(event: KeyPressEvent) -> None:
            if not self._tab() and self.completer.room_word(buffer.text, buffer.cursor_position):
                # A room made since we last asked: ask again, and complete when the answer comes.
                self._tab_waiting = (buffer.text, buffer.cursor_position)
                self._ask_rooms()

        @kb.add(Keys.BracketedPaste)
        def _paste(event: KeyPressEvent) -> None:
            data = event.data.replace("\r\n", "\n").replace("\r", "\n")
            ended = data.endswith("\n")  # the last line's Enter was copied along: it is sent, as typed
            data = data.removesuffix("\n")
            if self.paste_verify and data.count("\n") + 1 > self.paste_verify and self._paste is None:
                doc = buffer.document
                self._paste = doc.text_before_cursor + data + doc.text_after_cursor
            elif self._paste is None:
                buffer.insert_text(data)
                if ended:
                    buffer.validate_and_handle()

        @kb.add(Keys.Vt100MouseEvent)
        def _not_mouse(event: KeyPressEvent) -> None:
            # Mouse reporting is off, so this is text that merely looks like a mouse report, such as
            # a typed or pasted "ESC [ 3 1 m" (prompt_toolkit's own handler would crash on it): keep
            # what is printable, drop the escape.
            buffer.insert_text(protocol.sanitize(event.data.replace("\x1b", "")))

        @kb.add("y", filter=confirming)
        def _yes(event: KeyPressEvent) -> None:
            text, self._paste = self._paste or "", None
            buffer.reset()
            self._submit_all(text)

        @kb.add("n", filter=confirming)
        @kb.add("escape", filter=confirming, eager=True)
        @kb.add("c-c", filter=confirming)
        def _no(event: KeyPressEvent) -> None:
            lines = len(split_input(self._paste or ""))
            self._paste = None
            self._print(self.display.local(f"paste of {lines} lines discarded"))

        @kb.add("<any>", filter=confirming)
        @kb.add("enter", filter=confirming)
        def _ignore(event: KeyPressEvent) -> None:
            pass  # while asking about a paste, only y/n count

        @kb.add("c-c", filter=~confirming)
        def _interrupt(event: KeyPressEvent) -> None:
            event.app.exit()

        @kb.add("c-d", filter=~confirming)
        def _eof(event: KeyPressEvent) -> None:
            if buffer.text:
                buffer.delete()
            else:
                event.app.exit()

        def prompt() -> StyleAndTextTuples:
            me = self.client.nick or "?"
            return [(OWN_STYLE, me), ("", "> ")]

        def status() -> StyleAndTextTuples:
            return [(STATUS_STYLE, self._status())]

        self._completing = False
        root = HSplit([
            ConditionalContainer(Window(FormattedTextControl(status), height=1),
                                 filter=Condition(lambda: bool(self._status()))),
            VSplit([
                Window(FormattedTextControl(prompt), dont_extend_width=True),
                Window(BufferControl(buffer), wrap_lines=True,
                       height=Dimension(min=1, max=INPUT_MAX_ROWS)),
            ]),
        ])
        app: Application[None] = Application(layout=Layout(root, focused_element=buffer),
                                             key_bindings=merge_key_bindings([load_key_bindings(), kb]),
                                             full_screen=False, erase_when_done=True, mouse_support=False)
        self._app = app

        def pre_run() -> None:
            self._loop = asyncio.get_running_loop()
            self.client.set_on_line(self._on_line)
            self._ask_rooms()  # the rooms that exist, for Tab after /join
            threading.Thread(target=self._watch_end, name="securechat-watch", daemon=True).start()

        try:
            app.run(pre_run=pre_run)
        finally:
            self._loop = None
            self.client.set_on_line(None)
            self._flush()
            if self._queue:
                print(f"-!- {len(self._queue)} line(s) still waiting were not sent", flush=True)
                self._queue.clear()

    def _status(self) -> str:
        if self._paste is not None:
            return f" Send {len(split_input(self._paste))} pasted lines? y = send, n = discard "
        if self._queue and self._waiting:
            return f" sending {self._batch} lines... {len(self._queue)} to go "
        if self.completer.choices:
            return " " + "  ".join(self.completer.choices) + " "
        return ""

    def _typed(self) -> None:
        if not self._completing:
            self.completer.reset()

    def _tab(self) -> bool:
        """Complete the word before the cursor; False when nothing matches."""
        done = self.completer.complete(self.buffer.text, self.buffer.cursor_position)
        if done is None:
            return False
        self._completing = True
        self.buffer.set_document(Document(done[0], done[1]), bypass_readonly=True)
        self._completing = False
        return True

    def _ask_rooms(self) -> None:
        """Ask the server which rooms exist, quietly (one question at a time)."""
        if not self._rooms_asked and self.client.send(f"/{ROOMS_COMMAND}"):
            self._rooms_asked += 1
            self.pacer.spend()  # it counts against the flood limit like any line

    def _on_line(self, line: str) -> None:
        """Connection thread: hand the line to the application's loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._received, line)
        except RuntimeError:  # the loop has closed: the application is over
            pass

    def _watch_end(self) -> None:
        self.client.wait_closed()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._end)
            except RuntimeError:
                pass

    def _end(self) -> None:
        self._ended = True
        app = self._app
        if app is None:
            return
        with set_app(app):
            if app.is_running and app.future is not None and not app.future.done():
                app.exit()

    def _received(self, line: str) -> None:
        if self._rooms_asked and self.roster.feed_rooms(line):  # the answer to our quiet /rooms
            self._rooms_asked -= 1
            waiting, self._tab_waiting = self._tab_waiting, None
            if waiting == (self.buffer.text, self.buffer.cursor_position):
                self._tab()
            return
        self.roster.feed(line)
        self._print(self.display.render(line))

    def _print(self, shown: Shown) -> None:
        """Print above the input line; lines arriving together are printed in one redraw."""
        self._out.append(shown)
        app = self._app
        if app is None or not app.is_running or self._loop is None:
            self._flush()
        elif not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)  # after the lines already waiting in the loop

    def _flush(self) -> None:

        self._flushing = False
        shown, self._out = self._out, []
        if not shown:
            return
        text = FormattedText([frag for s in shown for frag in s.fragments])
        bell = any(s.bell for s in shown)
        app = self._app
        if app is not None and app.is_running:
            # What run_in_terminal does, minus its switch to cooked mode: in cooked mode the terminal
            # itself echoes keys typed meanwhile, and they stay on the screen as stray lines.
            app.renderer.erase()
            app.print_text(text)
            if bell:
                app.output.bell()
            app.output.flush()
            app.renderer.reset()
            app.invalidate()
        else:
            print_formatted_text(text, end="")
            if bell:
                print("\a", end="", flush=True)

    # -- sending ---------------------------------------------------------------------------

    def _accept(self, buffer: Buffer) -> bool:
        self._submit_all(buffer.text)
        return False  # clear the input line

    def _submit_all(self, text: str) -> None:
        for line in split_input(text):
            if is_quit(line):
                self.app.exit()
                return
            size = len(protocol.encode(line))
            if size > protocol.MAX_LINE_BYTES:
                self._print(self.display.local(f"not sent: line too long ({size} bytes, at most "
                                               f"{protocol.MAX_LINE_BYTES}): {line[:40]}..."))
                continue
            self._queue.append(line)
            self._batch += 1
        if self._queue and not self._pumping:
            self._pumping = True
            self.app.create_background_task(self._pump())

    async def _pump(self) -> None:
        """Send queued lines as fast as the server's flood limit allows, in order."""
        try:
            while self._queue:
                wait = self.pacer.wait(time.monotonic())
                if wait > 0:
                    self._waiting = True  # only now is there something to show: "sending N lines..."
                    self.app.invalidate()
                    await asyncio.sleep(wait)
                    continue
                line = self._queue.popleft()
                self.pacer.spend()
                if not self.client.send(line):
                    break
                if not self.client.echo:  # a server without /cap echo: show our own line ourselves
                    echo = own_echo(self.client.nick or "?", line)
                    if echo is not None:
                        self._received(echo)
        finally:
            self._pumping = self._waiting = False
            if not self._queue:
                self._batch = 0
            self.app.invalidate()

