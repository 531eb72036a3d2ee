"""What ``serve`` announces where (securechat.server.announce.plan): never loopback, only what it listens on.

The announcing itself, over real multicast, is tested inside network namespaces (tests/test_lan_discovery.py).
"""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from securechat.pki import certs
from securechat.server import announce
from securechat.wire import dnssd
from tests import netns

V4, V4B, V6 = ipaddress.ip_address("192.168.7.20"), ipaddress.ip_address("10.9.0.4"), ipaddress.ip_address("fd00::20")
LAN = [V4, V4B, V6]
TXT = dnssd.Txt(ca=":".join(["AB"] * 32), invites=True)


def _plan(host: str, *, dual: bool = False, cert: Path | None = None,
          lan: list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None) -> announce.Plan | None:
    return announce.plan(host, 5555, dual=dual, cert=cert, txt=TXT, lan=LAN if lan is None else lan,
                         hostname="alice-laptop.home.arpa")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_is_never_announced(host: str) -> None:
    assert _plan(host) is None


def test_every_interface_announces_every_lan_address_of_the_families_it_listens_on() -> None:
    plan = _plan("0.0.0.0")
    assert plan == announce.Plan("alice-laptop", 5555, ("192.168.7.20", "10.9.0.4"), ("192.168.7.20", "10.9.0.4"),
                                 TXT)
    dual = _plan("::", dual=True)
    assert dual is not None and dual.addresses == ("192.168.7.20", "10.9.0.4", "fd00::20")
    assert dual.interfaces == ("192.168.7.20", "10.9.0.4")  # mDNS itself goes out over IPv4
    v6_only = _plan("::", dual=False)
    assert v6_only is not None and v6_only.addresses == ("fd00::20",)


def test_one_address_announces_that_address_on_its_interface_only() -> None:
    plan = _plan("10.9.0.4")
    assert plan is not None and plan.addresses == ("10.9.0.4",) and plan.interfaces == ("10.9.0.4",)


def test_no_lan_address_no_announcement() -> None:
    assert _plan("0.0.0.0", lan=[]) is None


def test_with_tls_only_the_addresses_the_certificate_covers(tmp_path: Path) -> None:
    """A client connecting by an address the certificate lacks would be refused: announce the others."""
    certs.mint(tmp_path / "certs", ips=["10.9.0.4"])
    cert = tmp_path / "certs" / "server.pem"
    plan = _plan("0.0.0.0", cert=cert)
    assert plan is not None and plan.addresses == ("10.9.0.4",)
    assert plan.interfaces == ("192.168.7.20", "10.9.0.4")
    # None covered (the machine moved): announce them all; joining still works, and connect explains.
    moved = _plan("0.0.0.0", cert=cert, lan=[V4])
    assert moved is not None and moved.addresses == ("192.168.7.20",)


def test_switched_off_nothing_starts() -> None:
    assert not dnssd.enabled()  # the suite's conftest
    assert announce.start("0.0.0.0", 5555, dual=False, cert=None, txt=TXT) is None


@pytest.mark.skipif(sys.platform != "linux", reason="reads the process's sockets from /proc")
def test_the_suite_never_announces_on_this_machine(tmp_path: Path) -> None:
    """On the host's own interfaces the suite's switch keeps `serve` (listening on all of them) silent:
    no socket on the mDNS port, no announcement line."""
    assert not dnssd.enabled()
    proc = subprocess.Popen([*netns.SECURECHAT, "serve", "--port", "0", "--no-history"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while "Waiting for connections" not in proc.stdout.readline():
            assert proc.poll() is None
        time.sleep(2.5)  # longer than an announcement takes to start
        assert netns.mdns_sockets(proc.pid) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert "Announced" not in out and "Traceback" not in err
