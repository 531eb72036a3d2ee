"""``securechat join HOST CODE``: enroll with an invite code and remember the server as a profile.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from securechat.client import profiles
from securechat.client.enroll import finish, join
from securechat.pki.enrollment import (
    JoinError,
)
from securechat.wire import addr, options, tls
from securechat.wire.addr import DEFAULT_PORT
from securechat.wire.conn import describe_error

if TYPE_CHECKING:
    from securechat.client.discover import Found

PROG = "securechat join"


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog=PROG,
        description="Join a securechat server with the invite code its admin gave you ('securechat invite' "
        "on the server). Makes your key here (it never leaves this machine), fetches your certificate and "
        "the server's CA, and remembers them: afterwards 'securechat connect HOST' needs nothing else.")
    p.add_argument("host", type=options.server_address, metavar="HOST[:PORT]", nargs="?",
                   help="the server's address, as given with the code: 192.168.0.20, 192.168.0.20:6000, "
                   "[fe80::1%%eth0]:6000; left out, the server on this network that holds the invite is found "
                   "(mDNS), and the code proves it is the right one")
    p.add_argument("code", help="the invite code, like 7-crayon-galaxy-lunar")
    p.add_argument("--port", type=options.port, default=None, help=f"TCP port (default: {DEFAULT_PORT})")
    p.add_argument("--timeout", type=options.duration(), default=10.0, metavar="SECONDS",
                   help="time allowed to connect (default: %(default)g)")
    return p


def _search() -> list[Found]:
    """The servers on this network, for a join without an address; JoinError when it cannot search."""
    from securechat.client import discover

    try:
        return discover.browse()
    except discover.DiscoveryError as exc:
        raise JoinError(f"no server address given, and {exc}: give the one that came with the code, as in "
                        "'securechat join 192.168.0.20 CODE'") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat join HOST CODE``: 0 once the profile is saved, 1 on any failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    started = None
    if args.host is None:
        from securechat.client import servers

        try:
            found, started = servers.find_inviter(_search(), args.code, timeout=args.timeout)
        except JoinError as exc:
            options.print_error(PROG, str(exc))
            return 1
        args.host, args.port = found.host, found.port
        print(f"Found '{found.name}' at {found.where} on this network; checking with the code that it is the "
              "inviting server...", flush=True)
    else:
        try:
            args.port = options.server_port(args.host, args.port)
        except ValueError as exc:
            parser.error(f"argument HOST[:PORT]: {exc}")
        args.host = args.host[0]
    try:
        where = profiles.prepare(args.host, args.port)
    except OSError as exc:
        if started is not None:
            started.close()  # nothing spent: the server counts a try only at the confirmation
        options.print_error(PROG, f"cannot write the profile in {profiles.servers_dir()}: {describe_error(exc)}")
        return 1
    try:
        enrolled = finish(started) if started is not None else join(args.host, args.port, args.code,
                                                                    timeout=args.timeout)
        profile = profiles.save(args.host, args.port, enrolled)
    except JoinError as exc:
        with contextlib.suppress(OSError):
            where.rmdir()  # only if empty: a profile from an earlier join stays
        options.print_error(PROG, str(exc))
        return 1
    except OSError as exc:
        options.print_error(PROG, f"cannot save the profile: {describe_error(exc)}")
        return 1
    target = addr.host_text(args.host) if args.port == DEFAULT_PORT else addr.join(args.host, args.port)
    who = f" as {enrolled.name}" if enrolled.name else " (you pick a nickname when you connect)"
    try:
        print(f"Joined {args.host}{who}. From now on: securechat connect {target}")
        print(f"(server CA fingerprint {tls.fingerprint(enrolled.ca_pem.decode('ascii'))}; saved in {profile.dir})")
        if started is not None:
            print("On this network, 'securechat connect' with no address finds it too (by its CA).")
    except options.OutputLost as exc:  # status 1 as for any lost output, saying the join itself worked
        options.print_error(PROG, f"cannot write to standard output ({exc}); joined all the same (the profile is "
                            f"saved), from now on: securechat connect {target}")
        return 1
    if not enrolled.names_host(args.host):
        options.print_error(PROG, f"note: the server's certificate does not name {args.host!r}, so 'connect' will "
                            f"refuse it: ask the server's admin to run 'securechat gen-certs --ip/--host {args.host}'")
    return 0
