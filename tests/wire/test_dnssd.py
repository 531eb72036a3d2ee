"""The DNS-SD announcement's contents both ends agree on: TXT keys, hostile TXT, names, the off switch."""

from __future__ import annotations

import logging
import sys

import pytest

from securechat.wire import dnssd, protocol

FP = ":".join(["AB"] * 31 + ["CD"])


def test_the_txt_record_says_what_the_issue_lists_and_reads_back() -> None:
    txt = dnssd.Txt(tls=True, ca=FP, mutual=True, invites=False)
    encoded = txt.encode()
    assert encoded == {"txtvers": "1", "proto": str(protocol.PROTOCOL_VERSION), "tls": "1", "ca": "AB" * 31 + "CD",
                       "mtls": "1", "invites": "0"}
    assert all(len(k) + len(v) + 1 <= 255 for k, v in encoded.items())  # each string fits a TXT string
    parsed = dnssd.parse_txt({k.encode(): v.encode() for k, v in encoded.items()})
    assert parsed == dnssd.Txt(tls=True, ca=FP, mutual=True, invites=False, proto=protocol.PROTOCOL_VERSION)
    plain = dnssd.Txt(tls=False, invites=False).encode()
    assert "ca" not in plain and plain["tls"] == "0"


@pytest.mark.parametrize("properties", [
    {b"ca": b"AB" * 31},  # too short
    {b"ca": b"ZZ" * 32},  # not hex
    {b"ca": b"AB" * 32 + b"\x1b[31m"},  # an escape sequence tacked on
    {b"ca": "É".encode() * 64},  # not ASCII
    {b"ca": b"AB" * 5000},  # huge
    {b"ca": None},  # a key without a value
    {},
])
def test_a_hostile_or_broken_fingerprint_reads_as_absent(properties: dict[bytes, bytes | None]) -> None:
    assert dnssd.parse_txt(properties).ca is None


def test_flags_are_exactly_one_or_absent() -> None:
    txt = dnssd.parse_txt({b"tls": b"yes", b"mtls": b"true", b"invites": b"2", b"proto": b"99999999"})
    assert txt == dnssd.Txt(tls=True, ca=None, mutual=False, invites=False, proto=None)


def test_short_fingerprint_keeps_both_ends() -> None:
    fp = ":".join(f"{i:02X}" for i in range(32))
    assert dnssd.short_fingerprint(fp) == "00:01:02:03:...:1E:1F"


def test_an_announced_name_cannot_drive_the_terminal() -> None:
    name = "evil\x1b]0;pwned\x07\x1b[2J\u202eman" + "x" * 200 + "._securechat._tcp.local."
    shown = dnssd.display_name(name)
    assert protocol.is_safe(shown) and "\x1b" not in shown and "\u202e" not in shown
    assert shown.startswith("evilman") and len(shown) <= dnssd.MAX_NAME_BYTES
    assert dnssd.display_name("alice\\.laptop._securechat._tcp.local.") == "alice.laptop"
    assert dnssd.display_name("\x1b[2J._securechat._tcp.local.") == "?"


@pytest.mark.parametrize("hostname, name", [("alice-laptop", "alice-laptop"), ("box.example.lan", "box"),
                                            ("under_score", "securechat"), ("", "securechat")])
def test_the_instance_is_named_after_the_host(hostname: str, name: str) -> None:
    assert dnssd.instance_name(hostname) == name


@pytest.mark.parametrize("value, on", [("off", False), ("OFF", False), ("0", False), ("no", False),
                                       ("false", False), ("", True), ("on", True), ("1", True)])
def test_the_environment_switch(value: str, on: bool) -> None:
    assert dnssd.enabled({dnssd.ENV_SWITCH: value}) is on
    assert dnssd.enabled({}) is True


def test_the_suite_runs_with_discovery_switched_off() -> None:
    assert dnssd.enabled() is False  # tests/conftest.py: nothing in the suite multicasts on this machine


def test_zeroconf_log_lines_become_one_phrase_and_never_reach_the_root_logger(
        caplog: pytest.LogCaptureFixture) -> None:
    told: list[str] = []
    zlog = logging.getLogger("zeroconf")
    with caplog.at_level(logging.DEBUG), dnssd.FirstProblem(told.append) as problem:
        for _ in range(3):
            try:
                raise OSError(101, "Network is unreachable")
            except OSError:
                zlog.warning("Error with socket 4 (('10.0.0.5', 5353))): %s", "boom", exc_info=True)
        zlog.warning("something else")
    assert told == ["network is unreachable"] and problem.first == "network is unreachable"
    assert [r for r in caplog.records if r.name == "zeroconf"] == []
    assert zlog.propagate is True  # restored on the way out


def test_a_missing_zeroconf_is_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zeroconf", None)  # what Python does for a module that cannot be found
    with pytest.raises(dnssd.DiscoveryUnavailable, match="zeroconf package is not installed .*pip install zeroconf"):
        dnssd.import_zeroconf()
