"""Exporting from the device side on the lab kernel: connect/disconnect to usbipa,
16 concurrent exports, the firewall case in network namespaces, refusals,
dead links and junk at usbipa.  Data is checked by reading the disks back."""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from labkit import (
    BOARD_IP,
    SERVER_IP,
    assert_vhci_disk_matches,
    driver_of,
    flood,
    link_cut,
    link_restore,
    netns_up,
    records,
    stub_status,
    usbipx,
    vhci_used_ports,
    vudc_status,
    wait_for,
)

from usbipx import protocol as p

# -- the basic operation, both modes -------------------------------------------

def test_connect_disconnect_stub(stub_disk, daemons) -> None:
    busid, data = stub_disk
    a = daemons("usbipa")
    res = usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid)
    assert f"exported {busid}" in res.stdout
    assert driver_of(busid) == "usbip-host" and stub_status(busid) == "2"
    assert_vhci_disk_matches(data)
    (port, _), = vhci_used_ports()
    assert records()[port].split()[0] == "127.0.0.1" and records()[port].split()[2] == busid
    # Both our port listing and Debian's read usbipa's record.
    c_port = subprocess.run(["usbip", "port"], capture_output=True, text=True).stdout
    assert f"/{busid}" in c_port and "usbip://127.0.0.1:" in c_port
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid)
    assert vhci_used_ports() == []
    assert records() == {}
    assert driver_of(busid) == "usb"  # back on its original driver


def test_connect_disconnect_vudc(vudc_disk, daemons) -> None:
    vudc, data = vudc_disk
    a = daemons("usbipa")
    usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", vudc, "-d")
    assert vudc_status(vudc) == "2"
    assert_vhci_disk_matches(data)
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", vudc, "-d")
    assert vhci_used_ports() == []
    wait_for(lambda: vudc_status(vudc) == "1", what="the vUDC to be available again")


def test_connect_vudc_without_gadget_is_clear(daemons) -> None:
    a = daemons("usbipa")
    res = usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", "usbip-vudc.3", "-d",
                 check=False)
    assert res.returncode != 0 and "no gadget is bound to usbip-vudc.3" in res.stderr
    assert vhci_used_ports() == []


def test_connect_to_nobody_restores_driver(stub_disk) -> None:
    busid, _ = stub_disk
    res = usbipx("-t", "1", "connect", "-r", "127.0.0.1", "-b", busid, check=False)
    assert res.returncode != 0 and "cannot connect" in res.stderr
    assert driver_of(busid) == "usb"


# -- the firewall case ------------------------------------------------------------

def test_board_behind_firewall_can_connect_but_not_be_attached(stub_disk, daemons) -> None:
    busid, data = stub_disk
    netns_up(firewall=True)
    a = daemons("usbipa", ns="server", host=SERVER_IP)
    # The application side cannot reach a usbipd on the board: inbound TCP is dropped.
    d = daemons("usbipd", ns="board", host=BOARD_IP)
    usbipx("bind", "-b", busid)
    res = usbipx("-t", str(d.port), "attach", "-r", BOARD_IP, "-b", busid, ns="server",
                 check=False)
    assert res.returncode != 0 and "cannot connect" in res.stderr
    assert vhci_used_ports() == []
    # The board connects out instead.
    usbipx("-t", str(a.port), "connect", "-r", SERVER_IP, "-b", busid, ns="board")
    assert_vhci_disk_matches(data)
    (port, _), = vhci_used_ports()
    assert records()[port].split()[0] == BOARD_IP
    usbipx("-t", str(a.port), "disconnect", "-r", SERVER_IP, "-b", busid, ns="board")
    assert vhci_used_ports() == []


def test_dead_link_is_noticed_by_both_kernels_within_20s(stub_disk, daemons) -> None:
    busid, data = stub_disk
    netns_up(firewall=False)
    a = daemons("usbipa", ns="server", host=SERVER_IP)
    usbipx("-t", str(a.port), "connect", "-r", SERVER_IP, "-b", busid, ns="board")
    assert_vhci_disk_matches(data)
    link_cut("board")
    t0 = time.monotonic()
    try:
        wait_for(lambda: not vhci_used_ports() and stub_status(busid) == "1", 30, 0.5,
                 "both sides to drop the dead connection")
    finally:
        link_restore("board")
    took = time.monotonic() - t0
    print(f"dead link noticed after {took:.1f} s")
    assert took <= 20


