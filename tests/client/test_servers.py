"""Servers found on the LAN: how they are listed, recognised, chosen, and asked for an invite.

The search itself needs multicast and runs in network namespaces (tests/test_lan_discovery.py). Here the
found servers are given as data, and the servers asked for an invite are real ones on 127.0.0.1 (real
TLS, real SPAKE2), an impostor among them.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from securechat.client import enroll, profiles, servers
from securechat.client.discover import Found
from securechat.client.errors import ChatError
from securechat.pki import authority, certs, enrollment
from securechat.pki.enrollment import JoinError
from securechat.server.engine import ChatServer
from securechat.wire import dnssd, tls
from tests.conftest import LOOPBACK


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine with no profiles, no known_hosts, no certs/ in its working directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ca(tmp_path: Path, name: str) -> tuple[Path, str]:
    certs.mint(tmp_path / name)
    return tmp_path / name, tls.file_fingerprint(tmp_path / name / "ca.pem")


def _joined(ca_dir: Path, host: str, port: int) -> profiles.Profile:
    """A profile as 'securechat join' leaves it (a guest invite: the CA only)."""
    return profiles.save(host, port, enroll.Enrolled(None, (ca_dir / "ca.pem").read_bytes(), None, None, ""))


def test_the_listing_names_address_fingerprint_notes_and_command(home: Path) -> None:
    ours, fp = _ca(home, "ours")
    _joined(ours, "10.0.0.5", 5555)
    _, other_fp = _ca(home, "other")
    found = [Found("chat", "10.0.0.5", 5555, dnssd.Txt(ca=fp, invites=True)),
             Found("lab\x1b[2J", "10.0.0.9", 6000, dnssd.Txt(ca=other_fp, mutual=True)),
             Found("debug", "10.0.0.7", 5555, dnssd.Txt(tls=False))]
    found[1] = Found(dnssd.display_name("lab\x1b[2J._securechat._tcp.local."), "10.0.0.9", 6000, found[1].txt)
    text = servers.listing(found, servers.known_here())
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "CA", "NOTES", "CONNECT", "WITH"]
    assert lines[1].split("  ")[0] == "chat" and dnssd.short_fingerprint(fp) in lines[1]
    assert "joined 10.0.0.5:5555, takes invites" in lines[1]
    assert lines[1].endswith("securechat connect 10.0.0.5:5555")
    assert "client certificate required" in lines[2] and lines[2].endswith("securechat connect 10.0.0.9:6000")
    assert "\x1b" not in text
    assert "NO TLS (--plain)" in lines[3] and lines[3].endswith("securechat connect 10.0.0.7:5555 --plain")
    assert lines[-1].startswith("Note: a fingerprint listed here is only what the server announced")


def test_a_fingerprint_that_differs_from_the_profile_of_that_address_is_flagged(home: Path) -> None:
    ours, fp = _ca(home, "ours")
    _joined(ours, "10.0.0.5", 5555)
    _, impostor_fp = _ca(home, "impostor")
    found = [Found("chat", "10.0.0.5", 5555, dnssd.Txt(ca=impostor_fp))]
    text = servers.listing(found, servers.known_here())
    (warning,) = [line for line in text.splitlines() if line.startswith("WARNING: ")]
    assert f"announces CA {dnssd.short_fingerprint(impostor_fp)}" in warning
    assert f"you know 10.0.0.5:5555 by CA {dnssd.short_fingerprint(fp)} (joined 10.0.0.5:5555)" in warning
    assert "joined" not in text.splitlines()[1]  # not recognised as the server joined


def test_known_hosts_count_as_known(home: Path) -> None:
    _, fp = _ca(home, "ours")
    from securechat.client import identity

    identity.KnownHosts().remember("10.0.0.5", 5555, fp)
    known = servers.known_here()
    assert known.how[fp] == "known_hosts" and known.at[("10.0.0.5", 5555)] == (fp, "known_hosts")


# -- connect with no address ---------------------------------------------------------------------------


def _choose(found: list[Found], *, answers: list[str] | None = None, **trust: object
            ) -> tuple[tuple[Found, profiles.Profile | None], list[str]]:
    said: list[str] = []
    replies = iter(answers or [])
    options: dict[str, object] = {"plain": False, "pin": None, "ca": None, "tofu": False, **trust}
    chosen = servers.choose_for_connect(found, interactive=answers is not None, ask=lambda prompt: next(replies),
                                        say=said.append, **options)  # type: ignore[arg-type]
    return chosen, said


def test_the_one_server_whose_ca_a_profile_holds_is_chosen_at_its_new_address(home: Path) -> None:
    ours, fp = _ca(home, "ours")
    _joined(ours, "10.0.0.5", 5555)  # joined there; the DHCP lease has changed since
    _, other = _ca(home, "other")
    found = [Found("other", "10.0.0.3", 5555, dnssd.Txt(ca=other)), Found("chat", "10.0.0.8", 5556, dnssd.Txt(ca=fp))]
    (chosen, profile), said = _choose(found)
    assert chosen is found[1] and said == []
    assert profile is not None and (profile.host, profile.port) == ("10.0.0.8", 5556)
    assert profile.ca.read_bytes() == (ours / "ca.pem").read_bytes()


def test_a_pin_or_a_ca_file_recognises_too(home: Path) -> None:
    ours, fp = _ca(home, "ours")
    _, other = _ca(home, "other")
    found = [Found("a", "10.0.0.3", 5555, dnssd.Txt(ca=other)), Found("b", "10.0.0.4", 5555, dnssd.Txt(ca=fp))]
    assert _choose(found, pin=fp)[0] == (found[1], None)
    assert _choose(found, ca=ours / "ca.pem")[0] == (found[1], None)


def test_none_known_without_a_terminal_is_one_line_listing_them(home: Path) -> None:
    _, fp = _ca(home, "ours")
    found = [Found("a", "10.0.0.3", 5555, dnssd.Txt(ca=fp)), Found("b", "10.0.0.4", 5555, dnssd.Txt(ca=fp))]
    with pytest.raises(ChatError) as raised:
        _choose(found[:1])
    assert str(raised.value) == (f"1 securechat server on this network, none you know: 'a' at 10.0.0.3:5555 (CA "
                                 f"{dnssd.short_fingerprint(fp)}). Choose one: 'securechat connect ADDRESS'")
    with pytest.raises(ChatError, match="2 securechat servers on this network, several you know"):
        _choose(found, pin=fp)


def test_in_a_terminal_a_numbered_choice_shows_full_fingerprints(home: Path) -> None:
    ours, fp = _ca(home, "ours")
    _joined(ours, "10.0.0.5", 5555)
    _, other = _ca(home, "other")
    found = [Found("a", "10.0.0.3", 5555, dnssd.Txt(ca=other)), Found("b", "10.0.0.5", 5555, dnssd.Txt(ca=other))]
    (chosen, profile), said = _choose(found, answers=["x", "3", "1"])
    assert chosen is found[0] and profile is None
    assert said[0] == "securechat servers on this network:"
    assert said.count(f"     CA {other}") == 2  # the whole fingerprint, to compare with the server's line
    assert any(line.startswith("     WARNING: 'b' at 10.0.0.5:5555 announces CA") for line in said)
    assert said.count("Please type a number from 1 to 2, or press Enter to cancel.") == 2
    with pytest.raises(ChatError, match="no server chosen"):
        _choose(found, answers=[""])


def test_plain_servers_are_only_for_plain_clients(home: Path) -> None:
    _, fp = _ca(home, "ours")
    found = [Found("tls", "10.0.0.3", 5555, dnssd.Txt(ca=fp)), Found("plain", "10.0.0.4", 5555, dnssd.Txt(tls=False))]
    assert _choose(found, pin=fp)[0][0] is found[0]
    (chosen, _), _ = _choose(found, plain=True, answers=["1"])
    assert chosen is found[1]
    with pytest.raises(ChatError, match="no securechat server without TLS found on this network"):
        _choose(found[:1], plain=True)


# -- join CODE with no address: asking real servers ------------------------------------------------------


def _inviting(serve: Callable[..., ChatServer], ca_dir: Path) -> tuple[ChatServer, authority.Authority]:
    ca = authority.Authority(ca_dir)
    ctx = ca.configure(tls.server_context(ca_dir / "server.pem", ca_dir / "server.key"), ca_dir / "server.pem")
    return serve(context=ctx, authority=ca), ca


class Impostor:
    """A TLS endpoint that answers every JOIN with a well-formed PAKE message it knows no code for,
    and every confirmation with an OK it cannot prove."""

    def __init__(self) -> None:
        from spake2 import SPAKE2_B

        self.spake = SPAKE2_B
        cert = trustme.CA().issue_cert("localhost", LOOPBACK)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        self.ctx.set_alpn_protocols([enrollment.ALPN])
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.confirms: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as sock, sock.makefile("rwb") as f:
                    f.readline()
                    msg = self.spake(b"123456", idA=enrollment.ID_JOINER, idB=enrollment.ID_SERVER).start()
                    f.write(b"PAKE " + base64.b64encode(msg) + b"\n")
                    f.flush()
                    line = f.readline()
                    if line:
                        self.confirms.append(line.decode())
                        f.write(b"OK - - QUJD QUJD\n")  # an answer it cannot MAC without the code
                        f.flush()
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def impostor() -> Iterator[Impostor]:
    made = Impostor()
    yield made
    made.close()


def _found(name: str, port: int, fp: str | None = None, invites: bool = True) -> Found:
    return Found(name, LOOPBACK, port, dnssd.Txt(ca=fp, invites=invites))


def test_the_server_holding_the_invite_is_found_among_others(serve: Callable[..., ChatServer], tmp_path: Path) -> None:
    ours, fp = _ca(tmp_path, "ours")
    theirs, _ = _ca(tmp_path, "theirs")
    server, ca = _inviting(serve, ours)
    other, _ = _inviting(serve, theirs)  # takes invites, holds none with that number
    code = ca.store.create("alice").code
    found = [_found("other", other.address[1]), _found("ours", server.address[1], fp),
             _found("no-invites", 1, invites=False)]  # never asked: port 1 would refuse
    chosen, started = servers.find_inviter(found, code, timeout=5)
    assert chosen is found[1]
    enrolled = enroll.finish(started)
    assert enrolled.name == "alice" and tls.fingerprint(enrolled.ca_pem.decode()) == fp


def test_an_impostor_answering_too_spends_nothing(serve: Callable[..., ChatServer], tmp_path: Path,
                                                  impostor: Impostor) -> None:
    ours, fp = _ca(tmp_path, "ours")
    server, ca = _inviting(serve, ours)
    invite = ca.store.create("alice")
    found = [_found("ours", server.address[1], fp), _found("ours", impostor.port, fp)]
    with pytest.raises(JoinError) as raised:
        servers.find_inviter(found, invite.code, timeout=5)
    message = str(raised.value)
    assert message.startswith(f"2 servers on this network answer for invite {invite.nameplate}: ")
    assert f"127.0.0.1:{server.address[1]}" in message and f"127.0.0.1:{impostor.port}" in message
    assert "nothing was spent" in message and impostor.confirms == []
    assert ca.store.lookup(invite.nameplate).tries == 0
    assert enroll.join(LOOPBACK, server.address[1], invite.code).name == "alice"


def test_the_impostor_alone_fails_at_the_pake(home: Path, impostor: Impostor) -> None:
    _, fp = _ca(home, "ours")
    chosen, started = servers.find_inviter([_found("ours", impostor.port, fp)], "7-crayon-galaxy-lunar", timeout=5)
    assert chosen.port == impostor.port
    with pytest.raises(JoinError, match="does not prove it knows the code: someone between you and the server"):
        enroll.finish(started)


def test_nobody_holding_the_invite_says_what_each_answered(serve: Callable[..., ChatServer], tmp_path: Path) -> None:
    ours, fp = _ca(tmp_path, "ours")
    server, _ = _inviting(serve, ours)
    with pytest.raises(JoinError) as raised:
        servers.find_inviter([_found("ours", server.address[1], fp)], "7-crayon-galaxy-lunar", timeout=5)
    assert str(raised.value).startswith("no securechat server on this network holds invite 7 ('ours' at 127.0.0.1:")
    assert "there is no invite number 7 on this server" in str(raised.value)
    with pytest.raises(JoinError, match=r"no securechat server on this network takes invites \(found 1 that take "):
        servers.find_inviter([_found("x", 1, invites=False)], "7-crayon-galaxy-lunar", timeout=5)
    with pytest.raises(JoinError, match="is not an invite code"):
        servers.find_inviter([], "seven", timeout=5)


# -- switched off (as everywhere in this suite): one line each, nothing sent -----------------------------


@pytest.mark.parametrize("argv, exit_status, words", [
    (["servers"], 1, "securechat servers: searching the network is switched off (SECURECHAT_DISCOVERY=off)"),
    (["connect"], 1, "securechat connect: no server address given, and searching the network is switched off "
                     "(SECURECHAT_DISCOVERY=off): give one, as in 'securechat connect 192.168.0.20'"),
    (["join", "7-crayon-galaxy-lunar"], 1, "securechat join: no server address given, and searching the network "
                                           "is switched off (SECURECHAT_DISCOVERY=off): give the one that came"),
    (["connect", "--port", "6000"], 2, "securechat connect: --port needs the server's address (HOST)"),
])
def test_without_an_address_and_discovery_off(home: Path, argv: list[str], exit_status: int, words: str) -> None:
    done = subprocess.run([sys.executable, "-m", "securechat", *argv], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == exit_status
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(words), done.stderr
    assert done.stdout == ""


def test_the_menu_asks_as_before_when_discovery_is_off(home: Path) -> None:
    said: list[str] = []
    assert servers.offer(said.append) == {} and said == []
