"""The chat client: ``securechat connect HOST`` and the :class:`ChatClient` library behind it.

Like the server, the client gives its socket exactly one owner: the TLS handshake runs in the
calling thread, then a background thread drives a :class:`~securechat.wire.conn.Connection` and alone
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
over before a single byte is sent (see :mod:`securechat.client.identity`).
"""

from __future__ import annotations

import errno
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from securechat.client import identity
from securechat.client.errors import (
    MINT_HELP,
    BoundNickUnusable,
    CertificateRefused,
    ChatError,
    Disconnected,
    IdentityRefused,
    NickRefused,
    ServerFull,
    TLSRequired,
    ended_in_words,
    explain_alert,
    explain_verification,
    handshake_error,
    handshake_lost,
    handshake_timed_out,
)
from securechat.client.files import TicketDesk
from securechat.wire import addr, protocol, tls
from securechat.wire.addr import DEFAULT_PORT
from securechat.wire.conn import Connection, describe_error, tune_socket
from securechat.wire.resume import ResumeState, backoff

DEFAULT_CA = Path("certs") / "ca.pem"

# Connecting and the TLS handshake: a LAN answers in milliseconds, so 10 s means nobody is there.
DEFAULT_TIMEOUT = 10.0

# A securechat server greets at once; a TLS server reached by a --plain client says nothing (it waits
# for a ClientHello), and neither does a TLS service that is not securechat. Silence this long is the
# tell, well before the 10 s of DEFAULT_TIMEOUT and long enough for a loaded LAN server to get to us.
GREETING_WAIT = 2.0
# How much of what a service that is not securechat said is shown.
SHOWN_CHARS = 60

# After /quit, how long to wait for the server's "* goodbye" and close before closing ourselves.
QUIT_WAIT = 2.0

