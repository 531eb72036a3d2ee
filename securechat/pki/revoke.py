"""``securechat revoke NAME|SERIAL``: put client certificates on the server's denylist.

The denylist is the ``revoked`` column of the certificate registry (:mod:`securechat.pki.ledger`); a
running server reads it at every connection with a certificate and every half second for live
sessions, so the revoked certificate's session ends within 2 s and it is refused from then on, also
after a restart. Certificates minted with ``gen-certs --client NAME`` (not in the registry) are
added to it from ``certs/client-NAME.pem``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Sequence

from cryptography import x509

from securechat.pki.invites import certs_dir_option, no_ca_here
from securechat.pki.ledger import Store, StoreError
from securechat.wire import options

PROG = "securechat revoke"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,24}")  # a client (nick) name, as gen-certs and invite allow
_SERIAL = re.compile(r"[0-9A-Fa-f:]{1,59}")  # 20 bytes of hex at most (RFC 5280), colons allowed


def _which(text: str) -> str:
    if _NAME.fullmatch(text) or _SERIAL.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a name (1-24 letters, digits, _ or -) nor a serial "
                                     "(hex, as 'securechat certs' shows it)")


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog=PROG,
        description="Revoke a client certificate: the server refuses it from now on (even after a restart), "
        "ends its live session within 2 seconds, and it cannot be renewed.")
    p.add_argument("which", type=_which, metavar="NAME|SERIAL", help="a name (every certificate with it) or a serial "
                   "('securechat certs' lists them)")
    certs_dir_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat revoke NAME|SERIAL``: 0, or 1 when nothing matched."""
    args = build_parser().parse_args(argv)
    missing = no_ca_here(args.certs)
    if missing:
        options.print_error(PROG, missing)
        return 1
    extra: list[x509.Certificate] = []
    if _NAME.fullmatch(args.which):
        minted = args.certs / f"client-{args.which}.pem"  # a gen-certs --client certificate, not in the registry
        with contextlib.suppress(OSError, ValueError):
            extra.append(x509.load_pem_x509_certificate(minted.read_bytes()))
    try:
        revoked = Store(args.certs).revoke(args.which, extra=extra)
    except StoreError as exc:
        options.print_error(PROG, str(exc))
        return 1
    if not revoked:
        options.print_error(PROG, f"no unrevoked certificate named or numbered {args.which!r} ('securechat certs' "
                            "lists them)")
        return 1
    try:
        for cert in revoked:
            print(f"Revoked {cert.name} (serial {cert.serial}). A running server ends the session within 2 s.")
    except options.OutputLost as exc:  # status 1 as for any lost output, saying what was done
        options.print_error(PROG, f"cannot write to standard output ({exc}); revoked all the same: "
                            + ", ".join(f"{cert.name} (serial {cert.serial})" for cert in revoked))
        return 1
    return 0
