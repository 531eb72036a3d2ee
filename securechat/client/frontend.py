"""What the two front ends of ``securechat connect`` share, and the plain one: line mode for pipes.

The terminal screen (:mod:`securechat.client.ui`) builds on :class:`Frontend` too; the display helpers
here (nick colours, how one's own line looks) are the ones both show.
"""

from __future__ import annotations

import argparse
import queue
import ssl
import sys
import threading
import zlib

from securechat.client import identity
from securechat.client.chat import GREETING_WAIT, MAX_STDIN_LINES, ChatClient
from securechat.client.errors import ChatError, TLSRequired
from securechat.wire import addr, protocol
from securechat.wire.options import EXIT_OK

# -- display ---------------------------------------------------------------------------------

# Readable on dark and light backgrounds alike; red is left out so nobody looks like an error.
NICK_PALETTE = (
    "ansigreen", "ansiyellow", "ansiblue", "ansimagenta", "ansicyan",
    "ansibrightgreen", "ansibrightyellow", "ansibrightblue", "ansibrightmagenta", "ansibrightcyan",
)  # fmt: skip

NOTICE_STYLE = "italic fg:ansibrightblack"


def nick_style(nick: str) -> str:
    """A colour for ``nick``, the same in every run and on every machine (crc32, not hash())."""
    key = protocol.nick_key(nick).encode("utf-8")
    return "bold fg:" + NICK_PALETTE[zlib.crc32(key) % len(NICK_PALETTE)]


def own_echo(nick: str, text: str) -> str | None:
    """How a line the user sent looks to the others, to show locally (the server doesn't echo)."""
    parsed = protocol.parse(text)
    if isinstance(parsed, str):
        return f"[{nick}] {parsed}" if parsed.strip() else None
    if parsed.name == "me" and parsed.arg:
        return f"[{nick}] * {parsed.arg}"
    if parsed.name == "msg":
        target, _, body = parsed.arg.partition(" ")
        if target and body.strip():
            return f"[{nick} -> {target}] {body}"
    return None


def is_quit(text: str) -> bool:
    parsed = protocol.parse(text.strip())
    return isinstance(parsed, protocol.Command) and parsed.name == "quit"


class Frontend:
    """What both front ends share: connecting, and choosing a nickname."""

    def __init__(self, args: argparse.Namespace, context: ssl.SSLContext | None,
                 trust: identity.ServerTrust | None = None) -> None:
        self.args = args
        self.context = context
        self.trust = trust
        self.client = ChatClient()

    def run(self) -> int:
        """Chat until the user leaves or the connection ends; the exit status."""
        raise NotImplementedError

    @property
    def wanted_nick(self) -> str | None:
        """--nick, else the name in --cert (a mutual-TLS server grants that one anyway), else None."""
        return self.args.nick if self.args.nick is not None else self.args.cert_name

    def connect(self) -> None:
        args = self.args
        self.client.connect(args.host, args.port, ssl_context=self.context, timeout=args.timeout,
                            trust=self.trust, alternates=getattr(args, "alternates", ()))
        wait = min(GREETING_WAIT, args.timeout)
        if not self.client.wait_greeting(wait):
            # Before the nickname goes out: a securechat server greets at once.
            where = addr.join(self.client.host, self.client.port)
            self.client.close(timeout=0.5)
            if self.client.tls:
                raise ChatError(f"{where} completed the TLS handshake but sent no securechat greeting within "
                                f"{wait:g} s: it is not a securechat server; nothing was sent to it")
            # In clear: a TLS server waits for a ClientHello, silently.
            raise TLSRequired(f"{where} sent no greeting within {wait:g} s: it probably requires TLS; drop --plain "
                              "and pass --ca with the server's ca.pem (or --pin/--tofu); nothing was sent")

    def leave(self) -> int:
        """Say /quit, let the server answer, and report how it ended.

        Raises Disconnected when the server had already ended the connection for its own reasons
        (shutdown, kicked), so that is reported rather than passed off as a normal exit.
        """
        if self.client.reconnecting:  # leaving while the network is down: nothing to say goodbye to
            self.client.close()
            return EXIT_OK
        if self.client.closed:
            self.client._raise_ended()
        self.client.quit()
        if self.client.end_reason == "closed by peer" and self.client.last_notice != "goodbye":
            self.client._raise_ended()
        return EXIT_OK


class LineMode(Frontend):
    """stdin is a pipe or a file: send each line, print each received line, leave at EOF."""

    def __init__(self, args: argparse.Namespace, context: ssl.SSLContext | None,
                 trust: identity.ServerTrust | None = None) -> None:
        super().__init__(args, context, trust)
        self.stdin: queue.Queue[str | None] = queue.Queue(MAX_STDIN_LINES)
        self.out_lock = threading.Lock()

    def _read_stdin(self) -> None:
        # A thread, not poll() on fd 0: the seed's menu reads with input(), and sys.stdin may already
        # hold later lines in its buffer, which only sys.stdin itself can hand over.
        try:
            for line in sys.stdin:
                self.stdin.put(line.rstrip("\r\n"))
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        self.stdin.put(None)

    def _print(self, line: str) -> None:
        with self.out_lock:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # stdout closed (a pipe whose reader left): keep chatting silently

    def _next_input(self) -> str | None:
        """The next stdin line; None at EOF; raises Disconnected if the connection ends first."""
        while True:
            try:
                return self.stdin.get(timeout=0.1)
            except queue.Empty:
                if self.client.closed:
                    self.client._raise_ended()

    def run(self) -> int:
        self.connect()
        threading.Thread(target=self._read_stdin, name="securechat-stdin", daemon=True).start()
        nick = self.wanted_nick
        if nick is None:
            sys.stdout.write("Enter your nickname: ")
            sys.stdout.flush()
            nick = self._next_input()
            if nick is None:
                self.client.close()
                return EXIT_OK
            nick = nick.strip()
        # Scripts fail loudly on a refused nick rather than feed their next lines in as nicknames.
        self.client.register(nick, timeout=self.args.timeout)
        self.client.set_on_line(self._print)
        while True:
            text = self._next_input()
            if text is None or is_quit(text):
                return self.leave()
            if not self.client.send(text):
                self.client.wait_closed(1.0)
                self.client._raise_ended()
