"""Foundation on the lab kernel: interop with Debian's usbip/usbipd both ways,
bind/unbind, detach, errors, and junk at our usbipd.  Data is checked by
reading the exported disk on the vhci side and comparing it with its file."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from labkit import (
    USBIPX,
    assert_vhci_disk_matches,
    block_devices_under,
    driver_of,
    flood,
    free_tcp_port,
    read_block,
    usbipx,
    vhci_used_ports,
    wait_for,
)

# -- Debian's C client against usbipx usbipd ---------------------------------

def test_c_client_against_usbipx_usbipd_stub(stub_disk, daemons) -> None:
    busid, data = stub_disk
    usbipx("bind", "-b", busid)
    assert driver_of(busid) == "usbip-host"
    d = daemons("usbipd")
    out = subprocess.run(["usbip", "-t", str(d.port), "list", "-r", "127.0.0.1"],
                         capture_output=True, text=True, check=True).stdout
    assert f"{busid}: Linux Foundation" in out and "(1d6b:0104)" in out
    subprocess.run(["usbip", "-t", str(d.port), "attach", "-r", "127.0.0.1", "-b", busid],
                   check=True, capture_output=True)
    assert_vhci_disk_matches(data)
    assert Path(f"/sys/bus/usb/devices/{busid}/usbip_status").read_text().strip() == "2"
    # An exported device is hidden from the list.
    out = subprocess.run(["usbip", "-t", str(d.port), "list", "-r", "127.0.0.1"],
                         capture_output=True, text=True).stdout
    assert busid not in out
    # Debian's usbip port reads the record the C attach wrote.
    ports = subprocess.run(["usbip", "port"], capture_output=True, text=True).stdout
    assert f"usbip://127.0.0.1:{d.port}/{busid}" in ports


def test_c_client_against_usbipx_usbipd_vudc(vudc_disk, daemons) -> None:
    vudc, data = vudc_disk
    d = daemons("usbipd", "-e")
    out = subprocess.run(["usbip", "-t", str(d.port), "list", "-r", "127.0.0.1"],
                         capture_output=True, text=True, check=True).stdout
    assert f"{vudc}: Linux Foundation" in out
    subprocess.run(["usbip", "-t", str(d.port), "attach", "-r", "127.0.0.1", "-d", vudc],
                   check=True, capture_output=True)
    assert_vhci_disk_matches(data)


# -- usbipx client against Debian's C usbipd ---------------------------------

def test_usbipx_client_against_c_usbipd_stub(stub_disk, daemons) -> None:
    busid, data = stub_disk
    subprocess.run(["usbip", "bind", "-b", busid], check=True, capture_output=True)
    d = daemons("c-usbipd")
    out = usbipx("-t", str(d.port), "list", "-r", "127.0.0.1").stdout
    assert f"{busid}: Linux Foundation : Multifunction Composite Gadget (1d6b:0104)" in out
    listed = json.loads(usbipx("-t", str(d.port), "--json", "list", "-r", "127.0.0.1").stdout)
    assert [e["busid"] for e in listed] == [busid]
    res = usbipx("-t", str(d.port), "attach", "-r", "127.0.0.1", "-b", busid)
    assert "to port" in res.stdout
    assert_vhci_disk_matches(data)
    # Our record is readable by Debian's usbip port, and by ours.
    c_port = subprocess.run(["usbip", "port"], capture_output=True, text=True).stdout
    assert f"-> usbip://127.0.0.1:{d.port}/{busid}" in c_port
    ours = json.loads(usbipx("port", "--json").stdout)
    assert len(ours) == 1 and ours[0]["remote_busid"] == busid
    assert ours[0]["id_vendor"] == "1d6b"
    text = usbipx("port").stdout
    assert f"usbip://127.0.0.1:{d.port}/{busid}" in text and "High Speed(480Mbps)" in text
    # detach frees the port and the device side gets its device back.
    port = ours[0]["port"]
    usbipx("detach", "-p", str(port))
    assert vhci_used_ports() == []
    assert not Path(f"/var/run/vhci_hcd/port{port}").exists()
    wait_for(lambda: Path(f"/sys/bus/usb/devices/{busid}/usbip_status").read_text().strip()
             == "1", what="the stub device to be available again")


def test_usbipx_client_against_c_usbipd_vudc(vudc_disk, daemons) -> None:
    vudc, data = vudc_disk
    d = daemons("c-usbipd", "-e")
    out = usbipx("-t", str(d.port), "list", "-r", "127.0.0.1").stdout
    assert f"{vudc}: Linux Foundation" in out
    usbipx("-t", str(d.port), "attach", "-r", "127.0.0.1", "-d", vudc)
    assert_vhci_disk_matches(data)


# -- usbipx end to end, bind/unbind, errors -----------------------------------

def test_bind_unbind_restores_original_driver(stub_disk) -> None:
    busid, data = stub_disk
    before = driver_of(busid)
    assert before == "usb"
    local = json.loads(usbipx("list", "-l", "--json").stdout)
    assert any(d["busid"] == busid and d["driver"] == "usb" and d["num_interfaces"] == 1
               for d in local)
    usbipx("bind", "-b", busid)
    assert driver_of(busid) == "usbip-host"
    assert f"{busid} " in Path("/sys/bus/usb/drivers/usbip-host/match_busid").read_text()
    res = usbipx("bind", "-b", busid, check=False)
    assert res.returncode != 0 and "already bound" in res.stderr
    usbipx("unbind", "-b", busid)
    assert driver_of(busid) == before
    assert busid not in Path("/sys/bus/usb/drivers/usbip-host/match_busid").read_text()
    # The local disk works again on the original driver.
    disk = wait_for(lambda: block_devices_under("dummy_hcd.0"), what="the local disk again")[0]
    assert read_block(disk, len(data)) == data


def test_usbipx_end_to_end_and_detach(stub_disk, daemons) -> None:
    busid, data = stub_disk
    usbipx("bind", "-b", busid)
    d = daemons("usbipd")
    usbipx("-t", str(d.port), "attach", "-r", "127.0.0.1", "-b", busid)
    assert_vhci_disk_matches(data)
    (port, _), = vhci_used_ports()
    usbipx("detach", "-p", str(port))
    assert vhci_used_ports() == []
    # As Debian's usbip: detaching a free port again is "already detached", status 0.
    res = usbipx("detach", "-p", str(port), check=False)
    assert res.returncode == 0 and "already detached" in res.stdout, res


@pytest.mark.parametrize(("args", "needle"), [
    (["bind", "-b", "9-9"], "no USB device with bus id 9-9"),
    (["bind", "-b", "../../etc"], "bad bus id"),
    (["unbind", "-b", "1-1"], "not bound to usbip-host"),
    (["attach", "-r", "127.0.0.1", "-b", "1-1"], "cannot connect"),
    (["detach", "-p", "999"], "vhci_hcd has no port 999"),
    (["list"], "choose exactly one"),
    (["usbipd", "-D", "-P", "/no/such/dir/u.pid"], "cannot open pid file /no/such/dir/u.pid"),
])
def test_errors_are_one_line_and_nonzero(stub_disk, args, needle) -> None:
    res = usbipx("-t", "1", *args, check=False)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usbipx: error:") and needle in lines[0], \
        res.stderr
    assert driver_of(stub_disk[0]) == "usb"


def test_import_of_unknown_device_is_refused(daemons) -> None:
    d = daemons("usbipd")
    res = usbipx("-t", str(d.port), "attach", "-r", "127.0.0.1", "-b", "7-7", check=False)
    assert res.returncode != 0 and "ST_NODEV" in res.stderr
    assert vhci_used_ports() == []


def test_no_root_is_a_clear_error(stub_disk) -> None:
    busid, _ = stub_disk
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          USBIPX, "bind", "-b", busid], capture_output=True, text=True)
    assert res.returncode == 77, res.stderr
    assert "are you root?" in res.stderr
    assert driver_of(busid) == "usb"


def test_failed_attach_leaves_no_port(stub_disk, daemons) -> None:
    """The kernel attaches, but the port record cannot be written: roll back."""
    busid, _ = stub_disk
    usbipx("bind", "-b", busid)
    d = daemons("usbipd")
    state = Path("/var/run/vhci_hcd")
    if state.is_dir():
        for f in state.iterdir():
            f.unlink()
        state.rmdir()
    state.write_text("not a directory")
    try:
        res = usbipx("-t", str(d.port), "attach", "-r", "127.0.0.1", "-b", busid, check=False)
    finally:
        state.unlink()
    assert res.returncode != 0 and "could not record" in res.stderr
    assert vhci_used_ports() == []
    wait_for(lambda: Path(f"/sys/bus/usb/devices/{busid}/usbip_status").read_text().strip()
             == "1", what="the exported device to come back")


def test_missing_module_is_named(stub_disk) -> None:
    busid, _ = stub_disk
    subprocess.run(["rmmod", "usbip-host"], check=True)
    try:
        res = usbipx("bind", "-b", busid, check=False)
        assert res.returncode != 0
        assert "kernel module usbip-host is not loaded" in res.stderr
        assert driver_of(busid) == "usb"
        res = usbipx("usbipd", check=False)
        assert res.returncode != 0 and "usbip-host" in res.stderr
    finally:
        subprocess.run(["modprobe", "usbip-host"], check=True)


# -- junk at usbipd --------------------------------------------------------------

def test_usbipd_survives_1000_bad_pdus_without_fd_growth(stub_disk, daemons) -> None:
    busid, _ = stub_disk
    usbipx("bind", "-b", busid)
    d = daemons("usbipd")
    dev = bytes(312)
    valid = [
        struct.pack(">HHI", 0x0111, 0x8005, 0),
        struct.pack(">HHI", 0x0111, 0x8003, 0) + b"1-1".ljust(32, b"\0"),
        struct.pack(">HHI", 0x0111, 0x8006, 0) + dev,
        struct.pack(">HHI", 0x0111, 0x8007, 0) + dev,
    ]
    # Warm up, then measure descriptors.
    usbipx("-t", str(d.port), "list", "-r", "127.0.0.1")
    fds_before = d.fds()
    def still_serving() -> None:
        out = usbipx("-t", str(d.port), "--json", "list", "-r", "127.0.0.1").stdout
        assert [e["busid"] for e in json.loads(out)] == [busid]

    t0 = time.monotonic()
    sent = flood(d.port, valid, 1200, during=still_serving)  # with stalled clients connected
    assert d.alive()
    still_serving()
    wait_for(lambda: d.fds() <= fds_before, 10, what="fd count to settle")
    assert vhci_used_ports() == []
    print(f"{sent} bad PDUs in {time.monotonic() - t0:.1f} s; fds {fds_before} -> {d.fds()}")
    assert os.path.exists(f"/proc/{d.proc.pid}")


# -- usbipd as a daemon ----------------------------------------------------------

def test_usbipd_detached_with_relative_pid_and_log_files(stub_disk, tmp_path: Path) -> None:
    """-D -P/--log-file relative to the caller's directory: the pid file names the live
    daemon, Debian's client is served, SIGTERM ends it and removes the pid file."""
    busid, data = stub_disk
    usbipx("bind", "-b", busid)
    port = free_tcp_port()
    res = subprocess.run([USBIPX, "usbipd", "-D", "-t", str(port), "-P", "u.pid",
                          "--log-file", "u.log"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    pid = int((tmp_path / "u.pid").read_text())

    def running() -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    try:
        assert running()
        out = subprocess.run(["usbip", "-t", str(port), "list", "-r", "127.0.0.1"],
                             capture_output=True, text=True, check=True).stdout
        assert f"{busid}: Linux Foundation" in out
        subprocess.run(["usbip", "-t", str(port), "attach", "-r", "127.0.0.1", "-b", busid],
                       check=True, capture_output=True)
        assert_vhci_disk_matches(data)
        assert f"usbipd listening on tcp://0.0.0.0:{port}" in (tmp_path / "u.log").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not running(), 10, what="usbipd to end")
    assert not (tmp_path / "u.pid").exists()
    assert "usbipd stopped" in (tmp_path / "u.log").read_text()
