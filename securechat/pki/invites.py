"""``securechat invite [NAME]``: make, list and cancel invites in the CA's ledger.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from securechat.pki import serving
from securechat.pki.ledger import (
    DEFAULT_CERT_DAYS,
    DEFAULT_EXPIRES,
    MAX_CERT_DAYS,
    MAX_EXPIRES,
    MAX_USES,
    MAX_WRONG_TRIES,
    Store,
    StoreError,
    utc,
)
from securechat.wire import options
from securechat.wire.addr import DEFAULT_PORT, host_text
from securechat.wire.addr import join as join_address

PROG = "securechat invite"
DEFAULT_CERTS = Path("certs")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 60}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d`` (a bare number is minutes) -> seconds, within the bounds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (examples: 90s, 15m, 2h, 1d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= MAX_EXPIRES:
        raise argparse.ArgumentTypeError(f"an invite lives more than 0 and at most {MAX_EXPIRES / 86400:g} days")
    return seconds


parse_duration.__name__ = "duration"  # a validating type, for argparse's messages and the option walk


def _name_arg(text: str) -> str:
    from securechat.pki.certs import validate_client_name

    try:
        return validate_client_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cancel_arg(text: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]{1,24}", text):  # a nameplate number, or a name
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither an invite number nor a name")


def _human(seconds: float) -> str:
    """``15 minutes``, ``2 hours``, ``90 seconds``: the largest unit that divides it exactly."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


def no_ca_here(certs_dir: Path) -> str | None:
    """Why ``certs_dir`` is not where the CA lives (invites, revocations and the certificate registry are
    kept beside ``ca.key``), or None. Checked before anything is opened, so nothing is created there."""
    if (certs_dir / "ca.key").is_file():
        return None
    if not certs_dir.is_dir():
        return (f"no certificate directory {certs_dir}: run this on the server machine, in the folder where "
                "'securechat serve' minted certs/, or pass --certs DIR")
    copy = " (ca.pem alone is a client's copy of the CA)" if (certs_dir / "ca.pem").is_file() else ""
    return (f"no CA here: {certs_dir} holds no ca.key{copy}; run this on the server machine, in the folder "
            "where 'securechat serve' minted certs/, or pass --certs DIR")


