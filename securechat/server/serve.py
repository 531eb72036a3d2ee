"""``securechat serve``: the server's command line (options, certificates at start, signals, banner).

The serving itself is :class:`securechat.server.engine.ChatServer`; this module turns a command line into
one, mints certificates on first run, prints the seed's ``[SERVER]`` lines and runs it until a signal.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING

from securechat.pki import certs
from securechat.server import listen
from securechat.server.engine import (
    DEFAULT_MAX_CLIENTS,
    FLOOD_BURST,
    FLOOD_RATE,
    HANDSHAKE_TIMEOUT,
    LOGIN_TIMEOUT,
    ChatServer,
)
from securechat.server.pending import MAX_PENDING, MAX_PENDING_PER_ADDRESS
from securechat.server.room import ANNOUNCE_LIMIT, GRACE_SECONDS, MAX_HISTORY_PAGE, REPLAY_LINES
from securechat.store import redis_config, redis_options
from securechat.store.history import DEFAULT_DAYS, DEFAULT_LINES, MAX_HISTORY_DAYS, MAX_HISTORY_LINES, default_data_dir
from securechat.wire import addr, console, dnssd, options, tls
from securechat.wire.addr import DEFAULT_HOST, DEFAULT_PORT
from securechat.wire.conn import describe_error

if TYPE_CHECKING:
    from securechat.server.trust import Trust

# The operator reads one log: the command line's diagnostics go where the server's go.
log = logging.getLogger("securechat.server")

DEFAULT_CERT_DIR = Path("certs")
DEFAULT_CERT = DEFAULT_CERT_DIR / "server.pem"
DEFAULT_KEY = DEFAULT_CERT_DIR / "server.key"


PROG = "securechat serve"


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog=PROG,
        description="Run the securechat server. TLS by default: with the default paths and no certificate yet, "
        "a local CA and a server certificate are minted into certs/ first.",
    )
    p.add_argument("--listen", type=options.host, metavar="ADDR", default=None,
                   help="listen on this one address of this machine, e.g. 192.168.0.20 or ::1 (default: every "
                   f"interface, IPv6 and IPv4: [::] and {DEFAULT_HOST}). Not a certificate name: that is "
                   "'gen-certs --host'")
    p.add_argument("--host", type=options.host, dest="listen", help=argparse.SUPPRESS)  # the older spelling of --listen
    p.add_argument("--port", type=options.listen_port, default=DEFAULT_PORT,
                   help="TCP port, 0 for any free one (default: %(default)s)")
    p.add_argument("--cert", type=options.path, help=f"server certificate chain, PEM (default: {DEFAULT_CERT})")
    p.add_argument("--key", type=options.path, help=f"server private key, PEM (default: {DEFAULT_KEY})")
    p.add_argument("--require-client-cert", action="store_true",
                   help="mutual TLS: only clients with a certificate signed by --ca may join, and each one's "
                   "nickname is its certificate's name (mint them with 'securechat gen-certs --client NAME')")
    p.add_argument("--ca", type=options.path,
                   help=f"CA that signs client certificates (default: {DEFAULT_CERT_DIR / 'ca.pem'})")
    p.add_argument("--tls-min", choices=sorted(tls.TLS_VERSIONS), default=tls.DEFAULT_TLS_MIN,
                   help="oldest TLS version accepted (default: %(default)s; 1.2 for old clients)")
    p.add_argument("--no-renew", action="store_true",
                   help="never re-issue the certificate from the local CA (it is renewed when within 30 days "
                   "of expiry if ca.key is beside it); expiry warnings stay")
    p.add_argument("--no-web", action="store_true",
                   help="serve no browsers: no chat page, no WebSocket and no onboarding page on this port (the line "
                   "protocol and invites only)")
    p.add_argument("--plain", action="store_true",
                   help="serve WITHOUT encryption: everything is readable by anyone on the network")
    p.add_argument("--max-clients", type=options.count(1), default=DEFAULT_MAX_CLIENTS, metavar="N",
                   help="most chatters at once, counting only those whose nickname was accepted "
                   "(default: %(default)s)")
    p.add_argument("--max-per-ip", type=options.count(0, zero="for no limit"), default=0, metavar="N",
                   help="most chatters from one address, 0 for no limit (default: %(default)s; a LAN often "
                   "shares one address behind NAT)")
    p.add_argument("--max-pending", type=options.count(1), default=MAX_PENDING, metavar="N",
                   help="most connections still logging in (TLS handshake, nickname) at once; when full, the "
                   "oldest from the busiest address is closed to make room (default: %(default)s)")
    p.add_argument("--max-pending-per-ip", type=options.count(0, zero="for no limit"),
                   default=MAX_PENDING_PER_ADDRESS, metavar="N",
                   help="most connections still logging in from one address, 0 for no limit; beyond it, that "
                   "address's oldest is closed (default: %(default)s)")
    p.add_argument("--login-timeout", type=options.duration(), default=LOGIN_TIMEOUT, metavar="SECONDS",
                   help="time from connecting to choosing a nickname (default: %(default)g)")
    p.add_argument("--handshake-timeout", type=options.duration(), default=HANDSHAKE_TIMEOUT, metavar="SECONDS",
                   help="time allowed for the TLS handshake (default: %(default)g)")
    p.add_argument("--flood-rate", type=options.rate(), default=FLOOD_RATE, metavar="LINES",
                   help="lines a second each client may send on average, 0 for no limit (default: %(default)g)")
    p.add_argument("--flood-burst", type=options.rate(zero="the same as 1"), default=FLOOD_BURST, metavar="LINES",
                   help="lines a client may send at once before the rate applies (default: %(default)g)")
    p.add_argument("--announce-limit", type=options.count(0, zero="for always"), default=ANNOUNCE_LIMIT, metavar="N",
                   help="announce joins and leaves while at most N people are online, 0 for always "
                   "(default: %(default)s)")
    p.add_argument("--data", type=options.path, metavar="DIR",
                   help="where history is kept, in history-PORT.sqlite3 (mode 0600; default: "
                   "$XDG_DATA_HOME/securechat, else ~/.local/share/securechat). History is stored UNENCRYPTED")
    p.add_argument("--no-history", action="store_true",
                   help="keep no history at all: no replay on joining, no /history, no catch-up after a drop")
    p.add_argument("--history-days", type=options.rate(MAX_HISTORY_DAYS, zero="for no age limit"),
                   default=DEFAULT_DAYS, metavar="DAYS",
                   help="forget lines older than this, 0 for never (default: %(default)g)")
    p.add_argument("--history-lines", type=options.count(0, MAX_HISTORY_LINES, zero="for no limit"),
                   default=DEFAULT_LINES, metavar="N",
                   help="keep at most the last N lines of each room, 0 for no limit (default: %(default)s)")
    p.add_argument("--replay", type=options.count(0, MAX_HISTORY_PAGE, zero="for none"), default=REPLAY_LINES,
                   metavar="N", help="lines of history shown on joining a room (default: %(default)s)")
    p.add_argument("--grace", type=options.rate(options.MAX_TIMEOUT, zero="for not at all"),
                   default=GRACE_SECONDS, metavar="SECONDS",
                   help="how long a dropped securechat client's nick and rooms are held for it to resume, "
                   "0 for not at all (default: %(default)g)")
    p.add_argument("--no-announce", action="store_true",
                   help="do not announce this server on the LAN (by default it announces itself with mDNS/DNS-SD "
                   "as _securechat._tcp on the interfaces it listens on, never on loopback, so 'securechat "
                   "servers', 'securechat connect' and 'securechat join CODE' find it without its address)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection and handshake")
    p.add_argument("--log-format", choices=console.LOG_FORMATS, default="console",
                   help="log lines on stderr: 'console', readable ([SERVER] WARNING: ...), or 'json', one "
                   "object a line for machines (default: %(default)s)")
    redis_options.add_arguments(p)
    return p


class StartError(Exception):
    """Why ``serve`` cannot start, in one line (printed after ``securechat serve: ``)."""


def _load_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The server's TLS context, minting certificates first when the defaults don't exist yet.

    Raises StartError with one line for everything an operator can get wrong on disk.
    """
    from securechat.pki import certdir

    cert = Path(args.cert or DEFAULT_CERT)
    key = Path(args.key or DEFAULT_KEY)
    if args.cert is None and args.key is None:
        _first_run(certs)
    for label, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise StartError(f"{label} file {what}: {path} (run 'securechat gen-certs' or pass --cert/--key)")
    try:
        certdir.check_key_and_dir(key)
        if not args.no_renew and (cert.parent / certs.CA_KEY).exists():
            certdir.check_key(cert.parent / certs.CA_KEY)  # renewal will use it
        # Shared lock: a gen-certs or a renewal running now cannot hand us one run's key with another's
        # certificate.
        with certdir.locked(cert.parent, shared=True):
            _enable_invites(args)
            return _context_factory(args)()
    except certdir.UnsafePermissions as exc:
        raise StartError(str(exc)) from None
    except ssl.SSLError as exc:
        why = ("the key does not belong to the certificate" if exc.reason == "KEY_VALUES_MISMATCH" else
               f"they are not a PEM certificate chain and its private key (OpenSSL: {exc.reason or exc})")
        raise StartError(f"cannot load the certificate {cert} with key {key}: {why}") from None
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot load the certificate {cert} with key {key}: {describe_error(exc)}") from None


