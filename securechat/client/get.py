"""``securechat get HOST[:PORT] ID [--out DIR]``: fetch one shared file; prints where it went (see :mod:`.sendget`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from securechat.client import connect
from securechat.client.chat import ChatClient
from securechat.client.files import get_file
from securechat.client.sendget import Progress, join, run
from securechat.wire import options
from securechat.wire.filexfer import TransferError

PROG = "securechat get"


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(prog=PROG, description="Fetch one shared file from a securechat server; prints where it "
                       "was saved.")
    p.add_argument("host", metavar="HOST[:PORT]", help="the server, as for 'securechat connect'")
    p.add_argument("id", metavar="ID", help="the file's id: what follows /get in the line that shared it")
    p.add_argument("--out", type=options.path, metavar="DIR", default=Path("."),
                   help="the directory to save it in (default: the current one); an existing file is never "
                   "replaced: 'report (1).pdf'")
    p.add_argument("--room", metavar="#ROOM",
                   help="the room it was shared in (a room's files are for its members: this joins it first)")
    connect.add_server_arguments(p, nick="the nickname to join under (default: the name in --cert, else your "
                                 "login name)")
    return p


def _work(args: argparse.Namespace, client: ChatClient) -> tuple[str, str]:
    if args.room:
        join(client, args.room if args.room.startswith("#") else "#" + args.room)
    shown = Progress(PROG, "receiving", args.id)
    try:
        path = get_file(client, args.id, args.out, shown, shown.say, timeout=args.timeout, named=shown.named)
    except TransferError as exc:
        if str(exc).startswith("no such file") and not args.room:
            raise TransferError(f"{exc} (a room's file is for its members: pass --room NAME)") from None
        raise
    finally:
        shown.end()
    return str(path), f"saved all the same as {path}"


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat get``: 0 once the file is saved (and its SHA-256 checked), 1 on any failure."""
    return run(PROG, build_parser(), argv, _work)
