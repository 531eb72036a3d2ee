"""Browser devices: the credential a browser holds instead of a client certificate (``invite NAME --web``).

Browsers cannot do a client-certificate handshake well (each asks the user in its own way, phones
hardly at all), so on a server that knows people by name a browser proves who it is with a secret
instead:

1. ``securechat invite alice --web`` stores a one-time invite (a random 128-bit token, kept only
   as its SHA-256) bound to the name ``alice``, and prints the link ``https://HOST:PORT/#invite=TOKEN``.
   The token travels in the URL's fragment, which a browser never sends over the network.
2. The page makes a device secret of its own (256 random bits), keeps it in the browser's
   ``localStorage`` and presents it, with the token, in the WebSocket's first message. :func:`claim`
   uses the invite (once, atomically) and records the device: a row in the CA's certificate registry
   (a serial of its own, the name, an expiry), so ``securechat certs`` lists it, ``securechat revoke
   alice`` ends it (live tabs within 2 s, by the same denylist as certificates) and nobody else may
   take the name; plus the SHA-256 of its secret here.
3. Every later connection presents the secret alone (:func:`check`). Like a client certificate that
   is renewed in use, a device lives ``days`` from its last use: a browser nobody opens for a month
   stops working by itself.

The secret is never stored, only its hash: a copy of ``invites.db`` lets nobody in. 256 random bits
need no slow hash (there is nothing to guess), and the lookup is by that hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass

from securechat.pki import names
from securechat.pki.ledger import DEFAULT_CERT_DAYS, KEEP_FINISHED, Store, StoreError, bump, serial_hex

# The invite token in the link: 128 random bits (base64url, 22 characters), as unguessable as a
# resume token; it is only a key to a row that lives minutes and works once.
INVITE_BYTES = 16

# What a device secret looks like: base64url of 32 random bytes (the page makes 43 characters);
# bounded so a hostile first message cannot make the server hash megabytes.
SECRET_RE = re.compile(r"[A-Za-z0-9_-]{32,86}\Z")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,86}\Z")

# A device's serial in the registry: 64 random bits, so it never collides with a certificate's
# (159-bit serials from x509.random_serial_number) and reads as shorter in `securechat certs`.
SERIAL_BITS = 64


class DeviceError(Exception):
    """Why a browser is not let in: one line, told to the browser and logged."""


@dataclass(frozen=True)
class WebInvite:
    """A ``--web`` invite as stored (its token is shown once, at creation)."""

    id: int
    name: str
    created: float
    expires: float
    state: str  # active, used, cancelled
    token: str = ""  # only when just created


@dataclass(frozen=True)
class Device:
    """A browser bound to a name."""

    serial: int
    name: str


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("ascii")).digest()


def create_invite(store: Store, name: str, *, expires_in: float, days: int = DEFAULT_CERT_DAYS) -> WebInvite:
    """A new one-time ``--web`` invite for ``name``; its ``token`` goes in the link.

    The name is held as invited, under the ledger's name rule (``Refused``, nothing made, otherwise).
    """
    now = store.clock()
    token = secrets.token_urlsafe(INVITE_BYTES)
    with store.transaction() as db:
        store.hold_name(db, name, names.INVITED, now + expires_in)
        db.execute("DELETE FROM web_invites WHERE expires < ?", (now - KEEP_FINISHED,))
        cursor = db.execute("INSERT INTO web_invites (token_hash, name, created, expires, days) VALUES (?, ?, ?, ?, ?)",
                            (_digest(token), name, now, now + expires_in, days))
        invite_id = int(cursor.lastrowid or 0)
    return WebInvite(invite_id, name, now, now + expires_in, "active", token)


def invites(store: Store) -> list[WebInvite]:
    """The ``--web`` invites still usable, oldest first."""
    now = store.clock()
    with store.transaction(write=False) as db:
        rows = db.execute("SELECT id, name, created, expires, state FROM web_invites WHERE state = 'active' AND "
                          "expires > ? ORDER BY created", (now,)).fetchall()
    return [WebInvite(*row) for row in rows]


def cancel(store: Store, which: str) -> list[WebInvite]:
    """Cancel the usable ``--web`` invites for the name ``which`` (or numbered ``w<id>``); return them."""
    now = store.clock()
    key = which.strip()
    number = int(key[1:]) if re.fullmatch(r"[wW][0-9]{1,9}", key) else -1
    with store.transaction() as db:
        rows = db.execute("SELECT id, name, created, expires, state FROM web_invites WHERE state = 'active' AND "
                          "expires > ? AND (name = ? OR id = ?)", (now, key, number)).fetchall()
        for row in rows:
            db.execute("UPDATE web_invites SET state = 'cancelled' WHERE id = ?", (row[0],))
        for name in {row[1] for row in rows}:  # the invitation ends unless another live link backs it
            if not any(names.key(other) == names.key(name) for (other,) in db.execute(
                    "SELECT name FROM web_invites WHERE state = 'active' AND expires > ?", (now,))):
                store.unhold_invited(db, name, now)
    return [WebInvite(*row) for row in rows]


def claim(store: Store, token: str, secret: str) -> Device:
    """Use the invite ``token`` to bind the browser holding ``secret`` to the invite's name.

    One transaction: two browsers racing with one link get one device between them. Raises
    :class:`DeviceError` saying why not (unknown, used, cancelled, expired, malformed).
    """
    if not TOKEN_RE.match(token) or not SECRET_RE.match(secret):
        raise DeviceError("this link is damaged: open it again as it was given")
    now = store.clock()
    serial = secrets.randbits(SERIAL_BITS) | 1 << (SERIAL_BITS - 1)
    with store.transaction() as db:
        row = db.execute("SELECT id, name, expires, state, days FROM web_invites WHERE token_hash = ?",
                         (_digest(token),)).fetchone()
        if row is None:
            raise DeviceError("this link is not known to the server: ask for a new one")
        invite_id, name, expires, state, days = row
        if state == "used":
            raise DeviceError("this link has already been used: ask for a new one")
        if state == "cancelled":
            raise DeviceError("this link was cancelled: ask for a new one")
        if expires <= now:
            raise DeviceError("this link has expired: ask for a new one")
        try:  # the name rule: revoked (or given to another spelling) since the link was made
            store.hold_name(db, name, names.ISSUED)
        except StoreError as exc:
            raise DeviceError(f"this link can no longer be used: {exc}") from None
        db.execute("UPDATE web_invites SET state = 'used' WHERE id = ?", (invite_id,))
        try:
            db.execute("INSERT INTO web_devices (serial, secret_hash, invite) VALUES (?, ?, ?)",
                       (serial_hex(serial), _digest(secret), invite_id))
        except sqlite3.IntegrityError:  # the same secret twice: only a broken (or hostile) page does that
            raise DeviceError("this browser is already registered: open the chat without the link") from None
        db.execute("INSERT INTO issued (serial, name, name_key, not_before, not_after, issued, last_seen, cert_days) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (serial_hex(serial), name, names.key(name), now, now + days * 86400.0, now, now, days))
        bump(db)
    return Device(serial, name)


def check(store: Store, secret: str) -> Device:
    """The device holding ``secret``, its use recorded (and its life extended); :class:`DeviceError` if none."""
    if not SECRET_RE.match(secret):
        raise DeviceError("this browser's credential is damaged: ask for a new link")
    now = store.clock()
    with store.transaction() as db:
        row = db.execute("SELECT i.serial, i.name, i.not_after, i.revoked, i.cert_days FROM web_devices d "
                         "JOIN issued i ON i.serial = d.serial WHERE d.secret_hash = ?", (_digest(secret),)).fetchone()
        if row is None:
            raise DeviceError("this browser is not registered with the server: ask for a new link")
        serial, name, not_after, revoked, days = row
        held = store.held(db, names.key(name))
        if revoked is not None or held is not None and held.state == names.REVOKED:
            raise DeviceError("this browser's access has been revoked: ask the server's admin for a new link")
        if not_after <= now:
            raise DeviceError("this browser was not used for too long and its access expired: ask for a new link")
        db.execute("UPDATE issued SET last_seen = ?, not_after = ? WHERE serial = ?",
                   (now, max(not_after, now + (days or DEFAULT_CERT_DAYS) * 86400.0), serial))
    return Device(int(serial, 16), name)


def device_serials(store: Store) -> frozenset[str]:
    """The registry serials that are browsers (for ``securechat certs``)."""
    with store.transaction(write=False) as db:
        return frozenset(row[0] for row in db.execute("SELECT serial FROM web_devices"))
