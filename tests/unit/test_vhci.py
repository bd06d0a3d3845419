"""VhciDriver on the fake kernel built from the lab's vhci_hcd snapshots.

vhci-attached: port 0 holds the C tool's attachment of 1-1 from 127.0.0.1:3241
(``hs  0000 006 003 00010002 000003 3-1``, record ``127.0.0.1 3241 1-1``);
vhci-free: every port free.  8 controllers x (15 hs + 15 ss) = 240 ports.
"""

from __future__ import annotations

import errno

import pytest
from fakekernel import VHCI0, FakeKernel, VdevStatus, snapshot_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usbipx.errors import (
    DeviceNotFound,
    KernelError,
    ModuleNotLoaded,
    NoFreePort,
    UsbipError,
    ValidationError,
)
from usbipx.usbdevice import Speed, UsbDevice
from usbipx.vhci import STATE_DIR, PortRecord, PortStatus, VhciDriver, VhciPort, hub_for

ATTACH = f"{VHCI0}/attach"
DETACH = f"{VHCI0}/detach"


def device(speed: Speed = Speed.HIGH, busid: str = "1-1", busnum: int = 1,
           devnum: int = 2) -> UsbDevice:
    return UsbDevice(path=f"/sys/devices/platform/dummy_hcd.0/usb1/{busid}", busid=busid,
                     busnum=busnum, devnum=devnum, speed=speed, id_vendor=0x1D6B,
                     id_product=0x0104, bcd_device=0x0100)


@pytest.fixture
def vhci(kernel: FakeKernel) -> VhciDriver:
    return VhciDriver(kernel.sysfs)


def record_text(kernel: FakeKernel, port: int) -> str:
    return kernel.read(f"{STATE_DIR}/port{port}")


# -- status ---------------------------------------------------------------------

@pytest.mark.scenario("vhci_attached")
def test_parse_all_ports_of_the_captured_status(vhci: VhciDriver) -> None:
    ports = vhci.ports()
    assert vhci.nports() == 240
    assert [x.port for x in ports] == list(range(240))
    for x in ports:
        assert x.hub == ("ss" if (x.port // 15) % 2 else "hs"), x
    assert sum(x.hub == "hs" for x in ports) == sum(x.hub == "ss" for x in ports) == 120
    assert ports[0] == VhciPort(port=0, hub="hs", status=PortStatus.USED, speed=Speed.HIGH,
                                devid=0x00010002, sockfd=3, local_busid="3-1")
    assert not ports[0].free
    assert all(x.free and x.speed is Speed.UNKNOWN and x.local_busid == "0-0"
               for x in ports[1:])
    assert vhci.port(0) == ports[0]
    assert vhci.port(239).hub == "ss"


@pytest.mark.scenario("vhci_attached")
def test_fake_kernel_renders_status_as_captured(kernel: FakeKernel) -> None:
    tree = snapshot_tree("vhci_attached")
    for k in range(8):
        name = "status" if k == 0 else f"status.{k}"
        assert kernel.render_vhci_status(k) == tree[f"{VHCI0}/{name}"]["text"]


@pytest.mark.scenario("vhci_attached")
def test_port_that_does_not_exist(vhci: VhciDriver) -> None:
    with pytest.raises(DeviceNotFound, match="no port 240"):
        vhci.port(240)


@pytest.mark.parametrize(("kernel", "speed", "port"), [
    ("vhci_free", Speed.HIGH, 0),
    ("vhci_attached", Speed.HIGH, 1),
    ("vhci_attached", Speed.LOW, 1),
    ("vhci_attached", Speed.FULL, 1),
    ("vhci_free", Speed.SUPER, 15),
    ("vhci_attached", Speed.SUPER, 15),
    ("vhci_attached", Speed.SUPER_PLUS, 15),
], indirect=["kernel"])
def test_free_port(vhci: VhciDriver, speed: Speed, port: int) -> None:
    assert vhci.free_port(speed) == port


def test_hub_for() -> None:
    assert [hub_for(s) for s in Speed] == ["hs", "hs", "hs", "hs", "hs", "ss", "ss"]


@pytest.mark.scenario("vhci_free")
def test_not_assigned_port_is_not_free(kernel: FakeKernel, vhci: VhciDriver) -> None:
    """Right after attach (before enumeration) the kernel shows status 5, no details."""
    kernel.vhci_enumerates = False
    kernel.vhci_plug(0)
    assert "hs  0000 005 000 00000000 000000 0-0\n" in kernel.read(f"{VHCI0}/status")
    assert vhci.port(0).status is PortStatus.NOTASSIGNED
    assert vhci.free_port(Speed.HIGH) == 1
    assert [i.port.port for i in vhci.imported()] == [0]


@pytest.mark.scenario("host_unbound")
def test_not_loaded(kernel: FakeKernel) -> None:
    vhci = VhciDriver(kernel.sysfs)
    with pytest.raises(ModuleNotLoaded, match="vhci-hcd"):
        vhci.ports()
    with pytest.raises(ModuleNotLoaded):
        vhci.attach(3, device(), "127.0.0.1", "3240")
    assert kernel.writes == []


@pytest.mark.scenario("vhci_free")
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.integers(0, 239),
                       st.sampled_from([Speed.LOW, Speed.FULL, Speed.HIGH, Speed.SUPER]),
                       max_size=20),
       st.integers(0, 0xFFFFFFFF), st.integers(0, 999999))
