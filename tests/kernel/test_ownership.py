"""Device ownership on the real kernel: what we bound we give back, what others bound stays.

Debian's ``usbip bind`` stands for "someone else": a device it bound before
usbipx came must still be on usbip-host when usbipx is done with it.
"""

from __future__ import annotations

from pathlib import Path

from labkit import (
    assert_vhci_disk_matches,
    driver_of,
    make_disk,
    mass_storage_gadget,
    sh,
    stub_status,
    usb_busid_on_udc,
    usbipx,
    vhci_used_ports,
    wait_for,
)
from test_supervisor import Supervisor, vhci_disks_match


def usb_disk(tmp: Path, udc: str, name: str) -> tuple[str, bytes]:
    backing = tmp / f"{name}.img"
    data = make_disk(backing, 2)
    mass_storage_gadget(name, backing, udc)
    busid = usb_busid_on_udc(udc)
    wait_for(lambda: driver_of(busid) == "usb", what=f"{busid} to enumerate")
    return busid, data


def test_supervisor_gives_back_only_what_it_bound(tmp_path: Path, daemons) -> None:
    theirs, theirs_data = usb_disk(tmp_path, "dummy_udc.0", "theirs")
    ours, ours_data = usb_disk(tmp_path, "dummy_udc.1", "ours")
    sh("usbip", "bind", "-b", theirs)  # Debian's tool: bound before the supervisor came
    assert driver_of(theirs) == "usbip-host"
    usbipa = daemons("usbipa")
    sup = Supervisor(tmp_path, "127.0.0.1", usbipa.port,
                     [f'[[export]]\nbusid = "{theirs}"\n', f'[[export]]\nbusid = "{ours}"\n'])
    try:
        sup.wait_state(f"busid:{theirs}", "exported")
        sup.wait_state(f"busid:{ours}", "exported")
        vhci_disks_match([theirs_data, ours_data])
    finally:
        assert sup.stop() == 0, sup.output()
    assert vhci_used_ports() == []
    assert driver_of(theirs) == "usbip-host"  # still where Debian's usbip put it ...
    wait_for(lambda: stub_status(theirs) == "1", what=f"{theirs} to be available again")
    assert driver_of(ours) == "usb"  # ... and ours back on its own driver
    assert "Traceback" not in sup.output()
    sh("usbip", "unbind", "-b", theirs)


def test_disconnect_leaves_a_device_bound_by_usbip_bind(tmp_path: Path, daemons) -> None:
    busid, data = usb_disk(tmp_path, "dummy_udc.0", "prebound")
    sh("usbip", "bind", "-b", busid)
    usbipa = daemons("usbipa")
    usbipx("-t", str(usbipa.port), "connect", "-r", "127.0.0.1", "-b", busid)
    assert_vhci_disk_matches(data)
    usbipx("-t", str(usbipa.port), "disconnect", "-r", "127.0.0.1", "-b", busid)
    wait_for(lambda: vhci_used_ports() == [], what="the vhci port to be free")
    assert driver_of(busid) == "usbip-host"
    wait_for(lambda: stub_status(busid) == "1", what=f"{busid} to be available again")
    sh("usbip", "unbind", "-b", busid)
    assert driver_of(busid) == "usb"
