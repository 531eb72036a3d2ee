"""Addresses and names (issue 11): HOST:PORT everywhere, both IP families, --listen, what serve prints.

Real subprocesses and real sockets on loopback only (127.0.0.1 and ::1). Two tests bind the
wildcard address, because a dual-stack listener can only be bound there; they connect to loopback
alone and last a second.
"""

# ruff: noqa: F811

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from securechat.server import listen
from securechat.server.engine import ChatServer
from securechat.wire import addr, tls
from securechat.wire import netinfo as certs_module
from tests.client.test_client import Certs, Served, certs, expect, peer, start_server, tls_server  # noqa: F401
from tests.conftest import LineClient

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

needs_ipv6 = pytest.mark.skipif(not socket.has_ipv6 or not socket.has_dualstack_ipv6(),
                                reason="this machine has no IPv6 (dual-stack) sockets")


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- HOST:PORT --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("192.168.0.20", ("192.168.0.20", None)),
    ("192.168.0.20:6000", ("192.168.0.20", 6000)),
    ("chat.lan:5555", ("chat.lan", 5555)),
    ("[::1]:5555", ("::1", 5555)),
    ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
    ("[::1]", ("::1", None)),
    ("::1", ("::1", None)),
    ("fe80::1:2", ("fe80::1:2", None)),  # bare IPv6: the last group is not a port
])
def test_split_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert addr.split_host_port(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"), ("host:", "port"), ("host:99999", "port"), ("host:http", "port"), ("[::1", "closed"),
    ("[::1]5555", "after ']'"), (":5555", "host"),
])
def test_split_host_port_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(addr.AddressError, match=re.escape(why)):
        addr.split_host_port(text)


def test_ipv6_addresses_are_bracketed() -> None:
    assert addr.join("::1", 5555) == "[::1]:5555"
    assert addr.join("127.0.0.1", 5555) == "127.0.0.1:5555"
    assert addr.unmap("::ffff:192.0.2.1") == "192.0.2.1"
    assert addr.unmap("::1") == "::1"


def _connect(target: str, ca: Path, *extra: str, stdin: str = "hi\n") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "securechat", "connect", target, "--ca", str(ca), *extra],
                          input=stdin, capture_output=True, text=True, timeout=20, env=ENV)


def test_connect_takes_host_colon_port(certs: Certs, tls_server: Served) -> None:
    _, port = tls_server
    with peer(port, "bob", certs) as bob:
        result = _connect(f"127.0.0.1:{port}", certs.ca, "--nick", "alice")
        assert result.returncode == 0, result.stderr
        expect(bob, "[alice] hi")


@pytest.mark.skipif(not _ipv6_loopback_usable(), reason="no IPv6 loopback (::1) on this machine")
def test_connect_takes_bracketed_ipv6_with_port(certs: Certs) -> None:
    server = ChatServer("::1", 0, certs.server_context())
    _, port = server.start()
    try:
        listener = v6_peer(port, certs)
        result = _connect(f"[::1]:{port}", certs.ca, "--nick", "alice")
        assert result.returncode == 0, result.stderr
        listener.expect("[alice] hi")
        listener.close()
    finally:
        server.shutdown()


def v6_peer(port: int, certs: Certs) -> LineClient:
    raw = socket.create_connection(("::1", port), timeout=10)
    client = LineClient(certs.client_context().wrap_socket(raw, server_hostname="::1"))
    client.expect("* securechat")
    client.send("bob")
    client.expect("* welcome, bob!")
    return client


def test_connect_with_two_different_ports_is_a_usage_error(certs: Certs) -> None:
    result = _connect("127.0.0.1:6000", certs.ca, "--port", "7000")
    assert result.returncode == 2
    assert "two ports" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_ipv6_is_bracketed_in_the_message(certs: Certs) -> None:
    with socket.socket(socket.AF_INET6 if _ipv6_loopback_usable() else socket.AF_INET) as s:
        host = "::1" if s.family == socket.AF_INET6 else "127.0.0.1"
        s.bind((host, 0))
        port = s.getsockname()[1]  # bound, not listening: refused
    result = _connect(addr.join(host, port), certs.ca, "--nick", "alice")
    assert result.returncode == 1
    assert f"connection refused by {addr.join(host, port)}" in result.stderr


# -- the menu ---------------------------------------------------------------------------------


