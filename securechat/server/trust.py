"""What the CA decided, enforced by this server: which client certificates get in, which names guests may not take.

The decisions are the CA's ledger (:mod:`securechat.pki.ledger`): revoked certificates (by serial, and
by name), certificates replaced by their renewal, and the names given out (invited, issued, revoked).
A server reads them from one of two places:

- the ledger itself, an SQLite file beside ``ca.key``, on the server that holds the CA; with
  ``--redis`` that server also *publishes* it to the cluster (:mod:`securechat.store.redis_ledger`)
  whenever it changes (and whenever the cluster's copy is missing or another generation);
- the cluster's copy in Redis, on every other server of a ``--redis`` cluster (those without
  ``ca.key``, as the README's multi-server recipe sets them up).

Either way the server re-reads it (one cheap query for the generation) at every connection that
presents a certificate, and every :data:`~securechat.pki.ledger.REVOCATION_POLL` seconds for the live
sessions (:mod:`securechat.server.revocation`). When the ledger cannot be read, the last copy read stays
in force; when none was ever read, certificate holders are refused (fail closed, as OpenSSH refuses
every key when its ``RevokedKeys`` file cannot be read) and guests are let in.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from securechat.pki import names
from securechat.pki.ledger import REVOCATION_POLL, Store, StoreError, serial_hex
from securechat.pki.names import Held
from securechat.store.redis_ledger import PublishedLedger, RedisLedger
from securechat.wire import protocol

log = logging.getLogger("securechat.enroll")

# How often a publishing server tells the ledger the cluster's copy is current (``securechat revoke``
# warns when that is older than pki.revoke.PUBLISHER_GONE): rarely enough to cost nothing.
NOTE_EVERY = 4.0
# The publisher's lease in Redis, renewed every poll: ten polls, so a busy moment never loses it, and
# a publisher that is gone frees it within seconds.
PUBLISHER_LEASE = 10 * REVOCATION_POLL
# After failed publications, the next try waits this long (a Redis that does not answer costs a
# timeout each try, and the watcher's polls must go on meanwhile). The first failure is retried at the
# next poll: it is usually a connection Redis closed on restarting, and the retry reconnects.
PUBLISH_RETRY = 2.0

UNCHECKABLE = "the server cannot check certificates right now; try again later"


@dataclass(frozen=True)
class Snapshot:
    """One generation of the ledger, as this server enforces it."""

    generation: int
    revoked: frozenset[str]  # serials (hex)
    superseded: frozenset[str]  # serials replaced by their renewal
    held: dict[str, Held]  # names.key(name) -> how it is held


class Source(Protocol):
    """Where a server reads the ledger."""

    where: str

    def version(self) -> int | None: ...

    def snapshot(self) -> Snapshot | None: ...

    def seen(self, cert: x509.Certificate, name: str) -> None: ...


class LocalSource:
    """The ledger itself (the SQLite file beside ``ca.key``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.where = str(store.path.resolve())

    def version(self) -> int | None:
        return self.store.generation()

    def snapshot(self) -> Snapshot | None:
        state = self.store.snapshot()
        return Snapshot(state.generation, state.revoked, state.superseded, state.held)

    def seen(self, cert: x509.Certificate, name: str) -> None:
        self.store.seen(cert, name)


class ClusterSource:
    """The cluster's copy in Redis, published by the server holding ``ca.key``."""

    def __init__(self, ledger: RedisLedger) -> None:
        self.ledger = ledger
        self.where = f"the Redis copy at {ledger.where}"

    def version(self) -> int | None:
        return self.ledger.version()

    def snapshot(self) -> Snapshot | None:
        published = self.ledger.read()
        if published is None:
            return None
        return Snapshot(published.generation, published.revoked, published.superseded,
                        {key: Held(*value) for key, value in published.held.items()})

    def seen(self, cert: x509.Certificate, name: str) -> None:
        return None  # "last seen" is kept where the ledger is written


class Watched(Protocol):
    """What the revocation watcher asks about a session."""

    cert_serial: int | None
    bound_nick: str | None
    nick: str


class Trust:
    """The ledger's decisions, enforced here (see the module docstring).

    ``publish``: the cluster's copy this server keeps current (only the server holding ``ca.key``).
    ``require_client_cert``: a connection without a certificate is refused (mutual TLS).
    """

    def __init__(self, source: Source, *, require_client_cert: bool = False, publish: RedisLedger | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.require_client_cert = require_client_cert
        self.publish = publish
        self.clock = clock
        self._lock = threading.Lock()  # one refresh at a time (the watcher, and logins)
        self._snapshot: Snapshot | None = None
        self._failing = False  # the source failed last time: logins do not wait for it, the watcher retries
        self._noted = 0.0
        self._empty_told = False
        self._unpublished = False  # publishing failed last time (told once)
        self._publish_after = 0.0  # monotonic time before which publishing is not tried again
        self._me = f"{socket.gethostname()} {source.where}"  # who publishes, for the lease
        self._rival: str | None = None  # another publisher holding the lease (told once)
        # What a failing source raises: redis-py is only imported when Redis is used.
        self._errors: tuple[type[BaseException], ...] = (StoreError,)
        if publish is not None or isinstance(source, ClusterSource):
            self._errors += RedisLedger.errors()
        self.refresh()

    # -- reading (and publishing) -------------------------------------------------------------

    def refresh(self, *, publish: bool = True) -> None:
        """Re-read the ledger if it changed; and (``publish``: the watcher's call, never a login's, so one
        thread publishes) keep the cluster's copy current if this server publishes it."""
        with self._lock:
            try:
                version = self.source.version()
                current = self._snapshot
                if version is not None and (current is None or current.generation != version):
                    current = self.source.snapshot() or current
                    self._snapshot = current
            except self._errors as exc:
                if not self._failing:
                    log.error("cannot read the CA's ledger (%s): %s; %s", self.source.where, _describe(exc),
                              "the last copy read stays in force" if self._snapshot is not None else
                              "certificate holders are refused until it can be read")
                self._failing = True
                return
            if self._failing:
                log.warning("the CA's ledger (%s) can be read again", self.source.where)
            self._failing = False
            if version is None and current is None and not self._empty_told:
                self._empty_told = True
                log.warning("no ledger in %s yet: certificate holders are refused until the server holding ca.key "
                            "publishes it (it does at start with --redis)", self.source.where)
        # Outside the lock: logins never wait for Redis on the publisher's behalf.
        if publish and self.publish is not None and current is not None and time.monotonic() >= self._publish_after:
            self._publish(current)

    def _publish(self, current: Snapshot) -> None:
        """Keep the cluster's copy at ``current`` (a failure is logged once; this server's own
        enforcement, from the ledger itself, goes on meanwhile)."""
        assert self.publish is not None
        try:
            other = self.publish.claim(self._me, PUBLISHER_LEASE)
            if other is not None:
                if other != self._rival:
                    log.error("another server publishes its CA ledger to %s (%s): two machines hold a ca.key; keep the "
                              "CA on one machine (README: 'Certificates from one CA'). This one does not publish "
                              "while that one does", self.publish.where, other)
                self._rival = other
                return
            self._rival = None
            if self.publish.version() != current.generation:
                self.publish.publish(PublishedLedger(
                    current.generation, current.revoked, current.superseded,
                    {key: (held.name, held.state, held.until) for key, held in current.held.items()}))
                log.info("published the CA's ledger (generation %d) to %s", current.generation, self.publish.where)
                self._noted = 0.0
            if isinstance(self.source, LocalSource) and self.clock() - self._noted > NOTE_EVERY:
                self.source.store.note_published(self.publish.where)
                self._noted = self.clock()
        except self._errors as exc:
            if not self._unpublished:
                log.error("cannot publish the CA's ledger to %s: %s; the other servers keep the copy they have until "
                          "it can", self.publish.where, _describe(exc))
            if self._unpublished:  # failing again: the watcher's polls are not held up by it
                self._publish_after = time.monotonic() + PUBLISH_RETRY
            self._unpublished = True
            return
        if self._unpublished:
            log.warning("the CA's ledger is published to %s again", self.publish.where)
        self._unpublished = False

    def _fresh(self) -> Snapshot | None:
        """The snapshot, re-read first unless the source is known to be failing (logins must not wait)."""
        if not self._failing:
            self.refresh(publish=False)
        return self._snapshot

    def close(self) -> None:
        """Close the connections to the cluster's copy, if any."""
        for ledger in (self.publish, getattr(self.source, "ledger", None)):
            if isinstance(ledger, RedisLedger):
                ledger.close()

    # -- decisions ----------------------------------------------------------------------------

    def admit(self, sock: socket.socket | ssl.SSLSocket) -> tuple[str | None, int | None]:
        """(refusal notice or None, client certificate serial or None) for a chat connection.

        Runs in the connection's own thread, after the handshake and before the greeting; the ledger
        is re-read here, so a revocation holds from the very next connection, whatever the poll.
        """
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if not der:
            if self.require_client_cert:
                return (f"{protocol.CERT_REQUIRED}: join with an invite ('securechat join HOST CODE') or "
                        "pass --cert and --key"), None
            return None, None
        cert = x509.load_der_x509_certificate(der)
        serial = cert.serial_number
        snapshot = self._fresh()
        if snapshot is None:  # fail closed: a certificate we cannot check is not let in
            return UNCHECKABLE, serial
        if _revoked(snapshot, serial_hex(serial), _common_name(cert)):
            return f"{protocol.CERT_REVOKED}: ask the server's admin for a new invite", serial
        if serial_hex(serial) in snapshot.superseded:
            return f"{protocol.CERT_REVOKED} (it was replaced by its renewal: connect with the renewed one)", serial
        try:
            self.source.seen(cert, _common_name(cert) or "")
        except StoreError as exc:
            log.error("cannot note that certificate %s was seen: %s", serial_hex(serial), exc)
        return None, serial

    def reserved(self, nick: str) -> str | None:
        """Why a guest (no certificate) may not take ``nick``, or None: every name the CA gave out,
        invited, issued or revoked, in any spelling that folds to it (read afresh, like :meth:`admit`)."""
        snapshot = self._fresh()
        if snapshot is not None and _holds(snapshot, nick, self.clock()):
            return f"{nick!r} belongs to a certificate holder"
        return None

    def person(self, nick: str) -> str | None:
        """The name of the person (certificate holder) ``nick`` means, spelled as issued; None if nobody.

        Without a ledger read yet, ``nick`` itself (nobody can be told apart then).
        """
        snapshot = self._fresh()
        if snapshot is None:
            return nick
        held = snapshot.held.get(names.key(nick))
        if held is None or held.state == names.REVOKED or not held.alive(self.clock()):
            return None
        return held.name

    def refusal(self, session: Watched) -> str | None:
        """Why a live session must end now (its certificate or name was revoked; a guest's nick was
        given to a certificate holder), or None."""
        snapshot = self._snapshot
        if snapshot is None:
            return None
        if session.cert_serial is not None:
            revoked = _revoked(snapshot, serial_hex(session.cert_serial), session.bound_nick)
            return protocol.CERT_REVOKED if revoked else None
        if session.nick and _holds(snapshot, session.nick, self.clock()):
            return f"{session.nick!r} now belongs to a certificate holder; reconnect under another nickname"
        return None


def _revoked(snapshot: Snapshot, serial: str, name: str | None) -> bool:
    """Whether the certificate ``serial`` named ``name`` is revoked, itself or by its name."""
    held = snapshot.held.get(names.key(name)) if name else None
    return serial in snapshot.revoked or held is not None and held.state == names.REVOKED


def _holds(snapshot: Snapshot, nick: str, now: float) -> bool:
    held = snapshot.held.get(names.key(nick))
    return held is not None and held.alive(now)


def _common_name(cert: x509.Certificate) -> str | None:
    found = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else None


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, StoreError) else RedisLedger.describe(exc)


def request_client_certificates(ctx: ssl.SSLContext, ca_file: str | Path) -> ssl.SSLContext:
    """Make a server context ask (not require) for client certificates from the CA in ``ca_file``.

    For a cluster server without ``ca.key``: certificate holders are then recognised here too (their
    nickname bound, their revocation enforced); clients without one chat as guests, as before.
    A context that already requires them (``--require-client-cert``) is left as it is.
    """
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
