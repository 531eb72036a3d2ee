"""``securechat gen-certs`` (and ``scripts/gen_certs.py``): the command line over :mod:`securechat.pki.mint`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from securechat.pki.builders import DEFAULT_DAYS, KEY_TYPES, MAX_DAYS, validate_days, validate_host, validate_ip
from securechat.pki.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    CertError,
    MintResult,
    mint,
    validate_client_name,
)
from securechat.wire import options


def _arg(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a validator's ValueError into argparse's usage error (exit status 2)."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def build_parser(prog: str = "securechat gen-certs") -> argparse.ArgumentParser:
    """The gen-certs argument parser (shared by ``securechat gen-certs`` and ``scripts/gen_certs.py``)."""
    parser = options.Parser(
        prog=prog,
        description=(
            "Mint a local certificate authority (ca.pem/ca.key) and a certificate for this chat server "
            "(server.pem/server.key). Re-running keeps the CA, so clients that trust ca.pem keep working, "
            "and issues a fresh server certificate. The CA may only sign local names (localhost, *.local, "
            "*.lan, *.internal, *.home.arpa, this machine's names and --host names) and private addresses."
        ),
        epilog=(
            "Copy ca.pem (never ca.key) to each client machine. Keys are written 0600; never commit them. "
            "Example: %(prog)s --host chat.lan --ip 192.168.1.20 --client alice"
        ),
    )
    parser.add_argument(
        "--out",
        type=options.path,
        default=Path("certs"),
        metavar="DIR",
        help="directory to write into (default: certs)",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        type=_arg(_host_arg),
        metavar="NAME",
        help="extra DNS name for the server certificate (repeatable; an address counts as --ip); "
        "localhost and this machine's names are always included",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        type=_arg(validate_ip),
        metavar="ADDR",
        help="extra IP address for the server certificate (repeatable); 127.0.0.1, ::1 and this "
        "machine's addresses are always included",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        type=_arg(validate_client_name),
        metavar="NAME",
        help="also write client-NAME.pem/.key for mutual TLS (repeatable; NAME is the nickname, so the "
        "server's nickname rules apply). Adding a client leaves the server certificate alone; re-running "
        "for an existing NAME re-issues its certificate and keeps its key",
    )
    parser.add_argument(
        "--days",
        type=_arg(_days_arg),
        default=DEFAULT_DAYS,
        metavar="N",
        help=f"validity of server and client certificates in days (default: {DEFAULT_DAYS}, max {MAX_DAYS})",
    )
    parser.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ec",
        help="key algorithm for new keys: ec = ECDSA P-256 (default), rsa = RSA-3072",
    )
    parser.add_argument(
        "--reset-names",
        action="store_true",
        help="issue the server certificate for exactly localhost, this machine's names and addresses and "
        "the --host/--ip given; without it, re-issuing keeps every name the current certificate has",
    )
    parser.add_argument(
        "--other-machine",
        action="store_true",
        help="the server certificate is for another machine (a second server of the chat, issued here where "
        "the CA is): it names exactly the --host/--ip given, plus localhost, and none of this machine's names "
        "and addresses nor the current certificate's",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="mint a new CA instead of reusing it, with a new server key and certificate and new keys for "
        "the --client names given; clients must then get the new ca.pem, and other client certificates "
        "stop working (they are listed)",
    )
    return parser


def _days_arg(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise ValueError(f"not a number of days: {text!r}") from None
    return validate_days(days)


def _host_arg(text: str) -> str:
    """--host accepts a name, or an address (then treated like --ip)."""
    try:
        return str(validate_ip(text))
    except ValueError:
        return validate_host(text)


def _connect_target(result: MintResult, hosts: Sequence[str], ips: Sequence[object]) -> str:
    """What a client most likely types to reach us: an asked-for name, else a LAN address."""
    if hosts:
        return hosts[0]
    if ips:
        return str(ips[0])
    loopback = {"127.0.0.1", "::1"}
    addrs = [a for a in result.ip_addresses if a not in loopback]
    if addrs:
        return addrs[0]
    names = [n for n in result.dns_names if n != "localhost"]
    return names[0] if names else "<this machine's IP>"


def _report(result: MintResult, args: argparse.Namespace) -> str:
    out = result.out_dir
    lines: list[str] = []
    ca_cert = x509.load_pem_x509_certificate(result.ca_cert.read_bytes())
    if result.ca_reused:
        lines.append(
            f"Reused the local CA in {out} (clients that trust it keep working; --force replaces it)."
        )
    else:
        kind = "RSA" if isinstance(ca_cert.public_key(), rsa.RSAPublicKey) else "ECDSA"
        lines.append(f"Created a new local CA ({kind}), valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}.")
    lines.append("Wrote:")
    labels = {
        CA_KEY: "CA private key: keep it here, never copy or commit it",
        CA_CERT: "CA certificate: copy it to every client",
        SERVER_KEY: "server private key",
        SERVER_CERT: f"server certificate, valid until {result.server_not_after:%Y-%m-%d %H:%M} UTC",
    }
    client_files = {p: name for name, paths in result.clients.items() for p in paths}
    for path in result.written:
        if path in client_files:
            label = f"client {client_files[path]}: give the .pem and .key to that user only"
        else:
            label = labels.get(path.name, "")
        lines.append(f"  {path}  ({label})")
    if not result.server_issued:
        lines.append(f"Left {result.server_cert} as it was (valid until {result.server_not_after:%Y-%m-%d %H:%M} "
                     "UTC).")
    lines.append(f"Server names:     {', '.join(result.dns_names)}")
    lines.append(f"Server addresses: {', '.join(result.ip_addresses)}")
    lines.append(f"CA SHA-256 fingerprint:     {result.ca_fingerprint}")
    lines.append(f"Server SHA-256 fingerprint: {result.server_fingerprint}")
    lines.append("")
    target = _connect_target(result, args.host, args.ip)
    if not result.clients:
        lines.append(
            f"Copy {result.ca_cert} to each client machine, then run: securechat connect {target} --ca {CA_CERT}"
        )
        return "\n".join(lines)
    lines.append("Start the server with: securechat serve --require-client-cert")
    for name, (cert_path, key_path) in result.clients.items():
        lines.append(
            f"Give {name} {cert_path}, {key_path} and {result.ca_cert} (only theirs), then {name} runs: "
            f"securechat connect {target} --ca {CA_CERT} --cert {cert_path.name} --key {key_path.name}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, prog: str = "securechat gen-certs") -> int:
    """``securechat gen-certs``: 0 on success, 1 on refusal or I/O error, 2 on a usage error."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2): return instead of exiting the caller
        return exc.code if isinstance(exc.code, int) else 2
    if args.other_machine and not (args.host or args.ip):
        try:
            parser.error("--other-machine needs that machine's --host NAME or --ip ADDR")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
    try:
        result = mint(
            args.out,
            hosts=args.host,
            ips=args.ip,
            clients=args.client,
            days=args.days,
            key_type=args.key_type,
            force=args.force,
            reset_names=args.reset_names,
            this_machine=not args.other_machine,
        )
    except CertError as exc:
        options.print_error(prog, str(exc))
        return 1
    except OSError as exc:
        where = exc.filename or args.out
        options.print_error(prog, f"cannot write {where}: {exc.strerror or exc}")
        return 1
    for note in result.notes:
        options.print_error(prog, f"note: {note}")
    return 0 if options.write_stdout(prog, _report(result, args) + "\n") else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
