"""Mutual TLS on the lab kernel: exports and imports over tls://, kernel TLS and the relay,
certificate identities, refusals, junk at the TLS listener, and the relay's end.

Every certificate comes from ``usbipx pki`` (an expired one is made with the
``cryptography`` package directly).  Disks are read back byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labkit import (
    HOSTNAME,
    SERVER_IP,
    assert_vhci_disk_matches,
    creds,
    driver_of,
    free_tcp_port,
    in_ns,
    link_cut,
    link_restore,
    make_disk,
    mass_storage_gadget,
    netns_up,
    stub_status,
    tls_stat,
    usb_busid_on_udc,
    usbipx,
    vhci_used_ports,
    vudc_status,
    wait_for,
)


def tls_daemon(daemons, kind: str, pki: dict[str, Path], *extra: str, cert: str = "server"):
    return daemons(kind, "--listen", "tls://127.0.0.1", *creds(pki, cert), *extra)


def relay_bytes(metrics: str) -> dict[str, float]:
    """``usbipx_relay_bytes_total`` of the supervisor serving metrics at ``metrics``
    in the board's namespace, by direction (0 for one never counted)."""
    fetch = ("import sys, urllib.request\n"
             "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
    out = subprocess.run(in_ns("board", [sys.executable, "-c", fetch,
                                         f"http://{metrics}/metrics"]),
                         capture_output=True, text=True, check=True).stdout
    got = {"to_network": 0.0, "to_kernel": 0.0}
    for line in out.splitlines():
        if line.startswith("usbipx_relay_bytes_total{"):
            direction = line.split('direction="')[1].split('"')[0]
            got[direction] = float(line.rsplit(" ", 1)[1])
    return got


def port_transport() -> str:
    out = usbipx("port").stdout
    return next(line.split("transport ")[1].split(",")[0].strip() for line in out.splitlines()
                if "transport " in line)


# -- the basic operations ---------------------------------------------------------

@pytest.mark.parametrize("data_path", ["auto", "relay"])
def test_connect_disconnect_stub_over_tls(stub_disk, daemons, pki, data_path) -> None:
    busid, data = stub_disk
    before = tls_stat()  # cumulative since boot: other tests make decrypt errors on purpose
    # Each end chooses its own data path; here both make the same choice.
    a = tls_daemon(daemons, "usbipa", pki, "--tls-data", data_path)
    res = usbipx("-t", str(a.port), "connect", "-r", f"tls://{HOSTNAME}", "-b", busid,
                 "--tls-data", data_path, *creds(pki, "board-1"))
    want = "ktls" if data_path == "auto" else "tls-relay"
    assert f"({want})" in res.stdout, res.stdout
    assert_vhci_disk_matches(data)
    assert port_transport() == want
    if want == "ktls":
        st = tls_stat()  # both ends live in this VM: two kernel TLS sockets
        assert st["TlsCurrTxSw"] >= 2 and st["TlsCurrRxSw"] >= 2, st
        assert st["TlsDecryptError"] == before["TlsDecryptError"]
    assert "identity board-1" in usbipx("port").stdout
    usbipx("-t", str(a.port), "disconnect", "-r", f"tls://{HOSTNAME}", "-b", busid,
           *creds(pki, "board-1"))
    wait_for(lambda: vhci_used_ports() == [], what="the vhci port to be free")
    assert driver_of(busid) == "usb"
    assert "Traceback" not in a.output()


def test_connect_disconnect_vudc_over_tls(vudc_disk, daemons, pki) -> None:
    vudc, data = vudc_disk
    a = tls_daemon(daemons, "usbipa", pki)
    usbipx("-t", str(a.port), "connect", "-r", f"tls://{HOSTNAME}", "-b", vudc, "-d",
           *creds(pki, "board-1"))
    assert_vhci_disk_matches(data)
    usbipx("-t", str(a.port), "disconnect", "-r", f"tls://{HOSTNAME}", "-b", vudc, "-d",
           *creds(pki, "board-1"))
    wait_for(lambda: vhci_used_ports() == [], what="the vhci port to be free")
    wait_for(lambda: vudc_status(vudc) == "1", what="the vUDC to be available again")


@pytest.mark.parametrize("data_path", ["auto", "relay"])
def test_attach_from_a_tls_usbipd(stub_disk, daemons, pki, data_path) -> None:
    busid, data = stub_disk
    usbipx("bind", "-b", busid)
    d = tls_daemon(daemons, "usbipd", pki)
    listed = usbipx("-t", str(d.port), "--json", "list", "-r", f"tls://{HOSTNAME}",
                    *creds(pki, "board-1")).stdout
    assert busid in listed
    res = usbipx("-t", str(d.port), "attach", "-r", f"tls://{HOSTNAME}", "-b", busid,
                 "--tls-data", data_path, *creds(pki, "board-1"))
    assert ("ktls" if data_path == "auto" else "tls-relay") in res.stdout
    assert_vhci_disk_matches(data)
    (port, _), = vhci_used_ports()
    usbipx("detach", "-p", str(port))
    wait_for(lambda: stub_status(busid) == "1", what=f"{busid} to be available again")
    usbipx("unbind", "-b", busid)


# -- refusals: nothing attached, one line each ------------------------------------------

def _connect(a, pki, busid: str, cred: list[str], host: str = HOSTNAME):
    return usbipx("-t", str(a.port), "connect", "-r", f"tls://{host}", "-b", busid, *cred,
                  check=False)


def test_refusals_leave_nothing_attached(stub_disk, daemons, pki, tmp_path: Path) -> None:
    busid, _ = stub_disk
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\naction = "deny"\nidentity = "kiosk-*"\n')
    a = tls_daemon(daemons, "usbipa", pki, "--policy", str(policy))
    cases = {
        "another CA": creds(pki, "board-1", ca="other"),
        "expired": creds(pki, "old-board"),
        "identity not allowed": creds(pki, "kiosk-1"),
    }
    for what, cred in cases.items():
        res = _connect(a, pki, busid, cred)
        assert res.returncode != 0, what
        assert len(res.stderr.strip().splitlines()) == 1, (what, res.stderr)
        assert vhci_used_ports() == [], what
        assert driver_of(busid) == "usb", what  # a device connect bound goes back
    # The board checks the server's name: a certificate for another name is refused.
    b = tls_daemon(daemons, "usbipa", pki, cert="wrongname")
    res = _connect(b, pki, busid, creds(pki, "board-1"))
    assert res.returncode != 0 and "certificate" in res.stderr.lower(), res.stderr
    # No client certificate at all: refused in the handshake, before any PDU.
    ctx = ssl.create_default_context(cafile=str(pki["ca"] / "ca.crt"))
    with socket.create_connection(("127.0.0.1", a.port)) as raw, \
            contextlib.suppress(ssl.SSLError, OSError):
        s = ctx.wrap_socket(raw, server_hostname=HOSTNAME)
        s.sendall(b"\x01\x11\x80\x06" + b"\0" * 316)
        assert s.recv(1) == b""  # the server hangs up (or its alert raises)
    wait_for(lambda: "TLS handshake failed" in a.output(), what="the failed handshake logged")
    assert vhci_used_ports() == []
    log = a.output()
    assert "kiosk-1" in log and "denied by rule" in log
    assert "Traceback" not in log


def test_unexport_from_another_identity_is_refused(stub_disk, daemons, pki) -> None:
    busid, data = stub_disk
    a = tls_daemon(daemons, "usbipa", pki)
    usbipx("-t", str(a.port), "connect", "-r", f"tls://{HOSTNAME}", "-b", busid,
           *creds(pki, "board-1"))
    res = usbipx("-t", str(a.port), "disconnect", "-r", f"tls://{HOSTNAME}", "-b", busid,
                 *creds(pki, "board-2"), check=False)
    assert res.returncode != 0
    assert len(vhci_used_ports()) == 1
    assert_vhci_disk_matches(data)
    usbipx("-t", str(a.port), "disconnect", "-r", f"tls://{HOSTNAME}", "-b", busid,
           *creds(pki, "board-1"))
    wait_for(lambda: vhci_used_ports() == [], what="the vhci port to be free")


def test_c_tools_against_a_tls_listener_fail_cleanly(daemons, pki) -> None:
    d = tls_daemon(daemons, "usbipd", pki)
    res = subprocess.run(["usbip", "-t", str(d.port), "list", "-r", "127.0.0.1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    wait_for(lambda: "TLS handshake failed" in d.output(), what="the failed handshake logged")
    assert d.alive() and "Traceback" not in d.output()


def test_junk_at_the_tls_listener(daemons, pki) -> None:
    """1 000 random byte streams and truncated ClientHellos: the listener keeps serving
    and leaks no descriptor."""
    a = tls_daemon(daemons, "usbipa", pki, "--max-per-address", "256")
    hello = _client_hello(a.port)
    rng = random.Random(7)
    before = a.fds()
    for n in range(1000):
        s = socket.create_connection(("127.0.0.1", a.port))
        data = (rng.randbytes(rng.randrange(1, 600)) if n % 2
                else hello[: rng.randrange(1, len(hello))])
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            s.recv(4096)
        s.close()
    wait_for(lambda: a.fds() <= before, what="the daemon's descriptors back to before")
    listed = usbipx("-t", str(a.port), "list", "-r", f"tls://{HOSTNAME}",
                    *creds(pki, "board-1"), check=False)
    assert "ST_NA" in listed.stderr  # usbipa answers (it lists nothing): still serving
    assert a.alive() and "Traceback" not in a.output()


def _client_hello(port: int) -> bytes:
    """The first flight of a real TLS client (captured through a socketpair)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=HOSTNAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


# -- the relay's end and link loss --------------------------------------------------

def _relay_pids() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmd = (p / "cmdline").read_bytes().split(b"\0")
                if any(b"usbipx" in c for c in cmd) and b"connect" in cmd:
                    out.append(int(p.name))
    return out


def test_killing_the_relay_frees_the_port_and_the_device(stub_disk, daemons, pki) -> None:
    busid, data = stub_disk
    a = tls_daemon(daemons, "usbipa", pki)
    usbipx("-t", str(a.port), "connect", "-r", f"tls://{HOSTNAME}", "-b", busid,
           "--tls-data", "relay", *creds(pki, "board-1"))
    assert_vhci_disk_matches(data)
    (relay,) = _relay_pids()
    t0 = time.monotonic()
    os.kill(relay, signal.SIGKILL)
    wait_for(lambda: vhci_used_ports() == [], 20, what="the application-side port freed")
    wait_for(lambda: stub_status(busid) == "1", 20 - (time.monotonic() - t0),
             what="the device available again")
    print(f"relay killed: port freed and device available in {time.monotonic() - t0:.1f} s")
    usbipx("unbind", "-b", busid)


@pytest.mark.parametrize("data_path", ["auto", "relay"])
def test_supervisor_over_tls_survives_a_cut_link(tmp_path: Path, daemons, pki,
                                                  data_path) -> None:
    from test_supervisor import Supervisor

    netns_up(firewall=True)
    backing = tmp_path / "disk.img"
    data = make_disk(backing, 2)
    mass_storage_gadget("tlsdisk", backing, "dummy_udc.0")
    busid = usb_busid_on_udc("dummy_udc.0")
    wait_for(lambda: driver_of(busid) == "usb", what="the disk")
    a = daemons("usbipa", "--listen", "tls://0.0.0.0", *creds(pki, "server-ns"),
                ns="server")
    d = pki["ca"]
    metrics = f"127.0.0.1:{free_tcp_port()}"
    sup = Supervisor(
        tmp_path, SERVER_IP, a.port, [f'[[export]]\nbusid = "{busid}"\n'], ns="board",
        server_section=(f'url = "tls://{SERVER_IP}:{a.port}"\ncert = "{d}/board-1.crt"\n'
                        f'key = "{d}/board-1.key"\nca = "{d}/ca.crt"\n'
                        f'tls_data = "{data_path}"\n'), args=("--metrics", metrics))
    try:
        key = f"busid:{busid}"
        e = sup.wait_state(key, "exported", 60)
        assert e["transport"] == ("ktls" if data_path == "auto" else "tls-relay"), e
        assert_vhci_disk_matches(data)
        # The worker is the relay: the supervisor counts what it moved (the disk went
        # to the network, the commands came from it); kernel TLS relays nothing.
        if data_path == "relay":  # told on the worker's watch beat
            counted = wait_for(lambda: (c := relay_bytes(metrics))["to_network"] >= len(data)
                               and c, 10, 0.5, "the relayed bytes in the metrics")
            assert counted["to_kernel"] > 0, counted
        else:
            assert relay_bytes(metrics) == {"to_network": 0.0, "to_kernel": 0.0}
        link_cut("board")
        t0 = time.monotonic()
        wait_for(lambda: vhci_used_ports() == [], 20, 0.2, "the application side to notice")
        sup.wait_state(key, "backoff", 20 - (time.monotonic() - t0))
        print(f"link cut: loss noticed by both sides within {time.monotonic() - t0:.1f} s")
        time.sleep(max(0.0, 30 - (time.monotonic() - t0)))
        link_restore("board")
        t1 = time.monotonic()
        sup.wait_state(key, "exported", 5)
        print(f"link back: re-exported in {time.monotonic() - t1:.1f} s")
        assert_vhci_disk_matches(data)
    finally:
        assert sup.stop() == 0, sup.output()
    assert driver_of(busid) == "usb"
