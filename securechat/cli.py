"""Command line entry point: ``securechat [serve|connect|gen-certs|fingerprint] ...``.

Each subcommand lives in its own module with a ``main(argv) -> int``; this module only dispatches,
and with no arguments shows the seed's interactive menu.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from securechat import __version__
from securechat.wire import options

# subcommand -> (module with main(argv) -> int, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("securechat.server.serve", "run the chat server (TLS; mints certificates into certs/ on first run)"),
    "connect": ("securechat.client.connect", "join a chat server: securechat connect [HOST]"),
    "gen-certs": ("securechat.pki.gencerts", "mint a local CA and a server certificate into certs/"),
    "fingerprint": ("securechat.client.identity", "print a certificate file's SHA-256 fingerprint"),
    "invite": ("securechat.pki.invites", "make a one-time code for someone to join: securechat invite [NAME]"),
    "join": ("securechat.client.join", "join a server with an invite code: securechat join [HOST] CODE"),
    "servers": ("securechat.client.servers", "list the securechat servers on this network (mDNS/DNS-SD)"),
    "revoke": ("securechat.pki.revoke", "revoke a client certificate: securechat revoke NAME|SERIAL"),
    "certs": ("securechat.pki.issued", "list the client certificates issued through invites"),
}

# Commands that outlive their stdout: a server's users, a chat, do not depend on its console.
CARRY_ON = frozenset({"serve", "connect"})

USAGE = """usage: securechat [COMMAND] [OPTIONS]

Encrypted real-time chat for your local network.

commands:
{commands}

With no command, securechat asks whether to run as server or client.
Run 'securechat COMMAND --help' for the options of a command.
"""

# Exit statuses shared by every subcommand (see securechat.wire.options for the error-line convention).
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
    # Output that goes away (| head -1, > /dev/full) is one line and status 1 for every command, also
    # one added later; the long-running ones carry on without it instead (options.guard_stdout).
    with options.strict_stdout(command not in CARRY_ON):
        try:
            return entry(list(argv))
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already reported in one line)
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        except options.OutputLost as exc:
            options.print_error(f"securechat {command}", f"cannot write to standard output ({exc})")
            return EXIT_FAILURE


def _ask(prompt: str, why_not: Callable[[str], str | None]) -> str:
    """Ask until ``why_not(answer)`` is None, saying why before each re-ask; EOF raises EOFError."""
    while True:
        answer = input(prompt).strip()
        reason = why_not(answer)
        if reason is None:
            return answer
        print(reason)


def _option_error(answer: str) -> str | None:
    return None if answer in ("1", "2") else "Please type 1 to run the server or 2 to join one as a client."


def _host_error(answer: str) -> str | None:
    if not answer:
        return "The server's address is needed: the IP it prints at start, e.g. 192.168.0.20 (or 192.168.0.20:5555)."
    try:
        options.server_address(answer)  # what connect will take: HOST, HOST:PORT, [V6]:PORT
    except argparse.ArgumentTypeError as exc:
        return f"That address won't do: {exc}."
    return None


def menu() -> int:
    """The seed's menu, kept word for word; a re-asked question says why first."""
    try:
        with options.strict_stdout():
            return _menu()
    except options.OutputLost as exc:
        options.print_error("securechat", f"cannot write to standard output ({exc})")
        return EXIT_FAILURE


def _menu() -> int:
    try:
        print("Select mode:")
        print("1. Server")
        print("2. Client")
        option = _ask("Option: ", _option_error)
        if option == "1":
            return _run("serve", [])
        from securechat.client import firstcontact, servers

        offers = servers.offer()  # number -> address, listed before the seed's prompt
        host = _ask("Enter server IP: ", lambda answer: None if answer in offers else _host_error(answer))
        # Asks how to recognise a server not met yet (an invite code, its fingerprint, a CA file).
        return firstcontact.connect(offers.get(host, host), _ask, _run)
    except (EOFError, KeyboardInterrupt):
        print()
        return EXIT_OK


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