def test_parser_reads_back_any_table_the_kernel_shows(kernel: FakeKernel,
                                                      table: dict[int, Speed], devid: int,
                                                      sockfd: int) -> None:
    vhci = VhciDriver(kernel.sysfs)
    used: dict[int, Speed] = {}
    for port, speed in table.items():
        # The kernel puts a device on the hub of its speed: compute where it lands.
        ctrl, rh = port // 30, port % 15
        real = ctrl * 30 + (15 if speed is Speed.SUPER else 0) + rh
        if real not in used:
            kernel.vhci_plug(port, speed=speed, devid=devid, sockfd=sockfd)
            used[real] = speed
    try:
        ports = {x.port: x for x in vhci.ports()}
        assert len(ports) == 240
        for n, x in ports.items():
            if n in used:
                assert (x.status, x.speed, x.devid, x.sockfd) == (
                    PortStatus.USED, used[n], devid, sockfd)
                assert x.hub == hub_for(used[n])
                bus = 3 + 2 * (n // 30) + (1 if x.hub == "ss" else 0)
                assert x.local_busid == f"{bus}-{n % 15 + 1}"
            else:
                assert x.free
    finally:
        for n in used:
            kernel.vhci_unplug(n)


# -- attach ---------------------------------------------------------------------

@pytest.mark.scenario("vhci_free")
def test_attach_writes_the_exact_string_and_the_record(kernel: FakeKernel,
                                                       vhci: VhciDriver) -> None:
    assert vhci.attach(3, device(), "127.0.0.1", "3240") == 0
    assert kernel.writes == [(ATTACH, "0 3 65538 3")]
    assert vhci.port(0).status is PortStatus.USED
    assert vhci.port(0).devid == 0x00010002
    assert record_text(kernel, 0) == "127.0.0.1 3240 1-1\n"
    assert vhci.read_record(0) == PortRecord("127.0.0.1", "3240", "1-1")
    [imp] = vhci.imported()
    assert (imp.port.port, imp.record) == (0, PortRecord("127.0.0.1", "3240", "1-1"))
    assert vhci.find("127.0.0.1", "1-1") == imp
    assert vhci.find("127.0.0.2", "1-1") is None


@pytest.mark.scenario("vhci_attached")
def test_attach_next_to_an_existing_one(kernel: FakeKernel, vhci: VhciDriver) -> None:
    assert vhci.attach(4, device(busid="2-1", busnum=2), "10.0.0.2", "3240") == 1
    assert kernel.writes == [(ATTACH, "1 4 131074 3")]
    assert [i.port.port for i in vhci.imported()] == [0, 1]
    assert vhci.read_record(0) == PortRecord("127.0.0.1", "3241", "1-1")  # the C tool's


@pytest.mark.scenario("vhci_free")
def test_attach_super_speed_goes_to_the_first_ss_port(kernel: FakeKernel,
                                                      vhci: VhciDriver) -> None:
    assert vhci.attach(5, device(Speed.SUPER), "host", "3240") == 15
    assert kernel.writes == [(ATTACH, "15 5 65538 5")]
    assert vhci.port(15).hub == "ss"
    assert vhci.port(15).status is PortStatus.USED
    assert vhci.port(15).local_busid == "4-1"


@pytest.mark.scenario("vhci_free")
def test_attach_of_a_vudc_device_uses_devid_0(kernel: FakeKernel, vhci: VhciDriver) -> None:
    dev = UsbDevice(path="/sys/devices/platform/usbip-vudc.0", busid="usbip-vudc.0", busnum=0,
                    devnum=0, speed=Speed.HIGH, id_vendor=0x1D6B, id_product=0x0104,
                    bcd_device=0x0100)
    assert vhci.attach(6, dev, "board", "3240") == 0
    assert kernel.writes == [(ATTACH, "0 6 0 3")]
    assert record_text(kernel, 0) == "board 3240 usbip-vudc.0\n"


@pytest.mark.scenario("vhci_free")
def test_a_port_just_freed_is_reused_last(kernel: FakeKernel, vhci: VhciDriver) -> None:
    """A link that died while the hub was enumerating its device leaves an URB behind
    on that port; attaching a new connection there at once hands the URB's unlink to
    the wrong peer and the hub waits for ever (seen in the lab after a failover).
    So the free port used longest ago is taken, ports never used first."""
    assert vhci.attach(3, device(), "127.0.0.1", "3240") == 0
    assert vhci.attach(4, device(busid="2-1", busnum=2), "127.0.0.1", "3240") == 1
    kernel.vhci_unplug(0)  # the link of port 0 dies
    assert vhci.attach(5, device(), "127.0.0.1", "3240") == 2
    kernel.vhci_unplug(1)
    kernel.vhci_unplug(2)
    vhci.prune_records()  # the records go; what they said is remembered
    assert [vhci.read_record(n) for n in (0, 1, 2)] == [None, None, None]
    hs = [p.port for p in vhci.ports() if p.hub == "hs"]
    used = [vhci.attach(6 + k, device(busid=f"{3 + k}-1", busnum=3 + k), "h", "1")
            for k in range(len(hs) - 1)]
    assert used == [*hs[3:], 0, 1]


@pytest.mark.scenario("vhci_free")
def test_a_port_another_process_used_is_reused_last(kernel: FakeKernel,
                                                    vhci: VhciDriver) -> None:
    """Two usbipa on one host, or one restarted: the dead link's record tells."""
    other = VhciDriver(kernel.sysfs)
    assert other.attach(3, device(), "127.0.0.1", "3240") == 0
    kernel.vhci_unplug(0)  # its link dies; its record stays behind
    assert vhci.attach(4, device(), "127.0.0.1", "3240") == 1
    assert vhci.prune_records() != [] and vhci.read_record(0) is None
    assert vhci.attach(5, device(busid="2-1", busnum=2), "127.0.0.1", "3240") == 2
    # With nothing known of any port, the lowest free one, as Debian's tools take.
    kernel.vhci_unplug(1)
    kernel.vhci_unplug(2)
    for n in (0, 1, 2):
        vhci.remove_record(n)
    assert VhciDriver(kernel.sysfs).attach(6, device(), "h", "1") == 0


@pytest.mark.scenario("vhci_free")
def test_attach_race_ebusy_picks_the_next_port(kernel: FakeKernel, vhci: VhciDriver) -> None:
    """Another process takes port 0 between our status read and our write."""
    kernel.before_write(ATTACH, lambda k, w: k.vhci_plug(0, devid=0x00050007, sockfd=11))
    assert vhci.attach(3, device(), "127.0.0.1", "3240") == 1
    assert kernel.writes == [(ATTACH, "0 3 65538 3"), (ATTACH, "1 3 65538 3")]
    assert [w.errno for w in kernel.log] == [errno.EBUSY, None]
    assert vhci.port(0).devid == 0x00050007  # the other process's device
    assert vhci.port(1).devid == 0x00010002
    assert vhci.read_record(1) == PortRecord("127.0.0.1", "3240", "1-1")
    assert vhci.read_record(0) is None


@pytest.mark.scenario("vhci_free")
def test_attach_race_repeated(kernel: FakeKernel, vhci: VhciDriver) -> None:
    # Each time, another process takes exactly the port we are writing.
    kernel.before_write(ATTACH, lambda k, w: k.vhci_plug(int(w.value.split()[0])), times=3)
    assert vhci.attach(3, device(), "h", "1") == 3
    assert [w.errno for w in kernel.log] == [errno.EBUSY] * 3 + [None]


@pytest.mark.scenario("vhci_free")
def test_attach_race_for_the_last_free_port(kernel: FakeKernel, vhci: VhciDriver) -> None:
    for port in range(1, 240):
        if (port // 15) % 2 == 0:
            kernel.vhci_plug(port)
    kernel.before_write(ATTACH, lambda k, w: k.vhci_plug(0))
    with pytest.raises(NoFreePort):
        vhci.attach(3, device(), "h", "1")
    assert kernel.writes == [(ATTACH, "0 3 65538 3")]
    assert not kernel.exists(f"{STATE_DIR}/port0")


@pytest.mark.scenario("vhci_free")
def test_a_port_that_stays_busy_is_skipped_not_a_refusal(kernel: FakeKernel,
                                                         vhci: VhciDriver) -> None:
    """EBUSY on a port its status shows free (another process holds it): the next free
    port is taken, never a false "no free port"."""
    kernel.fail(ATTACH, errno.EBUSY, times=2)
    assert vhci.attach(3, device(), "h", "1") == 2
    assert [w.value for w in kernel.log] == ["0 3 65538 3", "1 3 65538 3", "2 3 65538 3"]


@pytest.mark.scenario("vhci_free")
def test_a_kernel_refusing_every_port_ends_in_no_free_port(kernel: FakeKernel,
                                                           vhci: VhciDriver) -> None:
    """No endless loop: each free port is tried once, then the real "no free port"."""
    fault = kernel.fail(ATTACH, errno.EBUSY, times=1000)  # finite: a loop fails, not hangs
    with pytest.raises(NoFreePort, match="no free hs port"):
        vhci.attach(3, device(), "h", "1")
    assert fault.hits == 120  # every hs port of the 8 controllers, once


@pytest.mark.scenario("vhci_free")
def test_attach_all_hs_ports_used(kernel: FakeKernel, vhci: VhciDriver) -> None:
    for port in range(240):
        if (port // 15) % 2 == 0:
            kernel.vhci_plug(port)
    with pytest.raises(NoFreePort, match="no free hs port"):
        vhci.attach(3, device(), "127.0.0.1", "3240")
    assert kernel.writes == []
    assert vhci.attach(3, device(Speed.SUPER), "127.0.0.1", "3240") == 15  # ss still free


@pytest.mark.scenario("vhci_free")
@pytest.mark.parametrize("speed", [Speed.UNKNOWN, Speed.WIRELESS])
def test_attach_refuses_speeds_vhci_cannot_take(kernel: FakeKernel, vhci: VhciDriver,
                                                speed: Speed) -> None:
    with pytest.raises(ValidationError):
        vhci.attach(3, device(speed), "h", "1")
    assert kernel.writes == []


@pytest.mark.scenario("vhci_free")
def test_attach_super_speed_plus_is_refused_by_61_kernel(kernel: FakeKernel,
                                                         vhci: VhciDriver) -> None:
    """6.1's vhci accepts speeds 1..5 only (lab-verified: speed 6 is EINVAL)."""
    with pytest.raises(KernelError) as exc:
        vhci.attach(3, device(Speed.SUPER_PLUS), "h", "1")
    assert exc.value.errno == errno.EINVAL
    assert vhci.imported() == []
    assert not kernel.exists(f"{STATE_DIR}/port15")


@pytest.mark.scenario("vhci_free")
def test_attach_kernel_error_is_reported_with_context(kernel: FakeKernel,
                                                      vhci: VhciDriver) -> None:
    kernel.bad_sockfds.add(3)
    with pytest.raises(KernelError, match="attach 1-1 to vhci port 0") as exc:
        vhci.attach(3, device(), "h", "1")
    assert exc.value.errno == errno.EINVAL
    assert vhci.imported() == []
    assert not kernel.exists(f"{STATE_DIR}/port0")


@pytest.mark.scenario("vhci_free")
def test_record_write_failure_detaches_the_port(fs: object, kernel: FakeKernel,
                                                vhci: VhciDriver) -> None:
    """/var/run (a tmpfs) is full: the port must not stay attached without a record."""
    fs.add_mount_point(str(kernel.sysfs.path("/var/run")), total_size=8)  # type: ignore[attr-defined]
    with pytest.raises(UsbipError, match="attached to port 0 but could not record it"):
        vhci.attach(3, device(), "127.0.0.1", "3240")
    assert kernel.writes == [(ATTACH, "0 3 65538 3"), (DETACH, "0")]
    assert vhci.port(0).free
    assert vhci.read_record(0) is None
    assert kernel.sysfs.listdir(STATE_DIR) == []  # no half-written temporary left behind


@pytest.mark.scenario("vhci_free")
def test_a_state_path_that_is_not_a_directory_detaches_the_port(fs: object, kernel: FakeKernel,
                                                               vhci: VhciDriver) -> None:
    """Choosing a port reads the records only to rank ports: a state directory that is
    not one means "no records" there, and the attach fails where it must, at the record."""
    fs.create_file(str(kernel.sysfs.path(STATE_DIR)), contents="not a directory")  # type: ignore[attr-defined]
    with pytest.raises(UsbipError, match="attached to port 0 but could not record it"):
        vhci.attach(3, device(), "127.0.0.1", "3240")
    assert kernel.writes == [(ATTACH, "0 3 65538 3"), (DETACH, "0")]
    assert vhci.prune_records() == []


@pytest.mark.scenario("vhci_free")
def test_record_errors_are_usbipx_errors_naming_the_file(fs: object, kernel: FakeKernel,
                                                         vhci: VhciDriver) -> None:
    """The records go through Sysfs like every kernel-facing file: a state directory that
    is not one is a KernelError naming it, not a bare OSError."""
    fs.create_file(str(kernel.sysfs.path(STATE_DIR)), contents="not a directory")  # type: ignore[attr-defined]
    with pytest.raises(KernelError, match=f"{STATE_DIR}: EEXIST"):
        vhci.write_record(0, PortRecord("127.0.0.1", "3240", "1-1"))
    assert vhci.read_record(0) is None  # reads as "no record"
    vhci.remove_record(0)  # and there is nothing to remove


@pytest.mark.scenario("vhci_free")
def test_state_directory_is_private(kernel: FakeKernel, vhci: VhciDriver) -> None:
    vhci.write_record(4, PortRecord("127.0.0.1", "3240", "1-1"))
    assert kernel.sysfs.path(STATE_DIR).stat().st_mode & 0o777 == 0o700
    assert kernel.sysfs.listdir(STATE_DIR) == ["port4"]


@pytest.mark.scenario("vhci_free")
def test_bad_record_field_detaches_the_port(kernel: FakeKernel, vhci: VhciDriver) -> None:
    with pytest.raises(UsbipError, match="bad port record field"):
        vhci.attach(3, device(), "evil host\n1.2.3.4", "3240")
    assert kernel.writes == [(ATTACH, "0 3 65538 3"), (DETACH, "0")]
    assert vhci.imported() == []


# -- detach ---------------------------------------------------------------------

@pytest.mark.scenario("vhci_attached")
def test_detach_frees_the_port_and_removes_the_record(kernel: FakeKernel,
                                                      vhci: VhciDriver) -> None:
    assert vhci.read_record(0) is not None
    vhci.detach(0)
    assert kernel.writes == [(DETACH, "0")]
    assert vhci.port(0).free
    assert kernel.vhci_port(0).status is VdevStatus.NULL
    assert not kernel.exists(f"{STATE_DIR}/port0")
    assert vhci.imported() == []


@pytest.mark.scenario("vhci_attached")
def test_detach_of_a_free_port(kernel: FakeKernel, vhci: VhciDriver) -> None:
    with pytest.raises(DeviceNotFound, match="vhci port 5 is not in use"):
        vhci.detach(5)
    assert kernel.writes == []


@pytest.mark.scenario("vhci_free")
def test_detach_of_a_free_port_drops_a_stale_record(kernel: FakeKernel,
                                                    vhci: VhciDriver) -> None:
    vhci.write_record(2, PortRecord("h", "1", "1-1"))
    with pytest.raises(DeviceNotFound):
        vhci.detach(2)
    assert vhci.read_record(2) is None
    assert kernel.writes == []


@pytest.mark.scenario("vhci_attached")
def test_detach_of_a_port_that_does_not_exist(kernel: FakeKernel, vhci: VhciDriver) -> None:
    with pytest.raises(DeviceNotFound, match="no port 999"):
        vhci.detach(999)
    assert kernel.writes == []


@pytest.mark.scenario("vhci_free")
def test_attach_detach_round_trip(kernel: FakeKernel, vhci: VhciDriver) -> None:
    before = kernel.read(f"{VHCI0}/status")
    port = vhci.attach(3, device(Speed.SUPER), "h", "1")
    vhci.detach(port)
    assert kernel.writes == [(ATTACH, "15 3 65538 5"), (DETACH, "15")]
    assert kernel.read(f"{VHCI0}/status") == before


@pytest.mark.scenario("vhci_free")
def test_kernel_answers_like_the_lab_kernel(kernel: FakeKernel) -> None:
    s = kernel.sysfs

    def answer(path: str, value: str) -> int | None:
        try:
            s.write(path, value)
        except KernelError as exc:
            return exc.errno
        return None

    assert answer(ATTACH, "0 8 65538 0") == errno.EINVAL
    assert answer(ATTACH, "0 8 65538 6") == errno.EINVAL
    assert answer(ATTACH, "240 8 65538 3") == errno.EINVAL
    assert answer(ATTACH, "0 8 65538 4") is None  # wireless is accepted by the kernel
    assert answer(ATTACH, "0 9 65538 3") == errno.EBUSY
    assert answer(DETACH, "0") is None
    assert answer(DETACH, "999") == errno.EINVAL
    assert answer(DETACH, "abc") == errno.EINVAL
    assert answer(DETACH, "0") == errno.EINVAL
    # The hub follows the speed: port 1 + super speed lands on ss port 16.
    assert answer(ATTACH, "1 12 65538 5") is None
    assert kernel.vhci_port(16).status is VdevStatus.USED
    assert answer(DETACH, "1") == errno.EINVAL
    assert answer(DETACH, "16") is None


# -- records --------------------------------------------------------------------

@pytest.mark.scenario("vhci_attached")
def test_reads_the_record_the_c_tool_wrote(vhci: VhciDriver) -> None:
    assert vhci.read_record(0) == PortRecord("127.0.0.1", "3241", "1-1")
    assert vhci.find("127.0.0.1", "1-1") is not None


@pytest.mark.scenario("vhci_free")
@pytest.mark.parametrize(("host", "service", "busid"), [
    ("127.0.0.1", "3240", "1-1"),
    ("::1", "3240", "3-1.4.2"),
    ("fe80::1%eth0", "usbip", "usbip-vudc.3"),
    ("[2001:db8::1]", "65535", "12-3"),
    ("board.example.org", "3240", "1-1"),
])
def test_record_is_what_c_usbip_port_parses(kernel: FakeKernel, vhci: VhciDriver, host: str,
                                            service: str, busid: str) -> None:
    """usbip port reads the file with fscanf("%s %s %s\\n")."""
    vhci.write_record(7, PortRecord(host, service, busid))
    text = record_text(kernel, 7)
    assert text == f"{host} {service} {busid}\n"
    assert text.split() == [host, service, busid]
    assert vhci.read_record(7) == PortRecord(host, service, busid)


@pytest.mark.scenario("vhci_free")
@pytest.mark.parametrize("text", ["", "\n", "a b\n", "a b c d\n", "\0\0\0"])
def test_garbage_record_reads_as_none(kernel: FakeKernel, vhci: VhciDriver, text: str) -> None:
    vhci.write_record(3, PortRecord("h", "1", "1-1"))
    kernel.sysfs.path(f"{STATE_DIR}/port3").write_text(text)
    assert vhci.read_record(3) is None


@pytest.mark.scenario("vhci_free")
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=st.text(max_size=40), service=st.text(max_size=12), busid=st.text(max_size=12))
def test_any_record_round_trips_or_is_refused(kernel: FakeKernel, host: str, service: str,
                                              busid: str) -> None:
    vhci = VhciDriver(kernel.sysfs)
    try:
        vhci.write_record(9, PortRecord(host, service, busid))
    except ValidationError:
        return
    text = record_text(kernel, 9)
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.split() == [host, service, busid]  # three fields, no injection
    assert vhci.read_record(9) == PortRecord(host, service, busid)


@pytest.mark.scenario("vhci_attached")
@pytest.mark.parametrize(("field", "value"), [(2, "009"), (3, "008")])
def test_a_port_line_with_an_unknown_state_or_speed_is_an_error(
        kernel: FakeKernel, vhci: VhciDriver, field: int, value: str) -> None:
    status3 = kernel.sysfs.path(f"{VHCI0}/status.3")
    lines = status3.read_text().splitlines(keepends=True)
    cols = lines[5].split()
    cols[field] = value
    lines[5] = " ".join(cols) + "\n"
    status3.write_text("".join(lines))
    with pytest.raises(UsbipError, match=rf"status\.3: port {int(cols[1])} has unknown state"):
        vhci.ports()
