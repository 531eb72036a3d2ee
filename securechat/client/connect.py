"""``securechat connect HOST``: the command line, how it recognises the server, and which front end runs.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from securechat.client import identity
from securechat.client.chat import DEFAULT_CA, DEFAULT_TIMEOUT
from securechat.client.errors import CA_HELP, ChatError, Disconnected
from securechat.client.frontend import Frontend, LineMode
from securechat.pki import certdir
from securechat.wire import options, tls
from securechat.wire.addr import DEFAULT_PORT
from securechat.wire.conn import describe_error
from securechat.wire.options import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from securechat.client.profiles import Profile


def _pin_arg(text: str) -> str:
    try:
        return tls.normalise_fingerprint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}; expected the SHA-256 fingerprint on the server's '[SERVER] CA SHA-256 fingerprint' line, "
            "like AA:BB:...:FF (64 hex digits; 'securechat fingerprint certs/ca.pem' on the server shows it)"
        ) from None


def add_server_arguments(p: argparse.ArgumentParser, *, nick: str) -> None:
    """The options that reach and recognise a server, shared by ``connect``, ``send`` and ``get``."""
    p.add_argument("--port", type=options.port, default=None, help=f"TCP port (default: {DEFAULT_PORT})")
    p.add_argument("--nick", help=nick)
    trust = p.add_argument_group(
        "recognising the server (one of)").add_mutually_exclusive_group()
    trust.add_argument("--ca", type=options.path, default=None,
                       help="the CA certificate that signed the server's certificate; copy it from the "
                       "server's certs/ folder (default: what 'securechat join' saved for this server, else "
                       f"{DEFAULT_CA})")
    trust.add_argument("--pin", type=_pin_arg, metavar="FINGERPRINT",
                       help="trust the server whose CA has this SHA-256 fingerprint (the server's '[SERVER] CA "
                       "SHA-256 fingerprint' line; its own certificate's fingerprint works too, until renewal); "
                       "no CA file needed")
    trust.add_argument("--tofu", action="store_true",
                       help="trust on first use: remember the server's CA fingerprint at first contact (in "
                       f"{identity.known_hosts_path()}) and refuse the connection if it ever changes")
    mine = p.add_argument_group("proving who you are (servers started with --require-client-cert)")
    mine.add_argument("--cert", type=options.path, metavar="PEM",
                      help="your client certificate (client-NAME.pem from 'securechat gen-certs --client "
                      "NAME'); its name is your nickname on such servers")
    mine.add_argument("--key", type=options.path, metavar="KEY",
                      help="the private key of --cert (default: the .key file next to it, else --cert "
                      "itself)")
    p.add_argument("--tls-min", choices=sorted(tls.TLS_VERSIONS), default=tls.DEFAULT_TLS_MIN,
                   help="oldest TLS version accepted (default: %(default)s)")
    p.add_argument("--timeout", type=options.duration(), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="time allowed to connect and complete the handshake (default: %(default)g)")


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(prog=PROG, description="Join a securechat server.")
    p.add_argument("host", metavar="HOST[:PORT]", nargs="?",
                   help="the server's IP address or host name, optionally with the port: 192.168.0.20, "
                   "192.168.0.20:5555, [fe80::1%%eth0]:5555; several servers of one chat (serve --redis) "
                   "separated by commas: the first that answers is used, the others when it goes away. Left "
                   "out: the server found on this network (mDNS) whose CA you know, else a numbered choice")
    add_server_arguments(p, nick="nickname (default: the name in --cert, else asked)")
    p.add_argument("--plain", action="store_true",
                   help="connect WITHOUT encryption, to a server started with --plain")
    screen = p.add_argument_group(
        "in a terminal", "Lines show as sent once the server has relayed them; a long paste is paced to the "
        "server's flood limit (\"sending N lines...\") and a line the server dropped is marked \"not "
        "delivered\". Each nick keeps its colour, yours is in reverse video, notices are dim, and a line "
        "naming you is highlighted. Tab completes /commands and nicknames; the terminal's scrollback keeps the "
        "history (Shift-PgUp, or tmux copy mode). With stdin or stdout not a terminal, lines are read and printed "
        "plain: no colour, no bell, no timestamps.")
    screen.add_argument("--timestamps", action=argparse.BooleanOptionalAction, default=True,
                        help="show HH:MM before each line, and a line when the day changes (default: on)")
    screen.add_argument("--bell", action=argparse.BooleanOptionalAction, default=True,
                        help="ring the terminal bell when a line names you or is a private message to you; "
                        "such lines are highlighted either way (default: on)")
    screen.add_argument("--paste-verify", type=options.count(0, 1_000_000, "never asks"), default=5, metavar="N",
                        help="ask before sending a paste of more than N lines, 0 never asks (default: "
                        "%(default)s, as irssi's paste_verify_line_count)")
    return p


PROG = "securechat connect"

# Servers in one "connect a,b,c": a handful of machines, not a list to scan.
MAX_SERVERS = 16


def parse_servers(text: str, port: int | None = None) -> list[tuple[str, int]]:
    """``"a,b:5556,[::1]:5557"`` -> ``[("a", 5555), ("b", 5556), ("::1", 5557)]``; ValueError if malformed.

    Each item is ``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address (see
    :func:`securechat.wire.addr.split_host_port`); ``port`` (``--port``) is the port of items without one,
    and an item naming another port is refused, as for a single server.
    """
    items = text.split(",")
    if len(items) > MAX_SERVERS:
        raise ValueError(f"at most {MAX_SERVERS} servers")
    servers: list[tuple[str, int]] = []
    for item in items:
        try:
            address = options.server_address(item)  # the one parser every command that names a server uses
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        servers.append((address[0], options.server_port(address, port)))
    return servers


def _err(message: str) -> None:
    options.print_error(PROG, message)


def _no_password() -> bytes:
    raise ChatError("is encrypted with a passphrase")


def certificate_name(cert: Path) -> str:
    """The common name (CN) in the PEM certificate ``cert``: the nickname a mutual-TLS server grants.

    Raises ChatError when the file is missing, unreadable or not a PEM certificate.
    """
    try:
        data = cert.read_bytes()
    except OSError as exc:
        raise ChatError(f"cannot read the client certificate {str(cert)!r} ({describe_error(exc)}): pass the "
                        "client-NAME.pem file you were given with --cert") from None
    from cryptography import x509  # here, not at the top: half of a client's start-up time, for --cert only
    from cryptography.x509.oid import NameOID

    try:
        parsed = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ChatError(f"{str(cert)!r} is not a PEM certificate: pass the client-NAME.pem file you were "
                        "given with --cert (and its .key file with --key)") from None
    names = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def load_client_certificate(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> str:
    """Load ``cert`` and its ``key`` into ``ctx`` for mutual TLS; return the certificate's name.

    Without ``key``, the ``.key`` file next to ``cert`` is used if there is one, else ``cert`` itself
    (certificate and key in one file). Every problem is one ChatError naming the file at fault.
    """
    name = certificate_name(cert)
    if key is None:
        key = cert.with_suffix(".key") if cert.with_suffix(".key").is_file() else cert
    try:
        key_data = key.read_bytes()
    except OSError as exc:
        raise ChatError(f"cannot read the client key {str(key)!r} ({describe_error(exc)}): pass the "
                        "client-NAME.key file you were given with --key") from None
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ChatError(f"the client key {str(key)!r} is encrypted with a passphrase: securechat needs the "
                        "unencrypted key that gen-certs writes") from None
    except Exception:  # ValueError, or UnsupportedAlgorithm for exotic keys
        raise ChatError(f"{str(key)!r} is not a PEM private key: pass the client-NAME.key file that goes "
                        f"with {str(cert)!r} with --key") from None
    try:
        certdir.check_key_and_dir(key)  # a key others can read (or swap) is not only yours
    except certdir.UnsafePermissions as exc:
        raise ChatError(str(exc)) from None
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ChatError(f"the key {str(key)!r} does not belong to the certificate {str(cert)!r}: pass "
                            "the .key file minted with it") from None
        raise ChatError(f"cannot load the client certificate {str(cert)!r} with key {str(key)!r} "
                        f"({describe_error(exc)})") from None
    except ChatError as exc:
        raise ChatError(f"the client key {str(key)!r} {exc}") from None
    except OSError as exc:
        raise ChatError(f"cannot load the client certificate {str(cert)!r} ({describe_error(exc)})") from None
    return name


def _first_contact(key: str, fingerprint: str, path: Path, kind: str) -> None:
    _err(f"first contact with {key}; remembering the fingerprint of its {kind}, {fingerprint} (stored in "
         f"{path}). Check that it is the one on the server's '{identity.line_for(kind)}' line: if not, "
         "delete that line from the file and do not chat")


def _ask_trust(key: str, fingerprint: str, path: Path, kind: str) -> bool:
    """``--tofu`` at a terminal: show the fingerprint and ask before anything is trusted or saved."""
    print(f"First contact with {key}. Its {kind} has the SHA-256 fingerprint\n  {fingerprint}\n"
          f"Compare it with the server's '{identity.line_for(kind)}' line (on the server, or ask its admin).",
          flush=True)
    try:
        answer = input("Trust this server? [y/N] ")
    except (EOFError, KeyboardInterrupt):
        print(flush=True)
        return False
    return answer.strip().lower() in ("y", "yes")


def _remembered(key: str, fingerprint: str, path: Path, kind: str) -> None:
    print(f"Remembered in {path}: from now on {key} must present this {kind}.", flush=True)


def build_context(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, identity.ServerTrust | None]:
    """The TLS context, or the --pin/--tofu trust, the command line asks for; ChatError on any problem."""
    if not (args.pin or args.tofu or args.ca) and (joined := _joined_context(args)) is not None:
        return joined, None
    if args.pin or args.tofu:
        prepare = None
        if args.cert is not None:
            # Checked now for a clear error; loaded into the verifying context once the server passed.
            args.cert_name = load_client_certificate(tls.client_context(tls_min=args.tls_min), args.cert, args.key)
            cert, key = args.cert, args.key

            def prepare(ctx: ssl.SSLContext) -> None:
                load_client_certificate(ctx, cert, key)

        if args.pin:
            return None, identity.PinTrust(args.pin, tls_min=args.tls_min, prepare=prepare)
        # A person at a terminal is asked first; a script keeps the old way (remember, and say what to check).
        person = sys.stdin.isatty() and sys.stdout.isatty()
        return None, identity.TofuTrust(args.host, args.port, tls_min=args.tls_min, prepare=prepare,
                                        on_first_contact=_remembered if person else _first_contact,
                                        ask=_ask_trust if person else None)
    ca = args.ca or DEFAULT_CA
    if not ca.is_file():
        raise ChatError(f"CA file {str(ca)!r} not found: {CA_HELP}; or recognise the server by its CA "
                        "fingerprint with --pin FINGERPRINT (the server's '[SERVER] CA SHA-256 fingerprint' line) "
                        "or --tofu")
    try:
        context = tls.client_context(ca, tls_min=args.tls_min)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ChatError(f"cannot load the CA file {str(ca)!r} ({describe_error(exc)}): is it ca.pem? "
                        f"{CA_HELP}") from None
    if args.cert is not None:
        args.cert_name = load_client_certificate(context, args.cert, args.key)
    return context, None


def context_factory(args: argparse.Namespace, context: ssl.SSLContext | None) -> Callable[[], ssl.SSLContext] | None:
    """Fresh contexts recognising the server as ``context`` does, for file connections (which offer
    their own ALPN protocol); None under --pin/--tofu, where the chat client keeps what it trusted."""
    if context is None:
        return None

    def make() -> ssl.SSLContext:
        made, _ = build_context(args)
        assert made is not None
        return made

    return make


def _joined_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The context for a server joined with an invite (``securechat join``), renewing first if due."""
    from securechat.client import profiles

    profile = getattr(args, "profile", None) or profiles.load(args.host, args.port)
    if profile is None:
        return None
    if args.cert is None:
        profiles.renew_if_due(profile, tls_min=args.tls_min, timeout=args.timeout, say=_err)
    try:
        context = tls.client_context(profile.ca, tls_min=args.tls_min)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ChatError(f"cannot load {profile.ca} ({describe_error(exc)}): join again with a new invite") \
            from None
    if args.cert is not None:
        args.cert_name = load_client_certificate(context, args.cert, args.key)
    elif profile.has_cert:
        args.cert_name = load_client_certificate(context, profile.cert, profile.key)
    return context


