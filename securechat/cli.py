"""Command line entry point: ``securechat [serve|connect|gen-certs|fingerprint] ...``.

Each subcommand lives in its own module with a ``main(argv) -> int``; this module only dispatches,
and with no arguments shows the seed's interactive menu.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from securechat import __version__, options

# subcommand -> (module with main(argv) -> int, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("securechat.server", "run the chat server (TLS; mints certificates into certs/ on first run)"),
    "connect": ("securechat.client", "join a chat server: securechat connect HOST"),
    "gen-certs": ("securechat.certs", "mint a local CA and a server certificate into certs/"),
    "fingerprint": ("securechat.identity", "print a certificate file's SHA-256 fingerprint"),
    "invite": ("securechat.invites", "make a one-time code for someone to join: securechat invite [NAME]"),
    "join": ("securechat.enroll", "join a server with an invite code: securechat join HOST CODE"),
    "revoke": ("securechat.revoke", "revoke a client certificate: securechat revoke NAME|SERIAL"),
    "certs": ("securechat.issued", "list the client certificates issued through invites"),
}

USAGE = """usage: securechat [COMMAND] [OPTIONS]

Encrypted real-time chat for your local network.

commands:
{commands}

With no command, securechat asks whether to run as server or client.
Run 'securechat COMMAND --help' for the options of a command.
"""

# Exit statuses shared by every subcommand (see securechat.options for the error-line convention).
EXIT_OK = options.EXIT_OK
EXIT_FAILURE = options.EXIT_FAILURE
EXIT_USAGE = options.EXIT_USAGE


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def _run(command: str, argv: Sequence[str]) -> int:
    module_name, _ = COMMANDS[command]
    entry: Callable[[Sequence[str]], int] = importlib.import_module(module_name).main
    try:
        return entry(list(argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already reported in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


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
        return EXIT_OK if options.write_stdout("securechat", _usage()) else EXIT_FAILURE
    if first in ("-V", "--version"):
        return EXIT_OK if options.write_stdout("securechat", f"securechat {__version__}\n") else EXIT_FAILURE
    if first not in COMMANDS:
        options.print_error("securechat", f"unknown command {first!r}: choose one of {', '.join(COMMANDS)}; "
                            "see 'securechat --help'")
        return EXIT_USAGE
    return _run(first, args[1:])
