"""``securechat invite [NAME]``: make, list and cancel invites in the CA's ledger.

``invite NAME`` makes a code for ``securechat join``; ``invite NAME --web`` a one-time link that makes a
browser NAME's (:mod:`securechat.pki.devices`); ``invite --qr`` makes no invite at all, it shows the address
of the server's onboarding page as a QR code, for phones to scan.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from securechat.pki import devices, serving
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
from securechat.wire import options, tls
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
    if re.fullmatch(r"[A-Za-z0-9_-]{1,24}", text):  # a nameplate number, a browser link's wN, or a name
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
    p.add_argument("--web", action="store_true",
                   help="a one-time link (and QR code) that makes a browser NAME's: for phones and computers "
                   "without securechat, on any server, also one with --require-client-cert")
    p.add_argument("--qr", action="store_true",
                   help="without NAME: make no invite, show the server's onboarding page (the CA for browsers, "
                   "http://HOST:PORT/) as a QR code to scan with a phone")
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
    if (args.list or args.cancel) and (args.name or args.web or args.qr):
        parser.error("NAME, --web and --qr cannot be combined with --list or --cancel")
    if args.web and not args.name:
        parser.error("--web needs NAME: the link makes a browser that person's (securechat invite NAME --web)")
    if args.web and args.uses != 1:
        parser.error("--web links work once: make one link per browser")
    if args.qr and args.name and not args.web:
        parser.error("--qr shows the browser onboarding page; for a browser link of NAME add --web")
    if args.host is not None:
        try:
            args.port = options.server_port(args.host, args.port, 0) or None
        except ValueError as exc:
            parser.error(f"argument --host: {exc}")
    missing = no_ca_here(args.certs)
    if missing:
        options.print_error(PROG, missing)
        return 1
    if args.qr and not args.name:
        return _onboarding_qr(args)
    store = Store(args.certs)
    try:
        if args.list:
            return _list_invites(store)
        if args.cancel:
            cancelled = store.cancel(args.cancel)
            links = devices.cancel(store, args.cancel)
            if not cancelled and not links:
                options.print_error(PROG, f"no usable invite {args.cancel!r} (securechat invite --list shows them)")
                return 1
            for inv in cancelled:
                print(f"Cancelled invite {inv.nameplate}{f' for {inv.name}' if inv.name else ''}.")
            for link in links:
                print(f"Cancelled browser link w{link.id} for {link.name}.")
            return 0
        if args.web:
            return _web_link(args, store)
        invite = store.create(args.name, expires_in=args.expires, uses=args.uses, cert_days=args.cert_days)
    except StoreError as exc:
        options.print_error(PROG, str(exc))
        return 1
    host, port, warning = _server(args)
    if warning:
        options.print_error(PROG, f"warning: {warning}")
    where = host_text(host) if port == DEFAULT_PORT else join_address(host, port)
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


def _server(args: argparse.Namespace) -> tuple[str, int, str]:
    """(host, port) of the server to name in what is printed, and a warning if no running server with
    this CA matches them."""
    live = serving.running(args.certs)
    match = [s for s in live if args.port is None or s.port == args.port]
    port = args.port or (match[0].port if match else DEFAULT_PORT)
    host = args.host[0] if args.host else next((s.hosts[0] for s in match if s.hosts), None) or _join_host(args.certs)
    if not live:
        return host, port, (f"no server is running with the CA in {args.certs}: start 'securechat serve' there "
                       f"before the code is used (this line assumes port {port})")
    if not match:
        return host, port, (f"no server with the CA in {args.certs} listens on port {port}; running: "
                       f"port {', '.join(str(s.port) for s in live)}")
    if len(match) > 1:
        return host, port, (f"several servers use this CA (ports {', '.join(str(s.port) for s in match)}): the code "
                       f"works on any of them; the line names port {port} (--port picks another)")
    return host, port, ""


def _list_invites(store: Store) -> int:
    invites = store.invites()
    links = devices.invites(store)
    if not invites and not links:
        print("No usable invites.")
        return 0
    print(f"{'number':>6}  {'name':<24}  {'uses left':>9}  {'wrong tries':>11}  expires")
    for inv in invites:
        print(f"{inv.nameplate:>6}  {inv.name or '(guest)':<24}  {inv.uses_left:>9}  "
              f"{inv.tries:>8}/{MAX_WRONG_TRIES}  {utc(inv.expires)}")
    for link in links:
        print(f"{'w' + str(link.id):>6}  {link.name + ' (browser link)':<24}  {1:>9}  {'-':>11}  {utc(link.expires)}")
    return 0


def web_address(host: str, port: int, scheme: str = "https") -> str:
    """``https://HOST:PORT/`` as a browser wants it (an IPv6 address in brackets)."""
    return f"{scheme}://{join_address(host, port)}/"


def print_qr(text: str) -> None:
    """``text`` as a QR code in the terminal, two rows of modules a line (light on dark, as terminals are)."""
    import segno  # a maintained pure-Python QR encoder; only these commands need it

    segno.make(text, error="m", micro=False).terminal(compact=True)


def _onboarding_qr(args: argparse.Namespace) -> int:
    """``invite --qr``: the onboarding page's address as a QR code, and what to compare there."""
    try:
        fingerprint = tls.file_fingerprint(args.certs / "ca.pem")
    except (OSError, ValueError):
        options.print_error(PROG, f"no CA certificate in {args.certs} (ca.pem): run this where the server's certs/ "
                            "folder is, or pass --certs DIR")
        return 1
    host, port, warning = _server(args)
    if warning:
        options.print_error(PROG, f"warning: {warning}")
    page = web_address(host, port, "http")
    print(f"Phones and computers on the network: scan this, or open {page}")
    print_qr(page)
    print(f"The page offers the CA certificate; its SHA-256 fingerprint must read {fingerprint}.")
    print(f"Once it is trusted, chat at {web_address(host, port)}")
    return 0


def _web_link(args: argparse.Namespace, store: Store) -> int:
    """``invite NAME --web``: a one-time link that makes a browser NAME's, and its QR code."""
    link = devices.create_invite(store, args.name, expires_in=args.expires, days=args.cert_days)
    host, port, warning = _server(args)
    if warning:
        options.print_error(PROG, f"warning: {warning}")
    url = f"{web_address(host, port)}#invite={link.token}"
    try:
        print(f"Open this link in {link.name}'s browser (valid {_human(args.expires)}, once); it makes that "
              f"browser {link.name}'s:")
        print(f"  {url}")
        print_qr(url)
        print(f"First time on that phone or computer? Trust the CA first at {web_address(host, port, 'http')} "
              "('securechat invite --qr').")
    except options.OutputLost as exc:  # nobody saw the link: it must not stay usable
        devices.cancel(store, f"w{link.id}")
        options.print_error(PROG, f"cannot write to standard output ({exc}): browser link w{link.id} cancelled, "
                            "since nobody saw it")
        return 1
    return 0
