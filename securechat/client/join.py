"""``securechat join HOST CODE``: enroll with an invite code and remember the server as a profile.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence

from securechat.client import profiles
from securechat.client.enroll import join
from securechat.pki.enrollment import (
    JoinError,
)
from securechat.wire import addr, options, tls
from securechat.wire.addr import DEFAULT_PORT
from securechat.wire.conn import describe_error

PROG = "securechat join"


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog=PROG,
        description="Join a securechat server with the invite code its admin gave you ('securechat invite' "
        "on the server). Makes your key here (it never leaves this machine), fetches your certificate and "
        "the server's CA, and remembers them: afterwards 'securechat connect HOST' needs nothing else.")
    p.add_argument("host", type=options.server_address, metavar="HOST[:PORT]",
                   help="the server's address, as given with the code: 192.168.0.20, 192.168.0.20:6000, "
                   "[fe80::1%%eth0]:6000")
    p.add_argument("code", help="the invite code, like 7-crayon-galaxy-lunar")
    p.add_argument("--port", type=options.port, default=None, help=f"TCP port (default: {DEFAULT_PORT})")
    p.add_argument("--timeout", type=options.duration(), default=10.0, metavar="SECONDS",
                   help="time allowed to connect (default: %(default)g)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat join HOST CODE``: 0 once the profile is saved, 1 on any failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.port = options.server_port(args.host, args.port)
    except ValueError as exc:
        parser.error(f"argument HOST[:PORT]: {exc}")
    args.host = args.host[0]
    try:
        where = profiles.prepare(args.host, args.port)
    except OSError as exc:
        options.print_error(PROG, f"cannot write the profile in {profiles.servers_dir()}: {describe_error(exc)}")
        return 1
    try:
        enrolled = join(args.host, args.port, args.code, timeout=args.timeout)
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
    except options.OutputLost as exc:  # status 1 as for any lost output, saying the join itself worked
        options.print_error(PROG, f"cannot write to standard output ({exc}); joined all the same (the profile is "
                            f"saved), from now on: securechat connect {target}")
        return 1
    if not enrolled.names_host(args.host):
        options.print_error(PROG, f"note: the server's certificate does not name {args.host!r}, so 'connect' will "
                            f"refuse it: ask the server's admin to run 'securechat gen-certs --ip/--host {args.host}'")
    return 0
