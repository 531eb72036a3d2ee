"""``securechat certs``: what the local CA issued through invites (and renewals), browsers included, and its state."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from securechat.pki import devices
from securechat.pki.invites import certs_dir_option, no_ca_here
from securechat.pki.ledger import Store, StoreError, utc
from securechat.wire import options

PROG = "securechat certs"


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(prog=PROG, description="List the client certificates the CA issued through invites, and "
                       "the browsers bound to a name ('invite NAME --web'): name, serial, expiry, revoked, last seen.")
    certs_dir_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat certs``: 0, or 1 when the registry cannot be read."""
    args = build_parser().parse_args(argv)
    missing = no_ca_here(args.certs)
    if missing:
        options.print_error(PROG, missing)
        return 1
    try:
        store = Store(args.certs)
        issued = store.certificates()
        browsers = devices.device_serials(store)
    except StoreError as exc:
        options.print_error(PROG, str(exc))
        return 1
    if not issued:
        print("No client certificates issued yet (securechat invite NAME makes one possible).")
        return 0
    print(f"{'name':<24}  {'serial':<40}  {'expires':<20}  {'revoked':<20}  last seen")
    for cert in issued:
        name = f"{cert.name} (browser)" if cert.serial in browsers else cert.name
        print(f"{name:<24}  {cert.serial:<40}  {utc(cert.not_after):<20}  "
              f"{utc(cert.revoked) if cert.revoked else 'no':<20}  "
              f"{utc(cert.last_seen) if cert.last_seen else 'never'}")
    return 0