def _first_run(certs: ModuleType) -> None:
    """Mint into certs/ unless a server certificate is there (under the directory's lock)."""
    directory = DEFAULT_CERT_DIR
    if directory.exists() and not directory.is_dir():
        raise StartError(f"{directory} is a file, not a directory of certificates: move it away, or pass "
                         "--cert/--key")
    if DEFAULT_CERT.exists():
        return

    def refuse_partial_set(directory: Path) -> None:  # runs under the lock: no other minter is half-way
        present = [name for name in (certs.CA_CERT, certs.CA_KEY, DEFAULT_KEY.name) if (directory / name).exists()]
        if present == [certs.CA_CERT]:
            raise StartError(f"{directory}/ holds {certs.CA_CERT} but no {certs.CA_KEY} and no "
                             f"{DEFAULT_CERT.name}: that is a client's copy of the CA. Run the server where the CA "
                             f"was minted, copy {DEFAULT_CERT.name} and {DEFAULT_KEY.name} here, or pass --cert/--key")
        if present and present != [certs.CA_CERT, certs.CA_KEY]:  # a CA alone is fine: the certificate is issued
            raise StartError(f"{directory}/ holds an incomplete set ({', '.join(present)}; no "
                             f"{DEFAULT_CERT.name}): restore the missing files, pass --cert/--key, or start over "
                             "with 'securechat gen-certs --force' (clients must then get the new ca.pem)")

    try:
        result = certs.mint_if_missing(directory, refuse_partial_set)
    except certs.CertError as exc:
        raise StartError(f"cannot mint a certificate in {directory}/: {exc}") from None
    except OSError as exc:
        raise StartError(f"cannot write {exc.filename or directory}: {describe_error(exc)}") from None
    if result is None:  # another process minted it first
        return
    print(f"[SERVER] No certificate in {directory}/ yet: minting a local CA and a server certificate",
          flush=True)
    print(f"[SERVER] Wrote {', '.join(str(p) for p in result.written)}", flush=True)
    print(f"[SERVER] Copy {directory / 'ca.pem'} to each client machine and connect with "
          f"--ca ca.pem", flush=True)


