"""The seed's menu meeting a server this machine does not know yet: a table of ways to recognise it.

``securechat`` with no arguments asks ``Enter server IP:``. With ``certs/ca.pem`` here (the seed's
way), a profile saved by ``securechat join``, or a fingerprint met before with ``--tofu``, it connects
at once. Otherwise "pass --ca" is no help to someone at a menu: it offers what can be done from where
the person is, one row of :data:`WAYS` each (an invite code, the fingerprint shown for comparison,
the path of a copied CA file). Another way is one more row.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from securechat.client import identity, profiles
from securechat.client.chat import DEFAULT_CA
from securechat.pki.codes import parse_code
from securechat.wire import addr, options, tls

# The menu's own ask-until-valid (securechat.cli._ask) and subcommand runner (securechat.cli._run).
Ask = Callable[[str, Callable[[str], "str | None"]], str]
Run = Callable[[str, Sequence[str]], int]


@dataclass(frozen=True)
class Way:
    """One way to recognise a server: its line in the menu, and what it does with the server's address."""

    label: str
    go: Callable[[str, Ask, Run], int]


def _code_error(answer: str) -> str | None:
    try:
        parse_code(answer)
    except ValueError as exc:
        return f"{exc}."
    return None


def _by_invite(server: str, ask: Ask, run: Run) -> int:
    while run("join", [server, ask("Invite code: ", _code_error)]) != 0:
        print("The invite did not work (the line above says why): type the code again, or press Ctrl-D to stop.")
    return run("connect", [server])


def _by_fingerprint(server: str, ask: Ask, run: Run) -> int:
    return run("connect", [server, "--tofu"])  # at a terminal it shows the fingerprint and asks first


def _ca_file_error(answer: str) -> str | None:
    path = Path(answer).expanduser()
    if not answer:
        return "The path of the CA file is needed: the server's certs/ca.pem, copied to this machine."
    if not path.is_file():
        return f"There is no file {str(path)!r}: copy ca.pem from the server's certs/ folder first (USB stick, scp)."
    try:
        tls.client_context(path)
    except (OSError, ssl.SSLError, ValueError):
        return f"{str(path)!r} is not a CA certificate (PEM): it is the server's certs/ca.pem that is needed."
    return None


def _by_ca_file(server: str, ask: Ask, run: Run) -> int:
    return run("connect", [server, "--ca", str(Path(ask("Path to the CA file: ", _ca_file_error)).expanduser())])


WAYS: tuple[Way, ...] = (
    Way("With an invite code (the server's admin makes one with 'securechat invite')", _by_invite),
    Way(f"By its fingerprint, shown now to compare with the server's '{identity.SERVER_CA_LINE}' line",
        _by_fingerprint),
    Way("With a copy of the server's CA file (its certs/ca.pem)", _by_ca_file),
)


def known(host: str, port: int) -> list[str] | None:
    """``connect``'s extra arguments when this machine already knows how to recognise ``host:port``, else None."""
    if DEFAULT_CA.is_file() or profiles.load(host, port) is not None:
        return []
    try:
        met = identity.KnownHosts().lookup(host, port)
    except (identity.IdentityError, OSError):
        return ["--tofu"]  # a damaged entry for this server: connect says so, rather than meeting it afresh
    return ["--tofu"] if met is not None else None


def connect(server: str, ask: Ask, run: Run) -> int:
    """Connect the menu to ``server`` (as typed, already valid), first asking how to recognise it if need be."""
    try:
        host, port = options.server_address(server)
    except argparse.ArgumentTypeError:
        return run("connect", [server])  # the menu checked it already; connect explains
    port = port or addr.DEFAULT_PORT
    extra = known(host, port)
    if extra is not None:
        return run("connect", [server, *extra])
    print(f"This machine does not know {addr.join(host, port)} yet (no {DEFAULT_CA} here, and it never joined "
          "it). How should it recognise the server?")
    for number, way in enumerate(WAYS, 1):
        print(f"{number}. {way.label}")
    choices = [str(n) for n in range(1, len(WAYS) + 1)]
    choice = ask("Option: ", lambda answer: None if answer in choices else
                 f"Please type a number from 1 to {len(WAYS)}.")
    return WAYS[int(choice) - 1].go(server, ask, run)
