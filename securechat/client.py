"""The chat client: ``securechat connect HOST`` and the :class:`ChatClient` library behind it.

Like the server, the client gives its socket exactly one owner: the TLS handshake runs in the
calling thread, then a background thread drives a :class:`~securechat.conn.Connection` and alone
touches the ``SSLSocket``; every other thread only queues bytes with ``send()``. Received lines
land in a queue (:meth:`ChatClient.recv_line`) or go to a callback.

Two front ends share the library: a prompt_toolkit terminal UI when stdin and stdout are
terminals (incoming messages print above the input line, never through what is being typed),
and a plain line mode for pipes and files (each stdin line is sent, each received line printed).

Every failure a user can meet (wrong port, wrong CA file, certificate for another address, TLS
against a ``--plain`` server, a client certificate the server refuses, a server whose fingerprint
does not match ``--pin`` or changed since ``--tofu`` met it, ...) becomes one :class:`ChatError`
whose text says what to do; the command line prints it on one line and exits 1, never with a
traceback.

Who is who (issue 6): ``--cert``/``--key`` present a client certificate (mutual TLS; on a server
started with ``--require-client-cert`` the certificate's name *is* the nickname); the server is
recognised by ``--ca`` (its CA file), ``--pin`` (an exact SHA-256 fingerprint, of its CA or of its
own certificate) or ``--tofu`` (the fingerprint remembered at first contact). Pin and TOFU only
choose which certificate OpenSSL trusts; the verification is the same as with ``--ca``, and it is
over before a single byte is sent (see :mod:`securechat.identity`).
"""

from __future__ import annotations

import argparse
import errno
import os
import queue
import socket
import ssl
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from securechat import DEFAULT_PORT, addr, certdir, identity, options, protocol, tls
from securechat.conn import Connection, describe_error, tune_socket
from securechat.session import ResumeState, backoff

# Exit statuses, as securechat.cli defines them for every subcommand.
EXIT_OK = 0
EXIT_FAILURE = 1

DEFAULT_CA = Path("certs") / "ca.pem"

# Connecting and the TLS handshake: a LAN answers in milliseconds, so 10 s means nobody is there.
DEFAULT_TIMEOUT = 10.0

# A securechat server greets at once; a TLS server reached by a --plain client says nothing (it waits
# for a ClientHello). Silence this long from a plain connection is the tell, well before the 10 s of
# DEFAULT_TIMEOUT and long enough for a loaded LAN server to get to us.
PLAIN_GREETING_WAIT = 2.0

# After /quit, how long to wait for the server's "* goodbye" and close before closing ourselves.
QUIT_WAIT = 2.0

# What a server may make the client hold (issue 10: a hostile server drove one to 500 MiB).
# Before it accepts a nickname a securechat server sends its greeting and one answer per nickname
# tried: 64 lines is far beyond that, so more means a hostile or confused server.
MAX_LINES_BEFORE_WELCOME = 64
# Received lines left unread by a recv_line() caller: at most 4096 * MAX_LINE_BYTES = 16 MiB.
MAX_QUEUED_LINES = 4096
# Lines typed or piped ahead of the connection in line mode; reading stdin waits beyond that.
MAX_STDIN_LINES = 1024

# OpenSSL X509_V_ERR_* codes that mean "the certificate is fine but names another host/address".
_X509_HOSTNAME_MISMATCH = 62
_X509_IP_ADDRESS_MISMATCH = 64
# ... and those that mean "signed by a CA we were not given" (wrong or missing ca.pem).
_X509_UNTRUSTED = {
    2,  # unable to get issuer certificate
    18,  # self-signed certificate
    19,  # self-signed certificate in chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
    7,  # certificate signature failure
}
_X509_EXPIRED = 10
_X509_NOT_YET_VALID = 9

# OpenSSL reasons seen when the peer answers a ClientHello with plaintext (a --plain server's
# "* securechat: ..." greeting is not a TLS record).
_PLAINTEXT_PEER_REASONS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                           "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"}
# ... and those seen when the certificate the server sent is not one OpenSSL can parse.
_BAD_CERTIFICATE_REASONS = {"ASN1_LIB", "X509_LIB", "BAD_CERTIFICATE", "WRONG_TAG", "HEADER_TOO_LONG",
                            "NESTED_ASN1_ERROR", "TOO_LONG", "BAD_PACKET_LENGTH", "LENGTH_MISMATCH",
                            "UNKNOWN_CERTIFICATE_TYPE", "CCS_RECEIVED_EARLY"}

_CA_HELP = ("copy ca.pem from the server's certs/ folder (the server mints it on first run) and pass "
            "--ca PATH")

_MINT_HELP = "securechat gen-certs --client NAME"

