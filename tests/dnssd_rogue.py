"""A rogue on the LAN, for tests: it announces ``_securechat._tcp`` with a copied TXT record and relays.

``python -m tests.dnssd_rogue --listen ADDR --target HOST:PORT --ca FINGERPRINT`` listens on ADDR with
a TLS certificate of its own CA (offering the enrollment ALPN, so a joiner cannot tell it by protocol),
relays every line to the real server at HOST:PORT over TLS and back, and registers itself with zeroconf
as a securechat server whose TXT claims the real server's CA fingerprint. It prints ``READY PORT`` once
registered and runs until killed. Run it only inside a test's own network namespace.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time

import trustme

from securechat.pki import enrollment
from securechat.wire import addr, dnssd


def relay(joiner: ssl.SSLSocket, target: tuple[str, int]) -> None:
    """Line by line, request then answer, as the enrollment exchange goes."""
    out = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    out.check_hostname, out.verify_mode = False, ssl.CERT_NONE
    out.set_alpn_protocols([enrollment.ALPN])
    try:
        with joiner, out.wrap_socket(socket.create_connection(target, timeout=10)) as upstream:
            a, b = joiner.makefile("rwb"), upstream.makefile("rwb")
            while line := a.readline(65536):
                b.write(line)
                b.flush()
                answer = b.readline(65536)
                if not answer:
                    return
                a.write(answer)
                a.flush()
    except (OSError, ValueError):
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--ca", required=True, help="the fingerprint to claim")
    p.add_argument("--name", default="rogue")
    args = p.parse_args()
    host, port = addr.split_host_port(args.target)
    assert port is not None
    cert = trustme.CA().issue_cert("rogue.local", args.listen)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    ctx.set_alpn_protocols([enrollment.ALPN])
    listener = socket.create_server((args.listen, 0))
    rogue_port = listener.getsockname()[1]

    def accept() -> None:
        while True:
            raw, _ = listener.accept()
            try:
                joiner = ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):  # a chat client that refused our certificate: as expected
                raw.close()
                continue
            threading.Thread(target=relay, args=(joiner, (host, port)), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    zeroconf = dnssd.import_zeroconf()
    zc = zeroconf.Zeroconf(interfaces=[args.listen], ip_version=zeroconf.IPVersion.V4Only)
    txt = dnssd.Txt(ca=args.ca, invites=True).encode()
    info = zeroconf.ServiceInfo(dnssd.SERVICE_TYPE, f"{args.name}.{dnssd.SERVICE_TYPE}", port=rogue_port,
                                properties=txt, server=f"{args.name}.local.", parsed_addresses=[args.listen])
    zc.register_service(info, allow_name_change=True)
    print(f"READY {rogue_port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        zc.close()


if __name__ == "__main__":
    sys.exit(main())