def test_menu_says_why_it_asks_again(certs: Certs, tls_server: Served, tmp_path: Path) -> None:
    _, port = tls_server
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(certs.ca.read_bytes())
    with peer(port, "bob", certs) as bob:
        answers = f"3\n2\n\n[::1\n127.0.0.1:{port}\ndave\nagain\n"
        result = subprocess.run([sys.executable, "-m", "securechat"], input=answers, capture_output=True, text=True,
                                timeout=20, env=ENV, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert out.startswith("Select mode:\n1. Server\n2. Client\nOption: Please type 1 to run the server or 2 "
                              "to join one as a client.\nOption: Enter server IP: The server's address is needed")
        assert "That address won't do: '[::1': a '[' must be closed" in out
        assert out.count("Enter server IP: ") == 3
        expect(bob, "[dave] again")


# -- serve: where it listens, what it prints -------------------------------------------------


def _free_port() -> int:
    # Free on every address (a port free on 127.0.0.1 alone may be some connection's port elsewhere).
    if socket.has_dualstack_ipv6():
        with socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True) as s:
            return int(s.getsockname()[1])
    with socket.create_server(("", 0)) as s:
        return int(s.getsockname()[1])


class Serve:
    def __init__(self, *args: str, cwd: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "securechat", "serve", "--port", str(self.port), *args],
                                     cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines: list[str] = []

    def read_until(self, prefix: str, timeout: float = 20) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(5)
                assert self.proc.stderr is not None
                raise AssertionError(f"{prefix!r} never printed; got {self.lines!r}; stderr: {self.proc.stderr.read()}")
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line.rstrip("\n")
        raise AssertionError(f"{prefix!r} never printed; got {self.lines!r}")

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=10)
        return out, err


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.communicate(timeout=10)


def _join(family: socket.AddressFamily, host: str, port: int, ca: Path, nick: str) -> LineClient:
    raw = socket.create_connection((host, port), timeout=10)
    assert raw.family == family
    client = LineClient(tls.client_context(ca).wrap_socket(raw, server_hostname=host))
    client.expect("* securechat")
    client.send(nick)
    client.expect(f"* welcome, {nick}!")
    return client


@needs_ipv6
@pytest.mark.skipif(not _ipv6_loopback_usable(), reason="no IPv6 loopback (::1) on this machine")
def test_serve_listens_on_both_families_and_says_where_to_connect(tmp_path: Path, serving: list[Serve]) -> None:
    served = Serve(cwd=tmp_path)  # first run: mints certs/ for this machine's names and addresses
    serving.append(served)
    seed_line = served.read_until("[SERVER] Waiting for connections on")
    assert seed_line == f"[SERVER] Waiting for connections on 0.0.0.0:{served.port}"  # the seed's, exactly
    assert served.read_until("[SERVER] Waiting") == f"[SERVER] Waiting for connections on [::]:{served.port} too (IPv6)"
    hint = served.read_until("[SERVER] ")
    lan = certs_module.local_addresses()
    if lan:
        first = addr.host_text(str(lan[0]))
        assert hint == ("[SERVER] Clients on the network connect with: securechat connect "
                        f"{first}:{served.port} --ca ca.pem")
    else:
        assert hint.startswith("[SERVER] Only this machine can connect")
    ca = tmp_path / "certs" / "ca.pem"
    alice = _join(socket.AF_INET, "127.0.0.1", served.port, ca, "alice")
    bob = _join(socket.AF_INET6, "::1", served.port, ca, "bob")
    alice.expect("* bob joined")
    bob.send("over IPv6")
    assert alice.readline() == "[bob] over IPv6"
    served.read_until("[NEW CLIENT] Connected from ('127.0.0.1', ")  # not ::ffff:127.0.0.1
    served.read_until("[NEW CLIENT] Connected from ('::1', ")
    alice.close()
    bob.close()
    _, err = served.stop()
    assert "Traceback" not in err


def test_serve_explains_a_name_given_to_host(tmp_path: Path, serving: list[Serve]) -> None:
    served = Serve("--host", "chat.lan", cwd=tmp_path)
    serving.append(served)
    out, err = served.proc.communicate(timeout=20)
    assert served.proc.returncode == 2
    assert "'chat.lan' is not an address of this machine" in err
    assert "securechat gen-certs --host chat.lan" in err
    assert "Traceback" not in err and not (tmp_path / "certs").exists()