def _context_factory(args: argparse.Namespace) -> Callable[[], ssl.SSLContext]:
    """Builds the server context from the files named by ``args`` (again after each renewal); with the
    browser front door, each one carries the context browsers' handshakes get (no client-certificate request)."""
    build = _main_context_factory(args)
    if not _serves_browsers(args):
        return build
    from securechat.server import web

    cert, key = args.cert or DEFAULT_CERT, args.key or DEFAULT_KEY
    return lambda: web.spare_browsers(build(), cert, key, tls_min=args.tls_min)


def _serves_browsers(args: argparse.Namespace) -> bool:
    """Whether this server has a browser front door: TLS, not --no-web, and under --require-client-cert only
    with the CA at hand (browsers then chat with devices from its ledger; without it, never)."""
    return not args.plain and not args.no_web and (not args.require_client_cert
                                                   or getattr(args, "authority", None) is not None)


def _main_context_factory(args: argparse.Namespace) -> Callable[[], ssl.SSLContext]:
    """The context every handshake but a browser's uses."""
    cert = args.cert or DEFAULT_CERT
    key = args.key or DEFAULT_KEY
    client_ca = None
    if args.require_client_cert:
        client_ca = args.ca or DEFAULT_CERT_DIR / "ca.pem"
        if not Path(client_ca).is_file():
            raise StartError(f"CA file not found: {client_ca} (pass --ca, the CA that signed the client "
                             "certificates)")
    authority = getattr(args, "authority", None)
    if authority is not None:  # invites: ALPN for enrollment, optional client certificates from our CA
        return lambda: authority.configure(
            tls.server_context(cert, key, tls_min=args.tls_min, client_ca=client_ca,
                               require_client_cert=args.require_client_cert), cert)
    cluster_ca = _cluster_client_ca(args)
    if cluster_ca is not None:  # a cluster server without ca.key: recognise certificate holders too
        from securechat.server.trust import request_client_certificates

        return lambda: request_client_certificates(
            tls.server_context(cert, key, tls_min=args.tls_min, client_ca=client_ca,
                               require_client_cert=args.require_client_cert), cluster_ca)
    return lambda: tls.server_context(cert, key, tls_min=args.tls_min, client_ca=client_ca,
                                      require_client_cert=args.require_client_cert)