def _found_on_network(args: argparse.Namespace) -> tuple[str, Profile | None]:
    """``connect`` without an address: the server found on the LAN (see :mod:`securechat.client.servers`)."""
    from securechat.client import discover, servers

    try:
        found = discover.browse()
    except discover.DiscoveryError as exc:
        raise ChatError(f"no server address given, and {exc}: give one, as in 'securechat connect "
                        "192.168.0.20'") from None
    chosen, profile = servers.choose_for_connect(
        found, plain=args.plain, pin=args.pin, ca=args.ca, tofu=args.tofu,
        interactive=sys.stdin.isatty() and sys.stdout.isatty())
    how = " (you joined it)" if profile is not None else ""
    _err(f"found '{chosen.name}' at {chosen.where} on this network{how}")
    return chosen.where, profile


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat connect``: 0 after leaving (or after the server shut down), 1 on any failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.profile = None
    if args.host is None:
        if args.port is not None:
            parser.error("--port needs the server's address (HOST): 'securechat connect HOST --port N'")
        try:
            args.host, args.profile = _found_on_network(args)
        except ChatError as exc:
            _err(str(exc))
            return EXIT_FAILURE
    try:
        servers = parse_servers(args.host, args.port)
    except ValueError as exc:
        parser.error(f"argument HOST[:PORT]: {exc}")
    (args.host, args.port), args.alternates = servers[0], servers[1:]
    if args.key is not None and args.cert is None:
        parser.error("--key needs --cert (your client certificate)")
    if args.plain and (args.cert or args.pin or args.tofu or args.ca):
        parser.error("--plain cannot be combined with --ca, --pin, --tofu or --cert: they need TLS")
    args.cert_name = None
    context: ssl.SSLContext | None = None
    trust: identity.ServerTrust | None = None
    if args.plain:
        _err("WARNING: --plain: NO ENCRYPTION. Everything you type, and your nickname, can be read and "
             "altered "
             "by anyone on the network.")
    else:
        try:
            context, trust = build_context(args)
            args.context_factory = context_factory(args, context)
        except ChatError as exc:
            _err(str(exc))
            return EXIT_FAILURE
    frontend: Frontend
    # TERM=dumb (Emacs shell, some IDE consoles): a terminal that cannot move the cursor or colour.
    if sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb":
        from securechat.client.ui import TerminalUI

        frontend = TerminalUI(args, context, trust)
    else:
        options.guard_stdout(PROG)  # a pipe or file that fails (> /dev/full, | head -1): say so once, keep chatting
        frontend = LineMode(args, context, trust)
    try:
        return frontend.run()
    except ChatError as exc:
        _err(str(exc))
        # A server that announced its shutdown ended the chat in order: not this command's failure.
        return EXIT_OK if isinstance(exc, Disconnected) and exc.shutdown else EXIT_FAILURE
    except KeyboardInterrupt:
        frontend.client.quit(wait=0.5)
        return EXIT_OK
    finally:
        frontend.client.close()