def _join_host(certs_dir: Path) -> str:
    """What a joiner most likely types to reach this server: a LAN address its certificate names."""
    try:
        cert = x509.load_pem_x509_certificate((certs_dir / "server.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return "<this machine's IP>"
    addrs = [str(a) for a in san.get_values_for_type(x509.IPAddress) if not a.is_loopback]
    names = [n for n in san.get_values_for_type(x509.DNSName) if n != "localhost" and not n[0].isdigit()]
    return (addrs or names or ["<this machine's IP>"])[0]


def certs_dir_option(p: argparse.ArgumentParser) -> None:
    """``--certs DIR``, shared by invite, revoke and certs."""
    p.add_argument("--certs", type=options.path, default=DEFAULT_CERTS, metavar="DIR",
                   help="the server's certificate directory, with the CA (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog=PROG,
        description="Make a one-time code that lets someone join this server from their own machine: "
        "'securechat join HOST CODE' there fetches the CA certificate and, for a named invite, a client "
        "certificate whose key never leaves that machine. Works while the server runs.",
        epilog="Without NAME the invite gives trust in the server only (the guest picks a nickname). "
        f"A code allows {MAX_WRONG_TRIES} wrong tries, then it is burned.")
    p.add_argument("name", nargs="?", type=_name_arg,
                   help="the person's name: their certificate's name and their nickname (mutual TLS)")
    p.add_argument("--expires", type=parse_duration, default=DEFAULT_EXPIRES, metavar="TIME",
                   help="how long the code works: 90s, 15m, 2h, 1d (default: 15m)")
    p.add_argument("--uses", type=options.count(1, MAX_USES), default=1, metavar="N",
                   help="how many people or machines may join with it (default: 1)")
    p.add_argument("--cert-days", type=options.count(1, MAX_CERT_DAYS), default=DEFAULT_CERT_DAYS,
                   metavar="N", help="client certificate lifetime in days; clients renew their own "
                   "(default: %(default)s)")
    p.add_argument("--host", type=options.server_address, metavar="HOST[:PORT]",
                   help="the address joiners type (default: the one the running server offers first)")
    p.add_argument("--port", type=options.port, default=None,
                   help="the server's port (default: the running server's)")
    certs_dir_option(p)
    action = p.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the invites still usable")
    action.add_argument("--cancel", type=_cancel_arg, metavar="NUMBER|NAME",
                        help="cancel an invite by its number or name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat invite``: 0, 1 on failure, 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.list or args.cancel) and args.name:
        parser.error("NAME cannot be combined with --list or --cancel")
    if args.host is not None:
        try:
            args.port = options.server_port(args.host, args.port, 0) or None
        except ValueError as exc:
            parser.error(f"argument --host: {exc}")
    missing = no_ca_here(args.certs)
    if missing:
        options.print_error(PROG, missing)
        return 1
    store = Store(args.certs)
    try:
        if args.list:
            return _list_invites(store)
        if args.cancel:
            cancelled = store.cancel(args.cancel)
            if not cancelled:
                options.print_error(PROG, f"no usable invite {args.cancel!r} (securechat invite --list shows them)")
                return 1
            for inv in cancelled:
                print(f"Cancelled invite {inv.nameplate}{f' for {inv.name}' if inv.name else ''}.")
            return 0
        invite = store.create(args.name, expires_in=args.expires, uses=args.uses, cert_days=args.cert_days)
    except StoreError as exc:
        options.print_error(PROG, str(exc))
        return 1
    where, warning = _where(args)
    if warning:
        options.print_error(PROG, f"warning: {warning}")
    who = invite.name or "your guest"
    once = "once" if invite.uses_total == 1 else f"{invite.uses_total} times"
    try:
        print(f"Give {who} this line (valid {_human(args.expires)}, {once}):")
        print(f"  securechat join {where} {invite.code}")
    except options.OutputLost as exc:
        # Nobody saw the code: left usable, it would be a live secret no one knows is out there.
        store.cancel(str(invite.nameplate))
        options.print_error(PROG, f"cannot write to standard output ({exc}): invite {invite.nameplate} cancelled, "
                            "since nobody saw its code")
        return 1
    return 0


def _where(args: argparse.Namespace) -> tuple[str, str]:
    """The address for the join line (``HOST``, or ``HOST:PORT`` off the default port), and a warning if
    no running server with this CA matches it."""
    live = serving.running(args.certs)
    match = [s for s in live if args.port is None or s.port == args.port]
    port = args.port or (match[0].port if match else DEFAULT_PORT)
    host = args.host[0] if args.host else next((s.hosts[0] for s in match if s.hosts), None) or _join_host(args.certs)
    where = host_text(host) if port == DEFAULT_PORT else join_address(host, port)
    if not live:
        return where, (f"no server is running with the CA in {args.certs}: start 'securechat serve' there "
                       f"before the code is used (this line assumes port {port})")
    if not match:
        return where, (f"no server with the CA in {args.certs} listens on port {port}; running: "
                       f"port {', '.join(str(s.port) for s in live)}")
    if len(match) > 1:
        return where, (f"several servers use this CA (ports {', '.join(str(s.port) for s in match)}): the code "
                       f"works on any of them; the line names port {port} (--port picks another)")
    return where, ""


def _list_invites(store: Store) -> int:
    invites = store.invites()
    if not invites:
        print("No usable invites.")
        return 0
    print(f"{'number':>6}  {'name':<24}  {'uses left':>9}  {'wrong tries':>11}  expires")
    for inv in invites:
        print(f"{inv.nameplate:>6}  {inv.name or '(guest)':<24}  {inv.uses_left:>9}  "
              f"{inv.tries:>8}/{MAX_WRONG_TRIES}  {utc(inv.expires)}")
    return 0
