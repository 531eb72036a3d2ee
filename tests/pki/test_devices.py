"""Browser devices in the CA's ledger (``invite NAME --web``): one-time links, secrets kept hashed, revocation.

Real SQLite files; the command lines run as real subprocesses. The browser side is tested in
tests/server/test_web_browser.py.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from securechat.pki import certs, devices, ledger, names


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    certs.mint(tmp_path / "certs")
    return tmp_path / "certs"


def _secret() -> str:
    return secrets.token_urlsafe(32)


def test_a_link_binds_one_browser_once_and_the_secret_is_stored_hashed(ca_dir: Path) -> None:
    store = ledger.Store(ca_dir)
    link = devices.create_invite(store, "alice", expires_in=900)
    secret = _secret()
    device = devices.claim(store, link.token, secret)
    assert device.name == "alice"
    assert devices.check(store, secret) == device
    with pytest.raises(devices.DeviceError, match="already been used"):
        devices.claim(store, link.token, _secret())
    # Neither the link's token nor the browser's secret is in the file.
    raw = (ca_dir / ledger.DB_NAME).read_bytes()
    assert link.token.encode() not in raw and secret.encode() not in raw
    # It is a registry entry: listed, its name held against guests.
    (issued,) = store.certificates()
    assert issued.name == "alice" and issued.serial == ledger.serial_hex(device.serial)
    assert issued.serial in devices.device_serials(store)
    held = store.snapshot().held[names.key("alice")]
    assert (held.name, held.state) == ("alice", names.ISSUED)  # no guest takes it
    assert store.name_refusal("AIice") is not None  # nor a look-alike spelling


def test_a_secret_never_works_as_another_name_and_unknown_secrets_fail(ca_dir: Path) -> None:
    store = ledger.Store(ca_dir)
    alice = devices.claim(store, devices.create_invite(store, "alice", expires_in=900).token, a := _secret())
    bob = devices.claim(store, devices.create_invite(store, "bob", expires_in=900).token, b := _secret())
    assert devices.check(store, a).name == "alice" and devices.check(store, b).name == "bob"
    assert alice.serial != bob.serial
    with pytest.raises(devices.DeviceError, match="not registered"):
        devices.check(store, _secret())
    for damaged in ("", "short", "x" * 200, "a b c d e f g h i j k l m n o p q", "<script>" * 5):
        with pytest.raises(devices.DeviceError, match="damaged"):
            devices.check(store, damaged)


def test_revoking_the_name_ends_the_device_in_what_servers_enforce(ca_dir: Path) -> None:
    store = ledger.Store(ca_dir)
    device = devices.claim(store, devices.create_invite(store, "alice", expires_in=900).token, secret := _secret())
    before = store.snapshot()
    assert ledger.serial_hex(device.serial) not in before.revoked
    (revoked,) = store.revoke("alice").certificates
    assert revoked.serial == ledger.serial_hex(device.serial)
    after = store.snapshot()
    assert after.generation != before.generation  # the servers' watchers re-read it
    assert ledger.serial_hex(device.serial) in after.revoked
    assert after.held[names.key("alice")].state == names.REVOKED
    with pytest.raises(devices.DeviceError, match="revoked"):
        devices.check(store, secret)
    with pytest.raises(ledger.StoreError, match="stays reserved"):  # and no new link for a revoked name
        devices.create_invite(store, "alice", expires_in=900)


def test_expired_cancelled_and_unknown_links(ca_dir: Path) -> None:
    clock = Clock()
    store = ledger.Store(ca_dir, clock=clock)
    old = devices.create_invite(store, "alice", expires_in=60)
    clock.now += 61
    with pytest.raises(devices.DeviceError, match="expired"):
        devices.claim(store, old.token, _secret())
    cancelled = devices.create_invite(store, "bob", expires_in=60)
    assert [i.name for i in devices.invites(store)] == ["bob"]
    assert [i.id for i in devices.cancel(store, "bob")] == [cancelled.id]
    with pytest.raises(devices.DeviceError, match="cancelled"):
        devices.claim(store, cancelled.token, _secret())
    with pytest.raises(devices.DeviceError, match="not known"):
        devices.claim(store, secrets.token_urlsafe(16), _secret())
    assert devices.invites(store) == []


def test_a_device_lives_its_days_from_its_last_use(ca_dir: Path) -> None:
    clock = Clock()
    store = ledger.Store(ca_dir, clock=clock)
    devices.claim(store, devices.create_invite(store, "alice", expires_in=60, days=30).token, secret := _secret())
    for _ in range(3):  # used every 20 days: it lives on
        clock.now += 20 * 86400
        devices.check(store, secret)
    clock.now += 31 * 86400  # a month unused
    with pytest.raises(devices.DeviceError, match="expired"):
        devices.check(store, secret)
    assert devices.create_invite(store, "alice", expires_in=60).token  # the same person may get a new link


def test_two_browsers_racing_with_one_link_get_one_device(ca_dir: Path) -> None:
    store = ledger.Store(ca_dir)
    link = devices.create_invite(store, "alice", expires_in=900)
    results: list[object] = []
    start = threading.Barrier(8)

    def race() -> None:
        start.wait()
        try:
            results.append(devices.claim(ledger.Store(ca_dir), link.token, _secret()))
        except devices.DeviceError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, devices.Device) for r in results) == 1
    assert all("already been used" in r for r in results if isinstance(r, str))
    with sqlite3.connect(ca_dir / ledger.DB_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM web_devices").fetchone() == (1,)


# -- the command lines ----------------------------------------------------------------------------


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securechat", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL)


def test_invite_web_prints_a_link_and_a_qr_code_and_lists_revokes_and_certs_show_it(ca_dir: Path) -> None:
    root = ca_dir.parent
    done = _cli(root, "invite", "alice", "--web", "--host", "192.168.0.20", "--port", "6000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Open this link in alice's browser (valid 15 minutes, once); it makes that browser alice's:"
    url = lines[1].strip()
    assert re.fullmatch(r"https://192\.168\.0\.20:6000/#invite=[A-Za-z0-9_-]{22}", url)
    assert sum("█" in line for line in lines) > 10  # the QR code, in block characters
    assert "http://192.168.0.20:6000/" in lines[-1]
    listed = _cli(root, "invite", "--list")
    assert "alice (browser link)" in listed.stdout
    # The browser uses the link: it is then listed by certs, and revoke ends it.
    device = devices.claim(ledger.Store(ca_dir), url.split("#invite=")[1], _secret())
    assert "No usable invites." in _cli(root, "invite", "--list").stdout
    listing = _cli(root, "certs").stdout
    assert "alice (browser)" in listing and ledger.serial_hex(device.serial) in listing
    revoked = _cli(root, "revoke", "alice")
    assert revoked.returncode == 0 and "Revoked alice" in revoked.stdout
    assert ledger.serial_hex(device.serial) in ledger.Store(ca_dir).snapshot().revoked


def test_invite_qr_shows_the_onboarding_page_and_makes_no_invite(ca_dir: Path) -> None:
    root = ca_dir.parent
    done = _cli(root, "invite", "--qr", "--host", "192.168.0.20")
    assert done.returncode == 0, done.stderr
    assert "http://192.168.0.20:5555/" in done.stdout.splitlines()[0]
    assert sum("█" in line for line in done.stdout.splitlines()) > 10
    fingerprint = _cli(root, "fingerprint", "certs/ca.pem").stdout.split()[-1]
    assert fingerprint in done.stdout and "https://192.168.0.20:5555/" in done.stdout
    assert "No usable invites." in _cli(root, "invite", "--list").stdout
    v6 = _cli(root, "invite", "--qr", "--host", "fd00::20", "--port", "7000")
    assert "http://[fd00::20]:7000/" in v6.stdout


@pytest.mark.parametrize("args, said", [
    (["invite", "--web"], "--web needs NAME"),
    (["invite", "alice", "--web", "--uses", "3"], "--web links work once"),
    (["invite", "alice", "--qr"], "add --web"),
    (["invite", "--list", "--qr"], "cannot be combined"),
])
def test_invite_web_and_qr_mistakes_are_one_usage_line(ca_dir: Path, args: list[str], said: str) -> None:
    done = _cli(ca_dir.parent, *args)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("securechat invite: ") and said in line


def test_invite_qr_without_a_ca_is_one_line(tmp_path: Path) -> None:
    done = _cli(tmp_path, "invite", "--qr")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("securechat invite: no certificate directory certs")


def test_a_link_follows_the_name_rule(ca_dir: Path) -> None:
    store = ledger.Store(ca_dir)
    store.create("alice")  # an ordinary invite holds the name
    with pytest.raises(ledger.StoreError, match="same nickname to the server as 'alice'"):
        devices.create_invite(store, "AIice", expires_in=900)
    with pytest.raises(ledger.StoreError, match="invalid client name"):
        devices.create_invite(store, "admin", expires_in=900)
    link = devices.create_invite(store, "bob", expires_in=900)  # bob is invited: guests may not take it
    assert store.snapshot().held[names.key("bob")].state == names.INVITED
    devices.cancel(store, "bob")
    assert names.key("bob") not in store.snapshot().held  # the invitation ended with its only link
    with pytest.raises(devices.DeviceError, match="cancelled"):
        devices.claim(store, link.token, _secret())