def _cluster_client_ca(args: argparse.Namespace) -> Path | None:
    """With --redis and no CA key here: the CA whose client certificates this server recognises
    (``--ca``, else ``ca.pem`` beside the certificate, as the README's multi-server recipe copies it)."""
    if not getattr(args, "redis", None):
        return None
    ca = Path(args.ca) if args.ca else Path(args.cert or DEFAULT_CERT).parent / certs.CA_CERT
    return ca if ca.is_file() else None


def _trust(args: argparse.Namespace) -> Trust | None:
    """What enforces the CA's ledger here: the ledger beside ca.key (published to the cluster with
    --redis), else the cluster's copy in Redis; None for a lone server without its CA."""
    from securechat.server.trust import ClusterSource, LocalSource, Trust

    ledger = None
    if args.redis:
        from securechat.store.redis_config import RedisConfig
        from securechat.store.redis_ledger import RedisLedger

        ledger = RedisLedger(RedisConfig(args.redis, ca_file=args.redis_ca))
    if args.authority is not None:
        return Trust(LocalSource(args.authority.store), require_client_cert=args.require_client_cert, publish=ledger)
    if ledger is not None:
        return Trust(ClusterSource(ledger), require_client_cert=args.require_client_cert)
    return None


def _enable_invites(args: argparse.Namespace) -> None:
    """Take invites when the local CA (ca.pem and ca.key) is beside the server certificate."""
    from securechat.pki.authority import Authority

    where = Authority.beside(args.cert or DEFAULT_CERT)
    if where is not None:
        args.authority = Authority(where, require_client_cert=args.require_client_cert)


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat serve``: returns 0 after a clean shutdown, 1 when it cannot start."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plain and args.require_client_cert:
        parser.error("--require-client-cert needs TLS; it cannot be combined with --plain")
    redis_error = redis_options.usage_error(args)
    if redis_error:
        parser.error(redis_error)
    try:
        args.listen, args.dual_stack = listen.plan(args.listen)
    except listen.ListenError as exc:
        parser.error(str(exc))
    # The console is for the operator; the chat must not die with it (> /dev/full, | head -1).
    options.guard_stdout(PROG)
    listener = console.nonblocking_logging(logging.INFO if args.verbose else logging.WARNING,
                                           console.log_formatter(args.log_format))
    console.stdout.start()  # now, so the process's thread count is steady from the first client on
    try:
        return _serve(args)
    finally:
        console.stdout.flush()
        listener.stop()


def _bind(server: ChatServer, args: argparse.Namespace) -> OSError | None:
    """Bind ``server``; the error, if any. Dual stack falls back to IPv4 where IPv6 is switched off."""
    try:
        server.bind()
        return None
    except OSError as exc:
        if not args.dual_stack:
            return exc
    server.host, server.dual_stack, args.listen, args.dual_stack = DEFAULT_HOST, False, DEFAULT_HOST, False
    try:
        server.bind()
    except OSError as exc:
        return exc
    return None