# TLS alerts a server sends when it refuses our client certificate (mutual TLS), as OpenSSL 3 names
# them (ssl.SSLError.reason). With TLS 1.3 our side of the handshake completes first and the alert
# arrives on the first read; with TLS 1.2 it ends the handshake itself.
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        f"the server requires a client certificate: pass --cert and --key (mint one with {_MINT_HELP} "
        "on the server)"),
    "SSLV3_ALERT_CERTIFICATE_REQUIRED": (
        f"the server requires a client certificate: pass --cert and --key (mint one with {_MINT_HELP} "
        "on the server)"),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "the server does not accept this client certificate (signed by another CA?): ask for one minted "
        f"with {_MINT_HELP} on that server"),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        "the server does not accept this client certificate (signed by another CA, or not valid yet?): ask "
        f"for one minted with {_MINT_HELP} on that server, and check both clocks"),
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": (
        "the server does not accept this client certificate (not made for client authentication?): ask "
        f"for one minted with {_MINT_HELP}"),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (
        "the server does not accept this client certificate (signed by another CA?): ask for one minted "
        f"with {_MINT_HELP} on that server"),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        f"your client certificate has expired: ask for a new one ({_MINT_HELP} on the server)"),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "your client certificate has been revoked: ask the server's admin",
}
# TLS 1.2 has no "certificate required" alert: a server wanting a certificate we did not send
# answers with a generic handshake failure.
_HANDSHAKE_FAILURE = "SSLV3_ALERT_HANDSHAKE_FAILURE"


def explain_alert(reason: str | None) -> str | None:
    """Words for a TLS alert by which the server refused our client certificate, or None."""
    return _CLIENT_CERT_ALERTS.get(reason or "")


class ChatError(Exception):
    """A failure explained for people: ``str(exc)`` is one line saying what happened and what to do."""