# What a server may make the client hold (issue 10: a hostile server drove one to 500 MiB).
# Before it accepts a nickname a securechat server sends its greeting and one answer per nickname
# tried: 64 lines is far beyond that, so more means a hostile or confused server.
MAX_LINES_BEFORE_WELCOME = 64
# Received lines left unread by a recv_line() caller: at most 4096 * MAX_LINE_BYTES = 16 MiB.
MAX_QUEUED_LINES = 4096
# How long a full queue after the welcome waits for register() (woken already) to hand it to on_line:
# far more than a loaded machine takes to schedule a thread; the server waits on TCP meanwhile.
HANDOVER_WAIT = 10.0
# Lines typed or piped ahead of the connection in line mode; reading stdin waits beyond that.
MAX_STDIN_LINES = 1024


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
        # Resuming after a dropped connection (securechat.wire.resume): asked for after the welcome.
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
        self._handed_over = threading.Event()  # register() has the nick: lines go to on_line from now on
        self.tickets = TicketDesk()  # answers to /ticket (file transfers), consumed, not shown
        self.server_hostname: str | None = None
        self.context_factory: Callable[[], ssl.SSLContext] | None = None  # a fresh context like the chat's
        self._anchor: bytes | None = None  # the certificate --pin/--tofu chose to trust

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
        context_factory: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        """Open the TCP connection and, unless ``ssl_context`` and ``trust`` are None, complete the TLS handshake.

        ``alternates``: other servers of the same chat (``serve --redis``), ``(host, port)`` each,
        tried in order when ``host`` does not answer, now and when reconnecting.

        ``server_hostname`` is the name or address the certificate must be valid for (default:
        ``host``). ``trust`` (``--pin``/``--tofu``, instead of ``ssl_context``) first fetches the
        server's chain over a probe connection that sends nothing, picks the certificate to trust,
        then connects with a verifying context trusting only that one (see :mod:`securechat.client.identity`).
        Raises :class:`ChatError` with an explanation on any failure (:class:`IdentityRefused` when the
        server is not the one ``trust`` expects; nothing was sent to it then). ``context_factory``
        makes a context like ``ssl_context`` for file transfers (:meth:`file_context`).
        """
        if self._conn is not None:
            raise RuntimeError("already connected")
        if trust is not None and ssl_context is not None:
            raise ValueError("pass ssl_context or trust, not both")
        self.host, self.port, self.tls = host, port, ssl_context is not None or trust is not None
        self.servers = [(host, port), *alternates]
        self.server_hostname, self.context_factory = server_hostname, context_factory
        # Kept to connect again after a dropped connection (securechat.wire.resume).
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
                raise handshake_error(exc, where) from None
            except TimeoutError:
                raise handshake_timed_out(where, timeout) from None
            except OSError as exc:
                raise handshake_lost(where, exc) from None
            except identity.IdentityError as exc:
                raise IdentityRefused(f"refusing {where}: {exc}") from None
            try:
                self._anchor = trust.choose(chain)
                ssl_context = trust.context(self._anchor)
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
                raise ChatError(explain_verification(exc, name)) from None
            except ssl.SSLError as exc:
                raw.close()
                raise handshake_error(exc, where) from None
            except TimeoutError:
                raw.close()
                raise handshake_timed_out(where, timeout) from None
            except OSError as exc:
                raw.close()
                raise handshake_lost(where, exc) from None
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

    def file_context(self) -> ssl.SSLContext:
        """A fresh context that recognises the server as the chat connection did (for a file connection,
        which offers another ALPN protocol)."""
        trust = self._connect_args.get("trust")
        if isinstance(trust, identity.ServerTrust) and self._anchor is not None:
            return trust.context(self._anchor)
        if self.context_factory is None:
            raise ChatError("file transfers need TLS and a context_factory")
        return self.context_factory()

    def open_socket(self, timeout: float) -> socket.socket:
        """A new TCP connection to the current server (for a file connection); ChatError on failure."""
        return self._open(self.host, self.port, timeout)

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

    # -- resuming after a dropped connection (the logic is in securechat.wire.resume) --------------

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
                # The server was given our place in each room (/resume): it shows what we missed, and says
                # itself what it cannot give back.
                return (f"* reconnected, but the server had forgotten this session (it restarted, or the connection "
                        f"was down longer than it waits): back in your rooms as {protocol.welcome_nick(line)}; what "
                        "you missed follows")
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
            if self._capabilities(line) or self.tickets.consume(line):
                continue
            if protocol.is_notice(line):
                self._last_notice = line[len(protocol.NOTICE_PREFIX):]
                if self._last_notice.startswith(protocol.SHUTDOWN):
                    self._saw_shutdown = True
            if self.on_line is not None and self.nick is None and self._welcomed \
                    and self._lines.qsize() >= MAX_QUEUED_LINES:
                # A busy room right after the welcome: register() is about to hand the queue to on_line,
                # so wait for it (outside the lock the handover takes) rather than hang up.
                self._handed_over.wait(HANDOVER_WAIT)
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
                self._handed_over.set()
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
                        f"{MINT_HELP})")
                raise BoundNickUnusable(f"nickname refused: {reason}: ask for a certificate with a usable "
                                        f"name ({MINT_HELP})")
            raise NickRefused(reason.removesuffix("; send another"))
        if line.startswith(notice + protocol.SERVER_FULL):
            raise ServerFull(f"{line[len(notice):]}")
        if line.startswith((notice + protocol.CERT_REQUIRED, notice + protocol.CERT_REVOKED)):
            raise CertificateRefused(f"{self.host}:{self.port} refused the connection: {line[len(notice):]}")
        if line.startswith(notice + protocol.TLS_REQUIRED):
            raise TLSRequired(f"{line[len(notice):]} (drop --plain and pass --ca with the server's ca.pem)")

    def wait_greeting(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the server's first line; raise if it is a refusal, or not securechat's.

        A TLS or plain securechat server greets at once (or says it is full); a TLS server reached by
        a plain client says nothing until the client speaks. Returns False on silence, for the caller
        to judge. Call it before sending anything: a service that is not securechat gets nothing.
        """
        line = self.recv_line(timeout)
        if line is None:
            if self.closed:
                self._raise_ended()
            return False
        self._check_refusal(line)
        if not protocol.is_opening(line):
            self.close(timeout=0.5)
            said = line if len(line) <= SHOWN_CHARS else line[:SHOWN_CHARS] + "..."
            raise ChatError(f"{addr.join(self.host, self.port)} is not a securechat server: it said {said!r} instead "
                            "of securechat's greeting; nothing was sent to it")
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
        """True while a dropped connection is being re-established (see :mod:`securechat.wire.resume`)."""
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
        return ended_in_words(self._end_reason, addr.join(self.host, self.port), shut_down=self._saw_shutdown,
                              overflow=self._overflow, last_notice=self._last_notice)

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
