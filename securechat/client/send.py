"""``securechat send HOST[:PORT] FILE [--to NICK|#room]``: share one file; prints its id (see :mod:`.sendget`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from securechat.client import connect
from securechat.client.chat import ChatClient
from securechat.client.files import send_file
from securechat.client.sendget import Progress, join, run
from securechat.wire import filexfer, options
from securechat.wire.filexfer import human_size

PROG = "securechat send"


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(prog=PROG, description="Share one file with a room or a person on a securechat server; "
                       "prints its id.")
    p.add_argument("host", metavar="HOST[:PORT]", help="the server, as for 'securechat connect'")
    p.add_argument("file", type=options.path, metavar="FILE", help="the file to share")
    p.add_argument("--to", metavar="NICK|#ROOM", default=filexfer.CURRENT_ROOM,
                   help="a person (their nickname) or a room (#name, joined for the occasion); default: #lobby")
    connect.add_server_arguments(p, nick="the nickname to share under (default: the name in --cert, else your "
                                 "login name)")
    return p


def _work(args: argparse.Namespace, client: ChatClient) -> tuple[str, str]:
    if args.to.startswith("#"):
        join(client, args.to)
    shown = Progress(PROG, "sending", filexfer.clean_name(args.file.name))
    try:
        file_id, name, size = send_file(client, args.file, args.to, shown, shown.say, timeout=args.timeout)
    finally:
        shown.end()
    where = "#lobby" if args.to == filexfer.CURRENT_ROOM else args.to
    if shown.on:
        sys.stderr.write(f"shared {name} ({human_size(size)}) with {where}: /get {file_id}\n")
    return file_id, f"shared all the same with {where}: /get {file_id}"


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat send``: 0 once the file is stored and announced, 1 on any failure, 2 on usage."""
    return run(PROG, build_parser(), argv, _work)