# Descriptors a connection holds (its socket: the loops' wakers are shared), and what the server
# keeps besides (listener, loops' epoll and wakers, log files, certificate reloads), with room to spare.
FDS_PER_CONNECTION = 1
FDS_SPARE = 64


def _raise_descriptor_limit(connections: int) -> None:
    """Take the soft RLIMIT_NOFILE up to the hard one (as Go's runtime does) and warn if still short.

    The usual soft limit of 1024 would run out at ~1000 connections; running out is survivable (one
    log line, the oldest unauthenticated connections make room) but avoidable.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # e.g. an unlimited hard limit the kernel will not grant
            pass
    wanted = connections * FDS_PER_CONNECTION + FDS_SPARE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("only %d file descriptors allowed (ulimit -n); --max-clients and --max-pending may need "
                    "%d: when they run out, the oldest unauthenticated connections make room", soft, wanted)


def _announcement(args: argparse.Namespace, context: ssl.SSLContext | None) -> tuple[Path | None, dnssd.Txt]:
    """The certificate whose addresses may be announced, and the TXT record. The fingerprint clients
    pin is the top of the chain, as the '(for --pin)' line shows."""
    cert = None if context is None else Path(args.cert or DEFAULT_CERT)
    try:
        ca = tls.file_fingerprints(cert)[-1] if cert is not None else None
    except (OSError, ValueError):
        ca = None
    return cert, dnssd.Txt(tls=context is not None, ca=ca, mutual=args.require_client_cert,
                           invites=args.authority is not None)


def _serve(args: argparse.Namespace) -> int:
    args.authority = None
    try:
        if args.plain:
            context = None
        else:
            context = _load_context(args)
    except StartError as exc:
        options.print_error(PROG, str(exc))
        return 1
    try:
        cluster = redis_options.open_from_args(args)  # --redis: rooms shared with the other servers
    except redis_config.RedisStartError as exc:
        options.print_error(PROG, str(exc))
        return 1
    roomlog, directory = cluster if cluster is not None else (None, None)
    trust = _trust(args)
    server = ChatServer(args.listen, args.port, context, dual_stack=args.dual_stack,
                        max_clients=args.max_clients, max_per_ip=args.max_per_ip,
                        handshake_timeout=args.handshake_timeout, login_timeout=args.login_timeout,
                        flood_rate=args.flood_rate, flood_burst=args.flood_burst,
                        announce_limit=args.announce_limit, max_pending=args.max_pending,
                        max_pending_per_ip=args.max_pending_per_ip, replay=args.replay, grace=args.grace,
                        offline_messages=args.require_client_cert and not args.no_history,
                        authority=args.authority, trust=trust, roomlog=roomlog, directory=directory)
    if _serves_browsers(args):
        from securechat.server import pages, web

        web.install(server, pages.Onboarding.for_certificate(args.cert or DEFAULT_CERT),
                    mutual=args.require_client_cert)
    _raise_descriptor_limit(args.max_clients + args.max_pending)
    failure = _bind(server, args)
    if failure is not None:
        where = addr.join(args.listen, args.port)
        if failure.errno == errno.EADDRNOTAVAIL:
            options.print_error(PROG, f"cannot listen on {where}: {addr.host_text(args.listen)} is not an address "
                                "of this machine; leave --listen out to listen on all of them")
        else:
            options.print_error(PROG, f"cannot listen on {where}: {describe_error(failure)}")
        if directory is not None:
            directory.close()
        return 1
    history_path = None
    if directory is not None:  # --redis: Redis keeps the shared history
        try:
            server.rooms.start()
        except redis_config.RedisStartError as exc:
            options.print_error(PROG, str(exc))
            server.abandon()
            directory.close()
            return 1
    elif not args.no_history:
        from securechat.store.history import DB_NAME, HistoryError, SqliteLog

        # One file per port: two servers on one machine are two chats (and a port-0 test server
        # gets a file of its own).
        history_path = (args.data or default_data_dir()) / DB_NAME.format(port=server.address[1])
        try:
            server.rooms.log = SqliteLog(history_path, days=args.history_days, lines=args.history_lines)
        except HistoryError as exc:
            options.print_error(PROG, f"history: {exc}")
            server.abandon()
            return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop_from_signal()

    # These signals only wake the accept loop; the shutdown then runs in the main thread, so a
    # second Ctrl-C cannot interrupt it half-way with a traceback. The kernel may deliver a signal
    # to any thread, and Python runs handlers only in the main one: the wakeup pipe makes sure
    # the main thread's poll() returns. SIGHUP (the terminal closed, the ssh session dropped)
    # would otherwise kill the server without a word to anyone: it is a shutdown like SIGTERM.
    for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, on_signal)
    signal_r, signal_w = os.pipe()
    os.set_blocking(signal_r, False)
    os.set_blocking(signal_w, False)
    signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
    renewer = None
    if context is not None:
        from securechat.pki.renewal import CertRenewer

        # Renews from the local CA (or warns) now and daily; swaps server.ssl_context for new handshakes.
        renewer = CertRenewer(server, args.cert or DEFAULT_CERT, args.key or DEFAULT_KEY,
                              auto_renew=not args.no_renew, build_context=_context_factory(args))
        renewer.check_once()
        renewer.start()
    if args.require_client_cert:
        print("[SERVER] Mutual TLS: only clients with a certificate from the CA may join; nicknames are "
              "their certificates' names", flush=True)
    if args.authority is not None:
        print("[SERVER] Invites: add a person or machine with 'securechat invite [NAME]' (no restart needed)",
              flush=True)
    if directory is not None:
        print(f"[SERVER] Sharing rooms and history through Redis at {redis_config.redact(args.redis)} "
              f"(this server is {directory.origin})", flush=True)
    elif history_path is None:
        print("[SERVER] History is off (--no-history)", flush=True)
    else:
        print(f"[SERVER] History (unencrypted) in {history_path}", flush=True)
    if context is None:
        print("[SERVER] WARNING: --plain: NO ENCRYPTION. Every message and nickname can be read and altered by "
              "anyone on the network.", flush=True)
    else:
        prints = tls.file_fingerprints(args.cert or DEFAULT_CERT)
        # Which is which: the CA's is what --tofu remembers, and the --pin that survives renewal.
        print(f"[SERVER] Server certificate SHA-256 fingerprint{'' if len(prints) > 1 else ' (for --pin)'}: "
              f"{prints[0]}", flush=True)
        if len(prints) > 1:
            print(f"[SERVER] CA SHA-256 fingerprint (for --pin): {prints[-1]}", flush=True)
    host, port = server.address
    for line in listen.banner(host, port, server.dual_stack):
        print(line, flush=True)
    for line in listen.connect_hint(host, port, server.dual_stack,
                                    cert=None if context is None else args.cert or DEFAULT_CERT,
                                    mutual=args.require_client_cert):
        print(line, flush=True)
    if _serves_browsers(args):
        for line in listen.browser_hint(host, port, server.dual_stack, cert=args.cert or DEFAULT_CERT,
                                        mutual=args.require_client_cert):
            print(line, flush=True)
    announcer = None
    if not args.no_announce:
        from securechat.server import announce

        cert, txt = _announcement(args, context)
        announcer = announce.start(host, port, dual=server.dual_stack, cert=cert, txt=txt)
    watcher = None
    record = None
    if args.authority is not None:
        from securechat.pki import serving

        # Beside the invite store, so 'securechat invite' names this port and these addresses.
        lan, loopback = listen.reachable(host, server.dual_stack, args.cert or DEFAULT_CERT)
        record = serving.publish(args.authority.dir, port, [*lan, *loopback])
    if trust is not None:
        from securechat.server.revocation import RevocationWatcher

        watcher = RevocationWatcher(trust, server.sessions)
        watcher.start()
    server.serve_forever(signal_fd=signal_r)
    if announcer is not None:
        announcer.stop()  # first: nobody should find a server that is going away
    if watcher is not None:
        watcher.stop()
    if trust is not None:
        trust.close()
    if record is not None:
        record.close()
    signal.set_wakeup_fd(-1)
    os.close(signal_r)
    os.close(signal_w)
    if renewer is not None:
        renewer.stop()
    if directory is not None:
        directory.drain()  # its people may resume on another server of the chat
    server.shutdown()
    if directory is not None:
        directory.close()
    print("[SERVER] Stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
