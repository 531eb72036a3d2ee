"""Names and ids both ends compare: a line's id (``<ms>-<seq>``, Redis Stream form) and a room's key.
"""

from __future__ import annotations

import re

from securechat.wire.protocol import nick_key

# ASCII digits only (str.isdigit admits other scripts' digits); 15 digits is beyond any real clock.
_ID_RE = re.compile(r"([0-9]{1,15})-([0-9]{1,15})\Z")


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of an entry id: ``"1700000000000-3"`` -> ``(1700000000000, 3)``.

    Raises ValueError for anything that is not an id, so an id from a client can be validated
    with it.
    """
    match = _ID_RE.match(entry_id)
    if match is None:
        raise ValueError(f"not an entry id: {entry_id[:40]!r}")
    return int(match[1]), int(match[2])


def room_key(name: str) -> str:
    """The form in which two room names are compared: ``#`` dropped, case and look-alikes folded.

    The same folding as nicknames (:func:`securechat.wire.protocol.nick_key`), so ``#Dev``, ``dev`` and
    ``DEV`` are one room and ``#AIl``-style look-alikes cannot pose as another.
    """
    return nick_key(name[1:] if name.startswith("#") else name)
