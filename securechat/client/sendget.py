"""What ``securechat send HOST FILE`` and ``securechat get HOST ID`` share: joining for one transfer.

Each joins the chat for the length of one transfer (a nickname; the room with ``--to #room`` or
``--room``), asks for the ticket there, moves the file on a connection of its own
(:mod:`securechat.client.files`) and leaves. The server is reached and recognised exactly as by
``connect`` (``--ca``, ``--pin``, ``--tofu``, ``--cert``, the profile ``securechat join`` saved).

stdout gets the one thing a script wants: the new file's id (``send``) or the path it was saved as
(``get``). stderr gets a progress line when it is a terminal, and any failure as one line.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from collections.abc import Callable, Sequence

from securechat.client import connect
from securechat.client.chat import ChatClient
from securechat.client.errors import ChatError
from securechat.wire import filexfer, options, protocol
from securechat.wire.conn import describe_error
from securechat.wire.filexfer import TransferError
from securechat.wire.options import EXIT_FAILURE, EXIT_OK


def _default_nick() -> str:
    """The login name, made into a nickname (``Jean Dupont`` -> ``Jean_Dupont``)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = ""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:protocol.MAX_NICK_CHARS]
    return name if protocol.nick_error(name) is None else "guest"


class Progress:
    """``sending report.pdf: 45% of 256 MiB, 300 MiB/s`` on stderr, rewritten in place (a terminal only)."""

    def __init__(self, prog: str, verb: str, name: str) -> None:
        self.prog, self.verb, self.name = prog, verb, name
        self.on = sys.stderr.isatty()
        self.start = time.monotonic()
        self.first = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.on:
            return
        if self.first < 0:
            self.first = done
        elapsed = time.monotonic() - self.start
        rate = (done - self.first) / elapsed if elapsed > 0.2 else 0.0
        sys.stderr.write("\r\x1b[K" + filexfer.progress(self.verb, self.name, done, total, rate))
        sys.stderr.flush()

    def named(self, name: str) -> None:
        """The file's name, once the server said it (shown instead of its id)."""
        self.name = name

    def end(self) -> None:
        if self.on and self.first >= 0:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def say(self, text: str) -> None:
        self.end()
        options.print_error(self.prog, text)


def run(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
         work: Callable[[argparse.Namespace, ChatClient], tuple[str, str]]) -> int:
    """Parse, connect and register, run ``work``, leave. ``work`` returns what goes to stdout, and how to
    say it was done all the same should stdout fail (status 1, one line, as every command)."""
    args = parser.parse_args(argv)
    try:
        servers = connect.parse_servers(args.host, args.port)
    except ValueError as exc:
        parser.error(f"argument HOST[:PORT]: {exc}")
    if len(servers) > 1:
        parser.error("argument HOST[:PORT]: one server (a file is moved to or from one of the chat's servers)")
    (args.host, args.port), args.alternates = servers[0], []
    if args.key is not None and args.cert is None:
        parser.error("--key needs --cert (your client certificate)")
    args.cert_name = None
    client = ChatClient(reconnect=False)
    try:
        context, trust = connect.build_context(args)
        client.connect(args.host, args.port, ssl_context=context, trust=trust, timeout=args.timeout,
                       context_factory=connect.context_factory(args, context))
        client.wait_greeting(args.timeout)
        nick = args.nick or args.cert_name or _default_nick()
        client.register(nick, timeout=args.timeout)
        client.set_on_line(lambda line: None)  # the room's lines are not this command's business
        result, anyway = work(args, client)
    except (ChatError, TransferError) as exc:
        options.print_error(prog, str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        options.print_error(prog, "interrupted")
        return EXIT_FAILURE
    finally:
        client.quit(wait=1.0) if client.nick is not None else client.close()
    try:
        print(result, flush=True)
    except (options.OutputLost, OSError) as exc:  # the file moved; only its id (or path) is lost
        why = exc if isinstance(exc, options.OutputLost) else describe_error(exc)
        options.silence_stdout()
        options.print_error(prog, f"cannot write to standard output ({why}); {anyway}")
        return EXIT_FAILURE
    return EXIT_OK


def join(client: ChatClient, room: str) -> None:
    client.send(f"/join {room}")