class NickRefused(ChatError):
    """The server refused the nickname; ``reason`` is its explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"nickname refused: {reason}")
        self.reason = reason


class ServerFull(ChatError):
    """The server has as many clients as it accepts."""


class TLSRequired(ChatError):
    """A plain (``--plain``) client reached a server that only speaks TLS."""


class CertificateRefused(ChatError):
    """The server refused our client certificate (or wanted one): mutual TLS."""


class IdentityRefused(ChatError):
    """The server is not the one ``--pin`` or ``--tofu`` expects; nothing was sent to it."""


class BoundNickUnusable(ChatError):
    """With mutual TLS the nickname is the certificate's, and the server cannot let it join (already
    connected elsewhere, ...); the server has closed the connection, so asking again is pointless."""


class Disconnected(ChatError):
    """The connection ended; ``shutdown`` is True when the server announced its own shutdown."""

    def __init__(self, message: str, *, shutdown: bool = False) -> None:
        super().__init__(message)
        self.shutdown = shutdown


_END = object()  # queue sentinel: the connection has ended

# Where a client is with its server (after the first welcome).
_LIVE, _RECONNECTING, _RESUMING, _REREGISTERING, _GAVE_UP = range(5)

# The server's last word before closing on purpose: no reconnecting after these.
_FINAL_NOTICES = frozenset({"goodbye", "disconnected for flooding"})
_FINAL_PREFIXES = (protocol.LINE_TOO_LONG, "no nickname within", protocol.SERVER_FULL, protocol.CERT_REVOKED,
                   protocol.CERT_REQUIRED)


class ChatClient:
    """A connection to a securechat server.

    Typical use::

        client = ChatClient()
        client.connect("127.0.0.1", 5555, ssl_context=tls.client_context("ca.pem"))
        client.register("alice")
        client.send("hello")
        line = client.recv_line(timeout=5)   # "[bob] hi", "* carol joined", ... or None
        client.close()

    Received lines are delivered to ``on_line`` (called in the connection's thread) when given,
    otherwise queued for :meth:`recv_line`. The socket is only ever touched by one thread at a time:
    the caller's during :meth:`connect`, then the connection thread.
    """

    def __init__(self, on_line: Callable[[str], None] | None = None, *, reconnect: bool = True) -> None:
        self.on_line = on_line
        # Resuming after a dropped connection (securechat.session): asked for after the welcome.
        self.reconnect = reconnect
        self.resume = ResumeState()
        self._phase = _LIVE
        self._closing = threading.Event()  # close() was called: stop reconnecting
        self._quitting = False
        self._connect_args: dict[str, object] = {}
        # Held while a line is handed over and while on_line is switched, so lines keep their order.
        self._deliver_lock = threading.Lock()
        self.nick: str | None = None
        self.host = ""
        self.port = 0
        self.servers: list[tuple[str, int]] = []  # this chat's servers (several with serve --redis)
        self.tls = False
        self._lines: queue.Queue[object] = queue.Queue()
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None
        self._ended = threading.Event()
        self._end_reason = ""
        self._saw_shutdown = False
        self._last_notice = ""  # the server's last word, to explain why it closed the connection
        self._pending_lines: list[str] = []  # lines read by register() past its answer
        # "/cap echo" (protocol.CAP_ECHO): asked after every welcome when want_echo is set (so also
        # after a reconnection); its answer is consumed here, not delivered.
        self.want_echo = False
        self.echo = False  # the server copies our own lines back, exactly as relayed
        self.flood_limit: tuple[float, float] | None = None  # (lines/s, burst) the server advertised
        self._caps_asked = 0
        self._caps_answered = threading.Event()
        self._overflow = ""  # why the client hung up on a server that sent too much, if it did
        self._welcomed = False  # a welcome line has arrived (connection thread)

    # -- connecting -----------------------------------------------------------------------

    def connect(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        trust: identity.ServerTrust | None = None,
        alternates: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Open the TCP connection and, unless ``ssl_context`` and ``trust`` are None, complete the TLS handshake.

        ``alternates``: other servers of the same chat (``serve --redis``), ``(host, port)`` each,
        tried in order when ``host`` does not answer, now and when reconnecting.

        ``server_hostname`` is the name or address the certificate must be valid for (default:
        ``host``). ``trust`` (``--pin``/``--tofu``, instead of ``ssl_context``) first fetches the
        server's chain over a probe connection that sends nothing, picks the certificate to trust,
        then connects with a verifying context trusting only that one (see :mod:`securechat.identity`).
        Raises :class:`ChatError` with an explanation on any failure (:class:`IdentityRefused` when the
        server is not the one ``trust`` expects; nothing was sent to it then).
        """
        if self._conn is not None:
            raise RuntimeError("already connected")
        if trust is not None and ssl_context is not None:
            raise ValueError("pass ssl_context or trust, not both")
        self.host, self.port, self.tls = host, port, ssl_context is not None or trust is not None
        self.servers = [(host, port), *alternates]
        # Kept to connect again after a dropped connection (securechat.session).
        self._connect_args = {"ssl_context": ssl_context, "server_hostname": server_hostname, "timeout": timeout,
                              "trust": trust}
        sock = self._open_any()
        self._conn = Connection(sock, self._on_lines)
        self._thread = threading.Thread(target=self._run, name=f"securechat-client-{host}:{port}", daemon=True)
        self._thread.start()

    def _establish(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        timeout: float,
        trust: identity.ServerTrust | None,
    ) -> socket.socket | ssl.SSLSocket:
        """The connected (and, with TLS, verified) socket, as :meth:`connect` describes; raises ChatError."""
        where = addr.join(host, port)
        name = server_hostname or host
        if trust is not None:
            try:
                chain = identity.fetch_chain(self._open(host, port, timeout), name, tls_min=trust.tls_min)
            except ssl.SSLError as exc:
                raise _handshake_error(exc, where) from None
            except TimeoutError:
                raise _handshake_timeout(where, timeout) from None
            except OSError as exc:
                raise _handshake_lost(where, exc) from None
            except identity.IdentityError as exc:
                raise IdentityRefused(f"refusing {where}: {exc}") from None
            try:
                ssl_context = trust.context(trust.choose(chain))
            except identity.IdentityError as exc:
                raise IdentityRefused(f"refusing {where}: {exc}") from None
            # What OpenSSL does not check is checked on the probe's leaf too, so that a client
            # certificate is not sent to such a server (it is checked again after the handshake).
            problem = tls.server_leaf_problem(chain[0])
            if problem is not None and problem != tls.UNPARSEABLE:  # OpenSSL says more on those
                raise IdentityRefused(f"refusing {where}: the server's certificate was refused: {problem}")
        raw = self._open(host, port, timeout)
        sock: socket.socket | ssl.SSLSocket = raw
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(raw, server_hostname=name)
            except ssl.SSLCertVerificationError as exc:
                raw.close()
                if trust is not None:
                    explained = trust.explain(exc.verify_code, exc.verify_message, name)
                    raise IdentityRefused(f"refusing {where}: {explained}") from None
                raise ChatError(_explain_verification(exc, name)) from None
            except ssl.SSLError as exc:
                raw.close()
                raise _handshake_error(exc, where) from None
            except TimeoutError:
                raw.close()
                raise _handshake_timeout(where, timeout) from None
            except OSError as exc:
                raw.close()
                raise _handshake_lost(where, exc) from None
            problem = (tls.server_leaf_problem(sock.getpeercert(binary_form=True) or b"")
                       if ssl_context.verify_mode == ssl.CERT_REQUIRED else None)
            if problem is not None:
                sock.close()
                if trust is not None:
                    raise IdentityRefused(f"refusing {where}: the server's certificate was refused: {problem}")
                raise ChatError(f"the server's certificate was refused: {problem}")
            if trust is not None:
                try:
                    trust.confirmed()
                except identity.IdentityError as exc:
                    sock.close()
                    raise ChatError(str(exc)) from None
        return sock

    @staticmethod
    def _open(host: str, port: int, timeout: float) -> socket.socket:
        """A TCP connection to ``host:port``, tuned; ChatError saying what to check on failure."""
        where = addr.join(host, port)
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as exc:
            raise ChatError(f"cannot find the host {host!r} ({exc.strerror}): check the name, or use the "
                            "server's IP address (the server prints it)") from None
        except UnicodeError:  # not encodable as a host name at all (IDNA), e.g. bytes that are not UTF-8
            raise ChatError(f"{host!r} is not a valid host name: check the name, or use the server's IP "
                            "address (the server prints it)") from None
        except ConnectionRefusedError:
            raise ChatError(f"connection refused by {where}: is the server running, and on that port "
                            "(--port)?") from None
        except TimeoutError:
            raise ChatError(f"no answer from {where} within {timeout:g} s: is the IP address right, is the "
                            f"server on the same network, does a firewall block TCP port {port}?") from None
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                raise ChatError(f"cannot reach {where} ({describe_error(exc)}): is the IP address right and "
                                "this machine on the same network?") from None
            raise ChatError(f"cannot connect to {where}: {describe_error(exc)}") from None
        tune_socket(raw)
        return raw

    def _open_any(self) -> socket.socket | ssl.SSLSocket:
        """A socket to the current server, else to the next of :attr:`servers` that answers (which
        becomes the current one); the current server's ChatError when none does."""
        start = self.servers.index((self.host, self.port)) if (self.host, self.port) in self.servers else 0
        first: ChatError | None = None
        for i in range(len(self.servers)):
            host, port = self.servers[(start + i) % len(self.servers)]
            try:
                sock = self._establish(host, port, **self._connect_args)  # type: ignore[arg-type]
            except (IdentityRefused, CertificateRefused):
                raise  # a server that is not ours, or refuses us: never fall through to another
            except ChatError as exc:
                first = first or exc
                continue
            self.host, self.port = host, port
            return sock
        assert first is not None
        if len(self.servers) > 1:
            raise ChatError(f"{first} (and none of the other {len(self.servers) - 1} servers answered)")
        raise first

    def _run(self) -> None:
        try:
            while True:
                assert self._conn is not None
                self._end_reason = self._conn.run()
                if not self._should_reconnect() or not self._reconnect():
                    break
        finally:
            self._ended.set()
            self._lines.put(_END)

    # -- resuming after a dropped connection (the logic is in securechat.session) --------------

    def _should_reconnect(self) -> bool:
        """A connection that dropped, not one that was ended on purpose by either side."""
        if not self.reconnect or not self.resume.token or self._closing.is_set() or self._quitting:
            return False
        if self._phase == _LIVE and self._saw_shutdown and len(self.servers) > 1:
            return True  # one server of a chat that has others (connect a,b): move to another
        if self._phase == _LIVE and (self._saw_shutdown or self._last_notice in _FINAL_NOTICES
                                     or self._last_notice.startswith(_FINAL_PREFIXES)):
            return False
        return self._phase != _GAVE_UP

    def _notify(self, text: str) -> None:
        """Show a line of our own (the reconnecting state) as if received."""
        with self._deliver_lock:
            if self.on_line is not None and self.nick is not None:
                self.on_line(text)
            else:
                self._lines.put(text)

    def _reconnect(self) -> bool:
        """Connect again, with backoff, until a socket is open (then resume) or close() is called."""
        if self._phase == _LIVE:
            self._notify(f"* connection lost ({self._end_reason}): reconnecting... (Ctrl-C quits)")
            self._delays = backoff()
        self._phase = _RECONNECTING
        delay = next(self._delays)
        while not self._closing.wait(delay):
            try:
                sock = self._open_any()  # this server first, then the others of the chat
            except (IdentityRefused, CertificateRefused) as exc:  # trying again will not help
                self._notify(f"* cannot reconnect: {exc}")
                return False
            except ChatError as exc:
                delay = next(self._delays)
                self._notify(f"* still reconnecting ({exc}); next try in {delay:g} s")
                continue
            if self._closing.is_set():  # close() came while connecting
                sock.close()
                return False
            self._conn = Connection(sock, self._on_lines)
            self._phase = _RESUMING
            self._saw_shutdown = False  # that was the previous server
            self._conn.send(protocol.encode(self.resume.resume_line()))
            return True
        return False

    def _resuming(self, line: str) -> str | None:
        """A line received while resuming: the handshake's own lines are not shown."""
        notice = protocol.NOTICE_PREFIX
        if line.startswith(notice + protocol.GREETING):
            return None
        if protocol.welcome_nick(line) is not None:
            if self._phase == _REREGISTERING:
                assert self._conn is not None
                self._conn.send(protocol.encode("/session"))
                self._capabilities(line)  # a fresh session: ask for "/cap echo" again
                for command in self.resume.rejoin_lines():
                    self._conn.send(protocol.encode(command))
                self._phase = _LIVE
                return (f"* reconnected, but the server had forgotten this session: lines said meanwhile "
                        f"are lost ({line[len(notice):]})")
            self._phase = _LIVE
            return line
        if line.startswith(notice + protocol.RESUME_REFUSED):
            assert self._conn is not None and self.nick is not None
            self._phase = _REREGISTERING
            self.resume.positions.clear()
            self._conn.send(protocol.encode(self.nick))
            return None
        if line.startswith(notice + protocol.NICK_REFUSED):
            self._phase = _GAVE_UP
            return f"* cannot get the nickname back: {line[len(notice + protocol.NICK_REFUSED):]}"
        if line.startswith((notice + protocol.CERT_REVOKED, notice + protocol.CERT_REQUIRED)):
            self._phase = _GAVE_UP  # refused before the greeting: trying again will not help
            return f"* cannot reconnect: {line[len(notice):]}"
        return line

    def _on_lines(self, lines: list[bytes]) -> None:
        """Connection thread: decode, sanitise (the server is not trusted with our terminal), deliver."""
        for raw in lines:
            shown = self.resume.filter(protocol.sanitize(protocol.decode(raw)))
            if shown is not None and self._phase != _LIVE:
                shown = self._resuming(shown)
            if shown is None:
                continue
            line = shown
            if self._capabilities(line):
                continue
            if protocol.is_notice(line):
                self._last_notice = line[len(protocol.NOTICE_PREFIX):]
                if self._last_notice.startswith(protocol.SHUTDOWN):
                    self._saw_shutdown = True
            with self._deliver_lock:
                # Our own nick follows every rename the server confirms (nicks are unique, and the
                # server orders our lines, so "* <our nick> is now X" is about us); a refusal changes nothing.
                rename = protocol.renamed(line)
                if rename is not None and self.nick is not None and \
                        protocol.nick_key(rename[0]) == protocol.nick_key(self.nick):
                    self.nick = rename[1]
                if self.on_line is not None and self.nick is not None:
                    self.on_line(line)
                elif self._lines.qsize() >= (MAX_QUEUED_LINES if self._welcomed else MAX_LINES_BEFORE_WELCOME):
                    self._hang_up_flooded()
                    return
                else:
                    # A busy room may follow the welcome before register() has read it.
                    self._welcomed = self._welcomed or protocol.welcome_nick(line) is not None
                    self._lines.put(line)

    def _capabilities(self, line: str) -> bool:
        """Connection thread: ask for ``/cap echo`` after a welcome; True for its answer (consumed)."""
        if self.want_echo and self._conn is not None and protocol.welcome_nick(line) is not None:
            self._caps_asked += 1
            self._conn.send(protocol.encode(f"/{protocol.CAP_COMMAND} {protocol.CAP_ECHO}"))
            return False
        if not self._caps_asked:
            return False
        cap = protocol.parse_cap_reply(line)
        if cap is None and not line.startswith(("* unknown command /cap", "* " + protocol.CAP_REPLY)):
            return False
        self._caps_asked -= 1
        self.echo = cap is not None and cap[0] == protocol.CAP_ECHO
        if cap is not None:
            self.flood_limit = (cap[1], cap[2])
        self._caps_answered.set()
        return True

    def wait_capabilities(self, timeout: float) -> bool:
        """After :meth:`register` with ``want_echo``: wait for the server's answer; True once it came."""
        return self._caps_answered.wait(timeout)

    def _hang_up_flooded(self) -> None:
        """Connection thread: the server sent more than the client keeps; end the connection."""
        assert self._conn is not None
        if not self._welcomed:
            self._overflow = (f"the server sent more than {MAX_LINES_BEFORE_WELCOME} lines before accepting a "
                              "nickname: it is not a securechat server, or a hostile one; disconnected")
        else:
            self._overflow = (f"more than {MAX_QUEUED_LINES} received lines were left unread; disconnected "
                              "(read them with recv_line(), or pass on_line)")
        self._conn.abort("flooded")

    # -- registering ------------------------------------------------------------------------

    def register(self, nick: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Ask for ``nick``; return the nick the server accepted.

        Raises :class:`NickRefused` (the connection stays open: call again with another nick),
        :class:`ServerFull`, :class:`TLSRequired` or :class:`Disconnected`.
        """
        self.send(nick)
        deadline = time.monotonic() + timeout
        for _ in range(MAX_LINES_BEFORE_WELCOME):
            line = self.recv_line(max(0.0, deadline - time.monotonic()))
            if line is None or time.monotonic() > deadline:
                if self.closed:
                    self._raise_ended()
                raise ChatError(f"no answer from the server within {timeout:g} s after sending the nickname")
            accepted = protocol.welcome_nick(line)
            if accepted is not None:
                if self.reconnect:
                    self.send("/session")  # ids on room lines, and a token to resume with
                self._pending_lines.append(line)
                with self._deliver_lock:
                    self.nick = accepted
                    # From here on, a callback (if any) gets the lines; hand it what is queued first.
                    if self.on_line is not None:
                        for held in self._drain_queue():
                            self.on_line(held)
                return accepted
            self._check_refusal(line)
            # Anything else before the welcome (the greeting) is of no interest to the caller.
        self.close(timeout=0.5)
        raise ChatError(f"the server sent {MAX_LINES_BEFORE_WELCOME} lines without answering the nickname: it "
                        "is not a securechat server, or a hostile one; disconnected")

    def _check_refusal(self, line: str) -> None:
        """Raise the ChatError a pre-welcome notice stands for, if any."""
        notice = protocol.NOTICE_PREFIX
        if line.startswith(notice + protocol.NICK_REFUSED):
            reason = line[len(notice + protocol.NICK_REFUSED):]
            if reason.endswith("; goodbye"):
                # Mutual TLS: the certificate's name cannot join, and the server hangs up.
                reason = reason.removesuffix("; goodbye")
                if "already connected" in reason:
                    raise BoundNickUnusable(
                        f"nickname refused: {reason}: this certificate is already in use in another "
                        "session; leave that one first (each person needs their own certificate: "
                        f"{_MINT_HELP})")
                raise BoundNickUnusable(f"nickname refused: {reason}: ask for a certificate with a usable "
                                        f"name ({_MINT_HELP})")
            raise NickRefused(reason.removesuffix("; send another"))
        if line.startswith(notice + protocol.SERVER_FULL):
            raise ServerFull(f"{line[len(notice):]}")
        if line.startswith((notice + protocol.CERT_REQUIRED, notice + protocol.CERT_REVOKED)):
            raise CertificateRefused(f"{self.host}:{self.port} refused the connection: {line[len(notice):]}")
        if line.startswith(notice + protocol.TLS_REQUIRED):
            raise TLSRequired(f"{line[len(notice):]} (drop --plain and pass --ca with the server's ca.pem)")

    def wait_greeting(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the server's first line and raise if it is a refusal.

        A TLS or plain securechat server greets at once (or says it is full); a TLS server reached by
        a plain client says nothing until the client speaks. Returns False on silence, for the caller
        to judge.
        """
        line = self.recv_line(timeout)
        if line is None:
            if self.closed:
                self._raise_ended()
            return False
        self._check_refusal(line)
        if not line.startswith(protocol.NOTICE_PREFIX + protocol.GREETING):
            self._pending_lines.append(line)
        return True

    def set_on_line(self, callback: Callable[[str], None] | None) -> None:
        """Deliver received lines to ``callback`` (in the connection thread) from now on.

        Lines already queued are passed to it first, in order. None goes back to :meth:`recv_line`.
        """
        with self._deliver_lock:
            if callback is not None and self.nick is not None:
                for held in self._drain_queue():
                    callback(held)
            self.on_line = callback

    def _drain_queue(self) -> list[str]:
        out = self._pending_lines
        self._pending_lines = []
        while True:
            try:
                item = self._lines.get_nowait()
            except queue.Empty:
                return out
            if item is _END:
                self._lines.put(_END)
                return out
            out.append(item)  # type: ignore[arg-type]

    def _raise_ended(self) -> None:
        if explain_alert(self._end_reason.removeprefix("TLS error: ")) is not None:
            raise CertificateRefused(self.end_message())
        raise Disconnected(self.end_message(), shutdown=self._saw_shutdown)

    # -- chatting ---------------------------------------------------------------------------

    def send(self, text: str) -> bool:
        """Queue one line for the server (a newline is added). False once the connection is gone."""
        if self._conn is None:
            raise RuntimeError("not connected")
        if self._ended.is_set():
            return False
        if self._phase != _LIVE:
            self._notify("* not connected (reconnecting...): line not sent")
            return True
        if self._conn.closing:
            return False
        return self._conn.send(protocol.encode(text.replace("\n", " ")))

    def recv_line(self, timeout: float | None = None) -> str | None:
        """The next received line, or None when none arrives within ``timeout`` or the connection ended.

        Tell the two apart with :attr:`closed`. Lines go to ``on_line`` instead once registered with a
        callback.
        """
        if self._pending_lines:
            return self._pending_lines.pop(0)
        try:
            if timeout is None or timeout > 0:
                item = self._lines.get(timeout=timeout)
            else:
                item = self._lines.get_nowait()
        except queue.Empty:
            return None
        if item is _END:
            self._lines.put(_END)  # every later call sees the end too
            return None
        return item  # type: ignore[return-value]

    @property
    def closed(self) -> bool:
        """True once the connection has ended (for whatever reason)."""
        return self._ended.is_set()

    @property
    def reconnecting(self) -> bool:
        """True while a dropped connection is being re-established (see :mod:`securechat.session`)."""
        return self._phase != _LIVE and not self._ended.is_set()

    @property
    def server_shut_down(self) -> bool:
        """True when the server announced ``* server shutting down``."""
        return self._saw_shutdown

    @property
    def last_notice(self) -> str:
        """The text of the last server notice received (without ``* ``), e.g. ``goodbye``."""
        return self._last_notice

    @property
    def end_reason(self) -> str:
        """Why the connection ended, as the connection engine put it ("closed by peer", ...)."""
        return self._end_reason

    def end_message(self) -> str:
        """One line for people about why the connection ended."""
        if self._saw_shutdown:
            return "the server shut down"
        if self._overflow:
            return self._overflow
        reason = self._end_reason or "closed"
        refusal = explain_alert(reason.removeprefix("TLS error: "))
        if refusal is not None:
            return f"{addr.join(self.host, self.port)} refused the connection: {refusal}"
        if reason == "closed by peer":
            if self._last_notice:
                return f"the server closed the connection: {self._last_notice}"
            return "the server closed the connection"
        return f"connection to the server lost: {reason}"

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the connection has ended; True if it has."""
        return self._ended.wait(timeout)

    def quit(self, wait: float = QUIT_WAIT) -> None:
        """Leave politely: send ``/quit``, give the server ``wait`` seconds to close, then close."""
        self._quitting = True
        if self._conn is not None and not self._ended.is_set() and self._phase == _LIVE:
            self.send("/quit")
            self._ended.wait(wait)
        self.close()

    def close(self, timeout: float = 2.0) -> None:
        """Close the connection (flushing what is queued, TLS close_notify) and wait for its thread."""
        if self._conn is None:
            return
        self._closing.set()
        self._conn.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._conn.abort("closing")
                self._thread.join(1.0)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handshake_error(exc: ssl.SSLError, where: str) -> ChatError:
    """The ChatError for a TLS handshake that failed (not a certificate verification failure)."""
    refusal = explain_alert(exc.reason)
    if refusal is not None:
        return CertificateRefused(f"{where} refused the connection: {refusal}")
    if exc.reason == _HANDSHAKE_FAILURE:
        return ChatError(f"TLS handshake with {where} failed ({exc.reason}): the server may require a client "
                         "certificate (pass --cert and --key), or accept other TLS versions (check --tls-min)")
    if exc.reason in _PLAINTEXT_PEER_REASONS:
        return ChatError(f"{where} did not answer in TLS: the server probably runs without encryption "
                         "(--plain); connect with --plain only if you accept that anyone on the network can read "
                         "the chat")
    if exc.reason in _BAD_CERTIFICATE_REASONS:
        return ChatError(f"{where} presented a certificate that cannot be read ({exc.reason}): it is not a "
                         "securechat server, or its certificate is damaged")
    return ChatError(f"TLS handshake with {where} failed ({exc.reason or exc}): check --tls-min "
                     "(the server may require TLS 1.3, or allow only 1.2)")


def _handshake_timeout(where: str, timeout: float) -> ChatError:
    return ChatError(f"{where} accepted the connection but did not complete the TLS handshake within "
                     f"{timeout:g} s: is it a securechat server?")


def _handshake_lost(where: str, exc: OSError) -> ChatError:
    return ChatError(f"the server at {where} closed the connection during the TLS handshake "
                     f"({describe_error(exc)}): is it a securechat server, with a compatible --tls-min?")


def _explain_verification(exc: ssl.SSLCertVerificationError, name: str) -> str:
    code = exc.verify_code
    if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_ADDRESS_MISMATCH):
        option = "--ip" if _looks_like_ip(name) else "--host"
        return (f"the server's certificate is not valid for {name!r}: connect with the name or address it "
                f"was "
                f"issued for, or re-issue it on the server with 'securechat gen-certs {option} {name}'")
    if code in _X509_UNTRUSTED:
        return ("the server's certificate is not signed by the CA in the --ca file (wrong or old ca.pem): "
                f"{_CA_HELP}")
    if code in (_X509_EXPIRED, _X509_NOT_YET_VALID):
        return (f"the server's certificate {'has expired' if code == _X509_EXPIRED else 'is not valid yet'}: "
                "check both clocks, or re-issue it with 'securechat gen-certs'")
    return f"the server's certificate was refused ({exc.verify_message}): {_CA_HELP}"


def _looks_like_ip(name: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, name)
            return True
        except OSError:
            pass
    return False


# -- display ---------------------------------------------------------------------------------

# Readable on dark and light backgrounds alike; red is left out so nobody looks like an error.
NICK_PALETTE = (
    "ansigreen", "ansiyellow", "ansiblue", "ansimagenta", "ansicyan",
    "ansibrightgreen", "ansibrightyellow", "ansibrightblue", "ansibrightmagenta", "ansibrightcyan",
)  # fmt: skip

NOTICE_STYLE = "italic fg:ansibrightblack"


def nick_style(nick: str) -> str:
    """A colour for ``nick``, the same in every run and on every machine (crc32, not hash())."""
    key = protocol.nick_key(nick).encode("utf-8")
    return "bold fg:" + NICK_PALETTE[zlib.crc32(key) % len(NICK_PALETTE)]


def own_echo(nick: str, text: str) -> str | None:
    """How a line the user sent looks to the others, to show locally (the server doesn't echo)."""
    parsed = protocol.parse(text)
    if isinstance(parsed, str):
        return f"[{nick}] {parsed}" if parsed.strip() else None
    if parsed.name == "me" and parsed.arg:
        return f"[{nick}] * {parsed.arg}"
    if parsed.name == "msg":
        target, _, body = parsed.arg.partition(" ")
        if target and body.strip():
            return f"[{nick} -> {target}] {body}"
    return None


def _is_quit(text: str) -> bool:
    parsed = protocol.parse(text.strip())
    return isinstance(parsed, protocol.Command) and parsed.name == "quit"


# -- command line ----------------------------------------------------------------------------


def _pin_arg(text: str) -> str:
    try:
        return tls.normalise_fingerprint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}; expected the SHA-256 fingerprint on the server's '[SERVER] CA SHA-256 fingerprint' line, "
            "like AA:BB:...:FF (64 hex digits; 'securechat fingerprint certs/ca.pem' on the server shows it)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(prog=PROG, description="Join a securechat server.")
    p.add_argument("host", metavar="HOST[:PORT]",
                   help="the server's IP address or host name, optionally with the port: 192.168.0.20, "
                   "192.168.0.20:5555, [fe80::1%%eth0]:5555; several servers of one chat (serve --redis) "
                   "separated by commas: the first that answers is used, the others when it goes away")
    p.add_argument("--port", type=options.port, default=None, help=f"TCP port (default: {DEFAULT_PORT})")
    p.add_argument("--nick", help="nickname (default: the name in --cert, else asked)")
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
    p.add_argument("--plain", action="store_true",
                   help="connect WITHOUT encryption, to a server started with --plain")
    p.add_argument("--tls-min", choices=sorted(tls.TLS_VERSIONS), default=tls.DEFAULT_TLS_MIN,
                   help="oldest TLS version accepted (default: %(default)s)")
    p.add_argument("--timeout", type=options.duration(), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="time allowed to connect and complete the handshake (default: %(default)g)")
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
    :func:`securechat.addr.split_host_port`); ``port`` (``--port``) is the port of items without one,
    and an item naming another port is refused, as for a single server.
    """
    items = text.split(",")
    if len(items) > MAX_SERVERS:
        raise ValueError(f"at most {MAX_SERVERS} servers")
    servers: list[tuple[str, int]] = []
    for item in items:
        host, item_port = addr.split_host_port(item)
        try:
            host = options.host(host)  # what can be judged without the network (control characters, ...)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        if item_port is not None and port is not None and item_port != port:
            raise ValueError(f"two ports: {item_port} in {addr.join(host, item_port)} and --port {port}; give one")
        servers.append((host, item_port or port or DEFAULT_PORT))
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
        return None, identity.TofuTrust(args.host, args.port, on_first_contact=_first_contact,
                                        tls_min=args.tls_min, prepare=prepare)
    ca = args.ca or DEFAULT_CA
    if not ca.is_file():
        raise ChatError(f"CA file {str(ca)!r} not found: {_CA_HELP}; or recognise the server by its CA "
                        "fingerprint with --pin FINGERPRINT (the server's '[SERVER] CA SHA-256 fingerprint' line) "
                        "or --tofu")
    try:
        context = tls.client_context(ca, tls_min=args.tls_min)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ChatError(f"cannot load the CA file {str(ca)!r} ({describe_error(exc)}): is it ca.pem? "
                        f"{_CA_HELP}") from None
    if args.cert is not None:
        args.cert_name = load_client_certificate(context, args.cert, args.key)
    return context, None


def _joined_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The context for a server joined with an invite (``securechat join``), renewing first if due."""
    from securechat import profiles

    profile = profiles.load(args.host, args.port)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat connect``: 0 after leaving (or after the server shut down), 1 on any failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
        except ChatError as exc:
            _err(str(exc))
            return EXIT_FAILURE
    frontend: _Frontend
    # TERM=dumb (Emacs shell, some IDE consoles): a terminal that cannot move the cursor or colour.
    if sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb":
        from securechat.ui import TerminalUI

        frontend = TerminalUI(args, context, trust)
    else:
        options.guard_stdout(PROG)  # a pipe or file that fails (> /dev/full, | head -1): say so once, keep chatting
        frontend = _LineMode(args, context, trust)
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


class _Frontend:
    """What both front ends share: connecting, and choosing a nickname."""

    def __init__(self, args: argparse.Namespace, context: ssl.SSLContext | None,
                 trust: identity.ServerTrust | None = None) -> None:
        self.args = args
        self.context = context
        self.trust = trust
        self.client = ChatClient()

    def run(self) -> int:
        """Chat until the user leaves or the connection ends; the exit status."""
        raise NotImplementedError

    @property
    def wanted_nick(self) -> str | None:
        """--nick, else the name in --cert (a mutual-TLS server grants that one anyway), else None."""
        return self.args.nick if self.args.nick is not None else self.args.cert_name

    def connect(self) -> None:
        args = self.args
        self.client.connect(args.host, args.port, ssl_context=self.context, timeout=args.timeout,
                            trust=self.trust, alternates=getattr(args, "alternates", ()))
        if self.client.tls:
            self.client.wait_greeting(self.args.timeout)
        elif not self.client.wait_greeting(min(PLAIN_GREETING_WAIT, self.args.timeout)):
            # Before the nickname goes out in clear: a TLS server waits for a ClientHello, silently.
            where = addr.join(args.host, args.port)
            raise TLSRequired(f"{where} sent no greeting within {min(PLAIN_GREETING_WAIT, args.timeout):g} s: "
                              "it probably requires TLS; drop --plain and pass --ca with the server's ca.pem "
                              "(or --pin/--tofu); nothing was sent")

    def leave(self) -> int:
        """Say /quit, let the server answer, and report how it ended.

        Raises Disconnected when the server had already ended the connection for its own reasons
        (shutdown, kicked), so that is reported rather than passed off as a normal exit.
        """
        if self.client.reconnecting:  # leaving while the network is down: nothing to say goodbye to
            self.client.close()
            return EXIT_OK
        if self.client.closed:
            self.client._raise_ended()
        self.client.quit()
        if self.client.end_reason == "closed by peer" and self.client.last_notice != "goodbye":
            self.client._raise_ended()
        return EXIT_OK


class _LineMode(_Frontend):
    """stdin is a pipe or a file: send each line, print each received line, leave at EOF."""

    def __init__(self, args: argparse.Namespace, context: ssl.SSLContext | None,
                 trust: identity.ServerTrust | None = None) -> None:
        super().__init__(args, context, trust)
        self.stdin: queue.Queue[str | None] = queue.Queue(MAX_STDIN_LINES)
        self.out_lock = threading.Lock()

    def _read_stdin(self) -> None:
        # A thread, not poll() on fd 0: the seed's menu reads with input(), and sys.stdin may already
        # hold later lines in its buffer, which only sys.stdin itself can hand over.
        try:
            for line in sys.stdin:
                self.stdin.put(line.rstrip("\r\n"))
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        self.stdin.put(None)

    def _print(self, line: str) -> None:
        with self.out_lock:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # stdout closed (a pipe whose reader left): keep chatting silently

    def _next_input(self) -> str | None:
        """The next stdin line; None at EOF; raises Disconnected if the connection ends first."""
        while True:
            try:
                return self.stdin.get(timeout=0.1)
            except queue.Empty:
                if self.client.closed:
                    self.client._raise_ended()

    def run(self) -> int:
        self.connect()
        threading.Thread(target=self._read_stdin, name="securechat-stdin", daemon=True).start()
        nick = self.wanted_nick
        if nick is None:
            sys.stdout.write("Enter your nickname: ")
            sys.stdout.flush()
            nick = self._next_input()
            if nick is None:
                self.client.close()
                return EXIT_OK
            nick = nick.strip()
        # Scripts fail loudly on a refused nick rather than feed their next lines in as nicknames.
        self.client.register(nick, timeout=self.args.timeout)
        self.client.set_on_line(self._print)
        while True:
            text = self._next_input()
            if text is None or _is_quit(text):
                return self.leave()
            if not self.client.send(text):
                self.client.wait_closed(1.0)
                self.client._raise_ended()
