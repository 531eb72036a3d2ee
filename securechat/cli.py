"""Command line entry point: ``securechat [serve|connect|gen-certs|fingerprint] ...``.

Each subcommand lives in its own module with a ``main(argv) -> int``; this module only dispatches,
and with no arguments shows the seed's interactive menu.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from securechat import __version__

# subcommand -> ("module" with main(argv) -> int, or "module:function", one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("securechat.server", "run the chat server (TLS; mints certificates into certs/ on first run)"),
    "connect": ("securechat.client", "join a chat server: securechat connect HOST"),
    "gen-certs": ("securechat.certs", "mint a local CA and a server certificate into certs/"),
    "fingerprint": ("securechat.identity", "print a certificate file's SHA-256 fingerprint"),
    "invite": ("securechat.invites:main_invite", "make a one-time code for someone to join: securechat invite [NAME]"),
    "join": ("securechat.enroll:main_join", "join a server with an invite code: securechat join HOST CODE"),
    "revoke": ("securechat.invites:main_revoke", "revoke a client certificate: securechat revoke NAME|SERIAL"),
    "certs": ("securechat.invites:main_certs", "list the client certificates issued through invites"),
}

USAGE = """usage: securechat [COMMAND] [OPTIONS]

Encrypted real-time chat for your local network.

commands:
{commands}

With no command, securechat asks whether to run as server or client.
Run 'securechat COMMAND --help' for the options of a command.
"""

# Exit statuses shared by every subcommand.
EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed (connection refused, certificate refused, ...)
EXIT_USAGE = 2  # bad command line, as argparse does


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def _run(command: str, argv: Sequence[str]) -> int:
    target, _ = COMMANDS[command]
    module_name, _, function = target.partition(":")
    entry: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module_name), function or "main")
    return entry(list(argv))


def _ask(prompt: str, valid: Callable[[str], bool]) -> str:
    """Ask until ``valid``; EOF raises EOFError for the caller to turn into a clean exit."""
    while True:
        answer = input(prompt).strip()
        if valid(answer):
            return answer


def menu() -> int:
    """The seed's menu, kept word for word."""
    try:
        print("Select mode:")
        print("1. Server")
        print("2. Client")
        option = _ask("Option: ", lambda a: a in ("1", "2"))
        if option == "1":
            return _run("serve", [])
        host = _ask("Enter server IP: ", bool)
    except (EOFError, KeyboardInterrupt):
        print()
        return EXIT_OK
    return _run("connect", _host_port_args(host))


def _host_port_args(answer: str) -> list[str]:
    """``connect`` arguments for an answer to "Enter server IP:": ``HOST``, ``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = answer.rpartition(":")
    if sep and port.isdigit() and (host.count(":") == 0 or (host.startswith("[") and host.endswith("]"))):
        return [host.strip("[]"), "--port", port]
    return [answer]


def main(argv: Sequence[str] | None = None) -> int:
    """Run securechat with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return menu()
    first = args[0]
    if first in ("-h", "--help", "help"):
        print(_usage(), end="")
        return EXIT_OK
    if first in ("-V", "--version"):
        print(f"securechat {__version__}")
        return EXIT_OK
    if first not in COMMANDS:
        print(_usage(), end="", file=sys.stderr)
        print(f"securechat: unknown command {first!r}", file=sys.stderr)
        return EXIT_USAGE
    return _run(first, args[1:])