def test_serve_explains_an_address_of_another_machine(tmp_path: Path, serving: list[Serve],
                                                      cert_files: dict[str, Path]) -> None:
    # 192.0.2.1 (TEST-NET-1) is nobody's address: binding fails locally, no packet is sent.
    served = Serve("--listen", "192.0.2.1", "--cert", str(cert_files["cert"]), "--key", str(cert_files["key"]),
                   cwd=tmp_path)
    serving.append(served)
    _, err = served.proc.communicate(timeout=20)
    assert served.proc.returncode == 1
    assert f"serve: cannot listen on 192.0.2.1:{served.port}: 192.0.2.1 is not an address of this machine" in err
    assert "Traceback" not in err


@pytest.mark.skipif(not _ipv6_loopback_usable(), reason="no IPv6 loopback (::1) on this machine")
def test_serve_listen_on_ipv6_loopback_is_bracketed(tmp_path: Path, serving: list[Serve],
                                                   cert_files: dict[str, Path]) -> None:
    served = Serve("--listen", "::1", "--cert", str(cert_files["cert"]), "--key", str(cert_files["key"]),
                   cwd=tmp_path)
    serving.append(served)
    assert served.read_until("[SERVER] Waiting") == f"[SERVER] Waiting for connections on [::1]:{served.port}"
    assert served.read_until("[SERVER] ") == (
        f"[SERVER] Only this machine can connect (listening on this machine only): securechat connect "
        f"[::1]:{served.port} --ca ca.pem")


def test_connect_hint_offers_only_addresses_the_certificate_covers(tmp_path: Path) -> None:
    cert = tmp_path / "server.pem"
    trustme.CA().issue_cert("localhost", "127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
    assert listen.connect_hint("0.0.0.0", 6000, False, cert=cert) == [
        "[SERVER] Only this machine can connect (no LAN address of this machine is in the certificate (re-issue "
        "it with 'securechat gen-certs --ip ADDR')): securechat connect 127.0.0.1:6000 --ca ca.pem"]
    plain = listen.connect_hint("0.0.0.0", 5555, False, cert=None, mutual=False)
    lan = [a for a in certs_module.local_addresses() if a.version == 4]
    if lan:
        assert plain[0] == f"[SERVER] Clients on the network connect with: securechat connect {lan[0]} --plain"


def test_browser_hint_names_the_page_and_the_onboarding_page_at_a_covered_address(tmp_path: Path) -> None:
    cert = tmp_path / "server.pem"
    trustme.CA().issue_cert("localhost", "127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
    assert listen.browser_hint("0.0.0.0", 6000, False, cert=cert) == [
        "[SERVER] Browsers: https://127.0.0.1:6000/",
        "[SERVER] First time on a phone or computer: http://127.0.0.1:6000/ offers the CA certificate "
        "('securechat invite --qr' shows that address as a QR code)"]
    v6 = tmp_path / "v6.pem"
    trustme.CA().issue_cert("::1").cert_chain_pems[0].write_to_path(str(v6))
    hint = listen.browser_hint("::1", 5555, False, cert=v6, mutual=True)
    assert hint[0] == "[SERVER] Browsers: https://[::1]:5555/"
    assert "link from 'securechat invite NAME --web'" in hint[1]


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_log_format(fmt: str, tmp_path: Path, serving: list[Serve], cert_files: dict[str, Path]) -> None:
    served = Serve("--listen", "127.0.0.1", "--cert", str(cert_files["cert"]), "--key", str(cert_files["key"]),
                   "-v", "--log-format", fmt, cwd=tmp_path)
    serving.append(served)
    served.read_until("[SERVER] Waiting")
    client = _join(socket.AF_INET, "127.0.0.1", served.port, cert_files["ca"], "alice")
    client.close()
    time.sleep(0.3)
    _, err = served.stop()
    lines = [line for line in err.splitlines() if "alice" in line]
    assert lines, err
    if fmt == "console":
        assert all(line.startswith("[SERVER] ") for line in err.splitlines()), err
        assert re.fullmatch(r"\[SERVER\] \('127\.0\.0\.1', \d+\) is alice", lines[0])
    else:
        records = [json.loads(line) for line in err.splitlines()]
        assert {"time", "level", "logger", "message"} <= set(records[0])
        assert any(r["message"].endswith(" is alice") and r["level"] == "info" for r in records)

