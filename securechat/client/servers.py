"""``securechat servers``, and how servers found on the LAN are shown, recognised and chosen.

A found server is *recognised* when the CA fingerprint it announces is one this machine can verify:
a profile saved by ``securechat join``, a ``--pin``, a ``--ca`` file (``certs/ca.pem`` by default),
or a known_hosts entry under ``--tofu``. Recognition only picks *which* server to try; the connection
then verifies it exactly as if its address had been typed, so a spoofed announcement fails there.
A server announcing another CA than the one this machine knows its address by is flagged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from securechat.client import discover, enroll, identity, profiles
from securechat.client.discover import DiscoveryError, Found
from securechat.client.errors import ChatError
from securechat.pki.codes import parse_code
from securechat.pki.enrollment import JoinError
from securechat.wire import addr, dnssd, options, protocol, tls

PROG = "securechat servers"

# A search longer than this is a typo: servers answer within a second.
MAX_BROWSE_SECONDS = 60.0
# Servers asked at once whether they hold an invite ('join CODE' without an address): one TLS
# handshake each, so a handful; beyond it a LAN is being flooded with announcements.
MAX_PROBES = 16

# Shown under every list of found servers: where the fingerprint is to be checked.
HINT = ("a fingerprint listed here is only what the server announced: compare it with the server's "
        f"'{identity.SERVER_CA_LINE}' line before trusting it (--pin)")


@dataclass
class Known:
    """The CA fingerprints this machine knows: how it knows each, and by which address."""

    how: dict[str, str] = field(default_factory=dict)  # fingerprint -> "joined 10.0.0.5:5555", "--pin", ...
    at: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)  # (host, port) -> (fp, how)
    joined: dict[str, profiles.Profile] = field(default_factory=dict)  # fingerprint -> the profile

    def add(self, fingerprint: str, how: str, where: tuple[str, int] | None = None) -> None:
        self.how.setdefault(fingerprint, how)
        if where is not None:
            self.at.setdefault(where, (fingerprint, how))


def known_here(*, joined: bool = True, remembered: bool = True, pin: str | None = None,
               ca: Path | None = None) -> Known:
    """What this machine knows: profiles (``joined``), known_hosts (``remembered``), a pin, a CA file."""
    known = Known()
    if joined:
        for profile in profiles.every():
            try:
                fingerprint = tls.file_fingerprint(profile.ca)
            except (OSError, ValueError):
                continue
            known.add(fingerprint, f"joined {addr.join(profile.host, profile.port)}", (profile.host, profile.port))
            known.joined.setdefault(fingerprint, profile)
    if remembered:
        try:
            entries = identity.KnownHosts().load()
        except OSError:
            entries = {}
        for key, fingerprint in entries.items():
            try:
                host, port = addr.split_host_port(key)
            except addr.AddressError:
                continue
            known.add(fingerprint, "known_hosts", (host, port) if port is not None else None)
    if pin is not None:
        known.add(tls.normalise_fingerprint(pin), "--pin")
    if ca is not None:
        try:
            for fingerprint in tls.file_fingerprints(ca):
                known.add(fingerprint, str(ca))
        except (OSError, ValueError):
            pass
    return known


def notes(found: Found, known: Known) -> list[str]:
    """What to say about a found server besides its name, address and CA."""
    said = []
    if not found.txt.tls:
        said.append("NO TLS (--plain)")
    if found.txt.ca is not None and found.txt.ca in known.how:
        said.append(known.how[found.txt.ca])
    if found.txt.mutual:
        said.append("client certificate required")
    if found.txt.invites:
        said.append("takes invites")
    if found.txt.proto not in (None, protocol.PROTOCOL_VERSION):
        said.append(f"protocol {found.txt.proto}")
    return said


def warning(found: Found, known: Known) -> str | None:
    """A warning when this machine knows the server's address by another CA than it announces."""
    expected = known.at.get((found.host, found.port))
    if expected is None or expected[0] == found.txt.ca:
        return None
    announced = dnssd.short_fingerprint(found.txt.ca) if found.txt.ca else "no CA"
    return (f"'{found.name}' at {found.where} announces CA {announced}, but you know {found.where} by CA "
            f"{dnssd.short_fingerprint(expected[0])} ({expected[1]}): it is not that server, or its CA was replaced")


def connect_command(found: Found) -> str:
    return f"securechat connect {found.where}" + ("" if found.txt.tls else " --plain")


