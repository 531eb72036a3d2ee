"""The one rule for the names the CA gives out, shared by ``invite``, ``gen-certs --client`` and the server.

A client certificate's name is its holder's nickname, and under mutual TLS it is also a person: stored
private messages and read positions are keyed by it, folded (:func:`protocol.nick_key`: case and
look-alike letters). So a name may be given out only if:

- the server would accept it as a nickname (not ``server``, ``admin``, ...: :func:`protocol.nick_error`);
- no *other* spelling of it was ever invited, issued or revoked (``AIice`` beside ``alice`` would read
  alice's messages and lock her out); the same spelling again is the same person (a second machine);
- it is not the name of revoked certificates: that stays reserved until the admin releases it
  (``securechat revoke --release NAME``), so nobody picks up a revoked person's name, inbox included.

The server applies the same table to guests (people without a certificate): no guest may take a name
that is in it, in any state (:data:`STATES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from securechat.wire import protocol

# What the ledger knows of a name; every state keeps it from guests and from other spellings.
INVITED = "invited"  # a live invite names it (until the invite ends)
ISSUED = "issued"  # a certificate was issued with it
REVOKED = "revoked"  # its certificates were revoked by name: reserved until released
STATES = (INVITED, ISSUED, REVOKED)


@dataclass(frozen=True)
class Held:
    """A name as the ledger holds it."""

    name: str  # the spelling given out
    state: str  # one of STATES
    until: float | None = None  # INVITED: when the last invite for it ends

    def alive(self, now: float) -> bool:
        """Whether it still holds its name (an invitation ends with its invite)."""
        return self.state != INVITED or self.until is None or self.until > now


def key(name: str) -> str:
    """The form under which names are compared (the server's nickname folding)."""
    return protocol.nick_key(name)


def refusal(name: str, held: Held | None) -> str | None:
    """Why ``name`` may not be given out, ``held`` being what the ledger has under its key; or None."""
    why = protocol.nick_error(name)
    if why is not None:
        return f"invalid client name {name!r}: {why}"
    if held is None:
        return None
    if held.state == REVOKED:
        return (f"the certificates of {held.name!r} were revoked and the name stays reserved: run 'securechat "
                f"revoke --release {held.name}' first to give it out again")
    if held.name != name:
        what = "invited" if held.state == INVITED else "issued"
        return (f"client name {name!r} is the same nickname to the server as {held.name!r}, already {what} "
                "(case and look-alike letters are folded): pick another name")
    return None