# -- refusals -------------------------------------------------------------------

def test_peer_outside_allow_is_refused(stub_disk, daemons) -> None:
    """Refused at accept, before the request is read: the board sees the connection
    closed without a reply, and a reason that points at --allow."""
    busid, _ = stub_disk
    a = daemons("usbipa", "--allow", "10.99.0.0/16")
    res = usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid, check=False)
    assert res.returncode != 0
    assert "closed by peer before the reply" in res.stderr and "--allow" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert vhci_used_ports() == [] and driver_of(busid) == "usb"
    assert ("refused connection from 127.0.0.1: peer is outside the allowed networks"
            in a.output())


def test_idle_connections_from_a_refused_address_do_not_lock_out_a_board(
        stub_disk, daemons) -> None:
    """500 idle connections from 127.0.0.2, outside --allow, held open while the allowed
    board (127.0.0.1) exports its disk: each is closed at accept and takes no slot."""
    busid, data = stub_disk
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    a = daemons("usbipa", "--allow", "127.0.0.1/32")
    held: list[socket.socket] = []
    try:
        for _ in range(500):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", a.port))
        usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid)
        assert_vhci_disk_matches(data)
        for s in held[::50]:  # closed by usbipa without a byte
            s.settimeout(5)
            assert s.recv(1) == b""
    finally:
        for s in held:
            s.close()
    assert a.alive()
    (port, _), = vhci_used_ports()
    assert records()[port].split()[0] == "127.0.0.1"
    refusals = [line for line in a.output().splitlines()
                if "refused connection from 127.0.0.2" in line]
    assert 1 <= len(refusals) <= 3  # the 1st, 10th and 100th: a flood does not flood the log
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid)
    assert vhci_used_ports() == []


def test_a_second_export_of_a_live_busid_does_not_kick_the_first(stub_disk, daemons) -> None:
    """Two boards behind one address both export 1-1: the second is refused (ST_DEV_BUSY)
    and the first board's disk stays attached and readable."""
    busid, data = stub_disk
    a = daemons("usbipa")
    usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid)
    assert_vhci_disk_matches(data)
    before = vhci_used_ports()
    rep = _raw(a.port, "127.0.0.1", p.ExportRequest(_record_of(busid)))
    assert rep.status == p.Status.ST_DEV_BUSY
    assert vhci_used_ports() == before
    assert_vhci_disk_matches(data)
    assert f"already attached on vhci port {before[0][0]} and alive" in a.output()
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid)
    assert vhci_used_ports() == []


def test_denied_device_is_refused(stub_disk, daemons, tmp_path: Path) -> None:
    busid, _ = stub_disk
    pol = tmp_path / "policy.toml"
    pol.write_text('allow = ["127.0.0.0/8"]\n[[rule]]\naction = "deny"\n'
                   "vendor = 0x1d6b\nproduct = 0x0104\n")
    a = daemons("usbipa", "--policy", str(pol))
    res = usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid, check=False)
    assert res.returncode != 0 and "refused" in res.stderr
    assert vhci_used_ports() == [] and driver_of(busid) == "usb"
    assert "denied by rule 'deny vendor 1d6b product 0104'" in a.output()


def test_per_peer_limit(stub_disk, vudc_disk, daemons) -> None:
    busid, _ = stub_disk
    vudc, _ = vudc_disk
    a = daemons("usbipa", "--max-per-peer", "1")
    usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid)
    res = usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", vudc, check=False)
    assert res.returncode != 0 and "ST_NA" in res.stderr
    assert len(vhci_used_ports()) == 1
    assert "limit 1" in a.output()


def _raw(port: int, source: str, req: p.Request) -> p.Reply:
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)) as s:
        s.sendall(req.pack())
        dec = p.ReplyDecoder(req)
        while (rep := dec.next_event()) is None:
            dec.receive_data(s.recv(dec.needed()))
    return rep


