"""``securechat revoke NAME|SERIAL``: put client certificates (and names) on the server's denylist.

The denylist is the certificate registry's (:mod:`securechat.pki.ledger`); a running server reads it
at every connection with a certificate and every half second for live sessions, so the revoked
certificate's session ends within 2 s and it is refused from then on, also after a restart, and on
every server of a ``--redis`` cluster (the server holding ``ca.key`` publishes it there).
``revoke SERIAL`` covers the certificate's whole renewal chain; ``revoke NAME`` every certificate of
that name, issued before or after, and the name itself stays reserved until ``revoke --release NAME``.
Certificates minted with ``gen-certs --client NAME`` before the registry recorded them are added to it
from ``certs/client-NAME.pem``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Sequence

from cryptography import x509

from securechat.pki import devices
from securechat.pki.invites import certs_dir_option, no_ca_here
from securechat.pki.ledger import REVOCATION_POLL, Store, StoreError, utc
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
    p.add_argument("which", type=_which, metavar="NAME|SERIAL", help="a name (every certificate with it, and the "
                   "name itself) or a serial (the certificate and its renewals; 'securechat certs' lists them)")
    p.add_argument("--release", action="store_true",
                   help="give a revoked NAME back: it may be invited again (and taken by guests)")
    certs_dir_option(p)
    return p


# A cluster's copy of the ledger older than this means no server is publishing it (they do every
# REVOCATION_POLL): the other servers learn of the revocation only once one does.
PUBLISHER_GONE = 20 * REVOCATION_POLL


def _release(store: Store, name: str) -> int:
    try:
        spelling = store.release(name)
    except StoreError as exc:
        options.print_error(PROG, str(exc))
        return 1
    print(f"Released the name {spelling}: it may be invited again (securechat invite {spelling}).")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat revoke NAME|SERIAL``: 0, or 1 when nothing matched."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = no_ca_here(args.certs)
    if missing:
        options.print_error(PROG, missing)
        return 1
    if args.release:
        if not _NAME.fullmatch(args.which):
            parser.error(f"--release takes a NAME, not {args.which!r}")
        return _release(Store(args.certs), args.which)
    extra: list[x509.Certificate] = []
    if _NAME.fullmatch(args.which):
        minted = args.certs / f"client-{args.which}.pem"  # a gen-certs --client certificate, not in the registry
        with contextlib.suppress(OSError, ValueError):
            extra.append(x509.load_pem_x509_certificate(minted.read_bytes()))
    store = Store(args.certs)
    try:
        done = store.revoke(args.which, extra=extra)
        links = devices.cancel(store, args.which) if _NAME.fullmatch(args.which) else []  # browser links too
        published = store.published()
    except StoreError as exc:
        options.print_error(PROG, str(exc))
        return 1
    if not (done.certificates or done.name or done.invites or links):
        options.print_error(PROG, f"no unrevoked certificate named or numbered {args.which!r} ('securechat certs' "
                            "lists them)")
        return 1
    try:
        for cert in done.certificates:
            print(f"Revoked {cert.name} (serial {cert.serial}). A running server ends the session within 2 s.")
        for link in links:
            print(f"Cancelled browser link w{link.id} for {link.name}.")
        if done.invites:
            print(f"Cancelled invite{'s' if len(done.invites) > 1 else ''} {', '.join(map(str, done.invites))}.")
        if done.name:
            print(f"The name {done.name} stays reserved: nobody may be invited or connect under it until "
                  f"'securechat revoke --release {done.name}'.")
    except options.OutputLost as exc:  # status 1 as for any lost output, saying what was done
        what = [f"{cert.name} (serial {cert.serial})" for cert in done.certificates]
        options.print_error(PROG, f"cannot write to standard output ({exc}); revoked all the same: "
                            + ", ".join(what or [f"the name {done.name}"]))
        return 1
    if published is not None and store.clock() - published[0] > PUBLISHER_GONE:
        options.print_error(PROG, f"note: the cluster at {published[1]} was last updated {utc(published[0])}: its "
                            "other servers learn of this once the server holding ca.key runs with --redis again")
    return 0