def listing(found: Sequence[Found], known: Known) -> str:
    """The table ``securechat servers`` prints: name, address, CA (short), notes, connect command."""
    rows = [("NAME", "ADDRESS", "CA", "NOTES", "CONNECT WITH")]
    for f in found:
        ca = dnssd.short_fingerprint(f.txt.ca) if f.txt.ca else ("-" if not f.txt.tls else "?")
        rows.append((f.name, f.where, ca, ", ".join(notes(f, known)) or "-", connect_command(f)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]]) for row in rows]
    lines += [f"WARNING: {w}" for f in found if (w := warning(f, known)) is not None]
    if any(f.txt.tls and f.txt.ca not in known.how for f in found):
        lines.append(f"Note: {HINT}")
    return "\n".join(lines) + "\n"


def build_parser() -> options.Parser:
    p = options.Parser(
        prog=PROG,
        description="List the securechat servers that answer on this network (mDNS/DNS-SD, as Avahi and Bonjour "
        "browse), with the command to connect to each. What a server announces is a hint: connecting still "
        "verifies it (its CA, a pin, or an invite code).")
    p.add_argument("--timeout", type=options.duration(MAX_BROWSE_SECONDS), default=discover.BROWSE_SECONDS,
                   metavar="SECONDS", help="how long to wait for answers (default: %(default)g)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``securechat servers``: 0 with the list (or none found), 1 when the network cannot be searched."""
    from securechat.client.chat import DEFAULT_CA

    args = build_parser().parse_args(argv)
    try:
        found = discover.browse(args.timeout)
    except DiscoveryError as exc:
        options.print_error(PROG, str(exc))
        return options.EXIT_FAILURE
    except KeyboardInterrupt:
        return options.EXIT_FAILURE
    if not found:
        text = "no securechat server found on this network\n"
    else:
        text = listing(found, known_here(ca=DEFAULT_CA if DEFAULT_CA.is_file() else None))
    return options.EXIT_OK if options.write_stdout(PROG, text) else options.EXIT_FAILURE


# -- securechat connect, with no address ---------------------------------------------------------------


def _describe(found: Found) -> str:
    return f"'{found.name}' at {found.where} (CA {dnssd.short_fingerprint(found.txt.ca) if found.txt.ca else 'none'})"


def choose_for_connect(found: Sequence[Found], *, plain: bool, pin: str | None, ca: Path | None, tofu: bool,
                       interactive: bool, ask: Callable[[str], str] = input, say: Callable[[str], None] = print,
                       ) -> tuple[Found, profiles.Profile | None]:
    """Of the servers ``found``, the one ``securechat connect`` with no address talks to, and its profile.

    The one found server whose CA this invocation can verify (``--pin``, ``--ca``, known_hosts with
    ``--tofu``, else the profiles and ``certs/ca.pem``); otherwise, in a terminal, a numbered
    choice showing fingerprints. ChatError (one line) when there is nothing to choose from or no
    terminal to choose in. The profile comes back with the address found (a DHCP lease may have
    changed it since the join).
    """
    from securechat.client.chat import DEFAULT_CA

    found = [f for f in found if f.txt.tls != plain]
    if not found:
        raise ChatError(f"no securechat server {'without TLS ' if plain else ''}found on this network: give its "
                        "address, as in 'securechat connect 192.168.0.20'")
    default_ca = DEFAULT_CA if DEFAULT_CA.is_file() else None
    if pin or ca or tofu:
        trusted = known_here(joined=False, remembered=tofu, pin=pin, ca=ca)
    else:
        trusted = known_here(remembered=False, ca=default_ca)
    matches = [f for f in found if f.txt.ca is not None and f.txt.ca in trusted.how]
    if len(matches) == 1:
        chosen = matches[0]
    else:
        known = known_here(pin=pin, ca=ca or default_ca)
        if not interactive:
            listed = "; ".join(_describe(f) for f in found)
            why = "several you know" if matches else "none you know"
            raise ChatError(f"{len(found)} securechat server{'s' if len(found) != 1 else ''} on this network, "
                            f"{why}: {listed}. Choose one: 'securechat connect ADDRESS'")
        chosen = _pick(found, known, ask, say)
    profile = trusted.joined.get(chosen.txt.ca or "")
    if profile is not None:
        profile = dataclasses.replace(profile, host=chosen.host, port=chosen.port)
    return chosen, profile


def _pick(found: Sequence[Found], known: Known, ask: Callable[[str], str], say: Callable[[str], None]) -> Found:
    """A numbered choice, each server with its full CA fingerprint; ChatError when none is chosen."""
    say("securechat servers on this network:")
    for number, f in enumerate(found, 1):
        extra = notes(f, known)
        say(f"  {number}. {f.name}  {f.where}" + (f"  ({', '.join(extra)})" if extra else ""))
        say(f"     CA {f.txt.ca or 'not announced'}")
        if (w := warning(f, known)) is not None:
            say(f"     WARNING: {w}")
    say(f"({HINT})")
    while True:
        try:
            answer = ask(f"Which server? 1-{len(found)} (Enter to cancel): ").strip()
        except EOFError:
            answer = ""
        if not answer:
            raise ChatError("no server chosen")
        if answer.isdigit() and 1 <= int(answer) <= len(found):
            return found[int(answer) - 1]
        say(f"Please type a number from 1 to {len(found)}, or press Enter to cancel.")


def offer(say: Callable[[str], None] = print) -> dict[str, str]:
    """For the seed's ``Enter server IP:`` prompt: list the TLS servers found, numbered; number -> address.

    Silent (an empty offer) when discovery is switched off or cannot search; the prompt is then
    asked exactly as before.
    """
    if not dnssd.enabled():
        return {}
    say("Looking for securechat servers on this network...")
    try:
        found = [f for f in discover.browse() if f.txt.tls]
    except DiscoveryError:
        return {}
    if not found:
        say("None answered; type the server's address.")
        return {}
    known = known_here()
    say("Found (type a number, or an address):")
    for number, f in enumerate(found, 1):
        extra = notes(f, known)
        ca = dnssd.short_fingerprint(f.txt.ca) if f.txt.ca else "?"
        say(f"  {number}. {f.name}  {f.where}  CA {ca}" + (f"  ({', '.join(extra)})" if extra else ""))
        if (w := warning(f, known)) is not None:
            say(f"     WARNING: {w}")
    return {str(number): f.where for number, f in enumerate(found, 1)}


# -- securechat join CODE, with no address --------------------------------------------------------------


def find_inviter(found: Sequence[Found], code: str, *, timeout: float) -> tuple[Found, enroll.Started]:
    """Of the servers ``found`` on this network, the one that holds invite ``code``, with the exchange opened.

    Every one that takes invites is asked, at once, up to the server's PAKE message, which
    costs the invite nothing (a try is counted only at the confirmation). Exactly one must answer;
    the PAKE then proves it is the inviting server, so a spoofed announcement fails loudly in
    :func:`enroll.finish`. None answering, or several (two servers with an invite of that number,
    or an impostor answering for anything), is a JoinError listing them; nothing is spent.
    """
    try:
        nameplate, _ = parse_code(code)
    except ValueError as exc:
        raise JoinError(str(exc)) from None
    candidates = [f for f in found if f.txt.tls and f.txt.invites][:MAX_PROBES]
    if not candidates:
        seen = f" (found {len(found)} that take none)" if found else ""
        raise JoinError(f"no securechat server on this network takes invites{seen}: give the server's address, "
                        "as in 'securechat join 192.168.0.20 CODE'")

    def open_exchange(f: Found) -> enroll.Started | JoinError:
        try:
            return enroll.start(f.host, f.port, code, timeout=timeout)
        except JoinError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(candidates)) as pool:
        answers = list(zip(candidates, pool.map(open_exchange, candidates), strict=True))
    opened = [(f, a) for f, a in answers if isinstance(a, enroll.Started)]
    if len(opened) == 1:
        return opened[0]
    for _, started in opened:
        started.close()
    if not opened:
        why = "; ".join(f"{_describe(f)}: {a}" for f, a in answers)
        raise JoinError(f"no securechat server on this network holds invite {nameplate} ({why}): check the code, "
                        "or give the server's address, as in 'securechat join 192.168.0.20 CODE'")
    listed = "; ".join(_describe(f) for f, _ in opened)
    raise JoinError(f"{len(opened)} servers on this network answer for invite {nameplate}: {listed}. One may be "
                    "an impostor; nothing was spent. Ask the server's admin for its address and run "
                    "'securechat join ADDRESS CODE'")