def _record_of(busid: str) -> p.UsbDevice:
    """The device record a board would send for local device ``busid``."""
    record = json.loads(usbipx("list", "-l", "--json").stdout)
    dev = next(d for d in record if d["busid"] == busid)
    return p.UsbDevice(dev["path"], busid, dev["busnum"], dev["devnum"], p.Speed.HIGH,
                       0x1D6B, 0x0104, 0x0100)


def test_unexport_from_another_address_is_refused(stub_disk, daemons) -> None:
    busid, data = stub_disk
    a = daemons("usbipa")
    usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid)
    rec = _record_of(busid)
    rep = _raw(a.port, "127.0.0.2", p.UnexportRequest(rec))
    assert rep.status == p.Status.ST_NA
    assert len(vhci_used_ports()) == 1
    assert_vhci_disk_matches(data)
    assert "exported by another peer" in a.output()
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid)
    assert vhci_used_ports() == []


def test_unexport_of_unknown_device_is_nodev(stub_disk, daemons) -> None:
    busid, _ = stub_disk
    a = daemons("usbipa")
    usbipx("bind", "-b", busid)
    res = usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid, check=False)
    assert res.returncode != 0 and "ST_NODEV" in res.stderr
    assert driver_of(busid) == "usbip-host"  # nothing changed locally without --force
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid, "--force")
    # Bound by the user (`usbipx bind`), not by connect: it stays bound until `unbind`.
    assert driver_of(busid) == "usbip-host" and stub_status(busid) == "1"
    usbipx("unbind", "-b", busid)
    assert driver_of(busid) == "usb"


# -- junk at usbipa -----------------------------------------------------------------

def test_usbipa_survives_1000_bad_pdus_without_leaks(stub_disk, daemons) -> None:
    busid, data = stub_disk
    a = daemons("usbipa")
    rec = p.UsbDevice("/sys/devices/platform/x", "1-1", 1, 2, p.Speed.HIGH, 1, 2, 3).pack()
    valid = [
        struct.pack(">HHI", 0x0111, 0x8006, 0) + rec,
        struct.pack(">HHI", 0x0111, 0x8007, 0) + rec,
        struct.pack(">HHI", 0x0111, 0x8005, 0),
    ]
    usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid)
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid)
    fds_before = len(os.listdir(f"/proc/{a.proc.pid}/fd"))
    t0 = time.monotonic()

    def still_serving() -> None:
        usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", busid)
        assert_vhci_disk_matches(data)
        usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", busid)

    sent = flood(a.port, valid, 1200, seed=99, during=still_serving)
    assert a.alive()
    # Junk that happened to decode as an export was attached; its connection is
    # closed, so the kernel frees those ports by itself.
    wait_for(lambda: vhci_used_ports() == [], 30, 0.5, "vhci ports to be free")
    wait_for(lambda: len(os.listdir(f"/proc/{a.proc.pid}/fd")) <= fds_before, 10,
             what="usbipa's fd count to settle")
    # A fresh export prunes the records of ports the kernel freed.
    still_serving()
    assert records() == {}
    print(f"{sent} bad PDUs at usbipa in {time.monotonic() - t0:.1f} s")


def test_ipv6_loopback_export(stub_disk, daemons) -> None:
    busid, data = stub_disk
    a = daemons("usbipa", "-6", host="::1")
    usbipx("-t", str(a.port), "connect", "-r", "::1", "-b", busid)
    assert_vhci_disk_matches(data)
    (port, _), = vhci_used_ports()
    assert records()[port].split()[0] == "::1"
    usbipx("-t", str(a.port), "disconnect", "-r", "::1", "-b", busid)


@pytest.mark.parametrize("bad", ["usbip-vudc.0", "1-1"])
def test_connect_mode_mismatch_is_clear(bad: str, daemons) -> None:
    a = daemons("usbipa")
    args = ["-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", bad]
    if bad == "1-1":
        args.append("-d")
    res = usbipx(*args, check=False)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    assert vhci_used_ports() == []
