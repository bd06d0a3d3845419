"""Supervisor exports that name a serial number: the configuration, which devices get a
worker (at start-up and on hotplug), and where the serial comes from (sysfs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakekernel import FakeKernel
from supervisor_helpers import FakeClock, FakeSpawner, config
from test_supervisor_hotplug import FakeMonitor, FakeUdevDevice

from usbipx.daemon.config import ExportSpec, load_config
from usbipx.daemon.hotplug import Hotplug, present_devices
from usbipx.daemon.supervisor import Device, Supervisor, jobs_for
from usbipx.errors import ConfigError
from usbipx.ownership import OwnershipStore

SERVER = '[server]\nhost = "10.0.0.1"\n'
SERIAL_2_1 = "/sys/devices/platform/dummy_hcd.1/usb2/2-1/serial"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sup.toml"
    path.write_text(text)
    return path


def test_an_export_may_name_a_serial(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SERVER + """
[[export]]
vendor = 0x1d6b
product = 0x0104
serial = "A1"

[[export]]
vendor = 0x1d6b
product = 0x0104
serial = "B2"

[[export]]
vendor = 0x1d6b
serial = "C3"

[[export]]
vendor = 0x1d6b
product = 0x0104
"""))
    a, b, c, any_serial = cfg.exports
    assert a == ExportSpec("match", vendor=0x1D6B, product=0x0104, serial="A1")
    assert (a.key, b.key, c.key, any_serial.key) == (
        "match:1d6b:0104:A1", "match:1d6b:0104:B2", "match:1d6b:*:C3", "match:1d6b:0104")
    assert a.matches(0x1D6B, 0x0104, "A1")
    assert not a.matches(0x1D6B, 0x0104, "B2") and not a.matches(0x1D6B, 0x0104)
    assert c.matches(0x1D6B, 0x9999, "C3")
    assert any_serial.matches(0x1D6B, 0x0104, "B2") and any_serial.matches(0x1D6B, 0x0104)


def test_a_serial_the_record_store_cannot_name_gets_a_digest_key() -> None:
    odd = ExportSpec("match", vendor=1, product=2, serial="a/b+c")
    assert odd.key.startswith("match:0001:0002:sha256-") and len(odd.key) == 39
    assert odd.key != ExportSpec("match", vendor=1, product=2, serial="a/b+d").key
    # Every key names a valid ownership record, with the bus id a match job adds.
    longest = ExportSpec("match", vendor=1, product=2, serial="x" * 126)
    for spec in (odd, longest):
        OwnershipStore(Path("/nonexistent")).path(f"{spec.key}@1-1.2.3.4.5")


@pytest.mark.parametrize(("text", "detail"), [
    ('[[export]]\nserial = "A1"\n', "serial needs vendor"),
    ('[[export]]\nbusid = "1-1"\nserial = "A1"\n', "serial needs vendor"),
    ('[[export]]\nvendor = 1\nserial = 7\n', "serial must be 1 to 126 printable"),
    ('[[export]]\nvendor = 1\nserial = ""\n', "serial must be 1 to 126 printable"),
    ('[[export]]\nvendor = 1\nserial = "a b"\n', "serial must be 1 to 126 printable"),
    ('[[export]]\nvendor = 1\nserial = "a\\nb"\n', "serial must be 1 to 126 printable"),
    (f'[[export]]\nvendor = 1\nserial = "{"x" * 127}"\n', "serial must be 1 to 126 printable"),
    ('[[export]]\nvendor = 1\nserial = "A"\n[[export]]\nvendor = 1\nserial = "A"\n',
     "export 2 repeats export 1 (match:0001:*:A)"),
])
def test_bad_serials_are_refused(tmp_path: Path, text: str, detail: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, SERVER + text))
    msg = str(exc.value)
    assert detail in msg, msg
    assert "\n" not in msg


FTDI = (0x0403, 0x6001)


def test_jobs_only_for_the_device_with_that_serial() -> None:
    cfg = config(ExportSpec("match", vendor=FTDI[0], product=FTDI[1], serial="B2"))
    devices = [Device("1-1", *FTDI, "A1"), Device("1-2", *FTDI, "B2"), Device("1-3", *FTDI)]
    assert sorted(jobs_for(cfg, devices)) == ["match:0403:6001:B2@1-2"]


def test_serial_entries_first_then_the_rest_for_an_entry_without() -> None:
    cfg = config(ExportSpec("match", vendor=FTDI[0], product=FTDI[1], serial="B2"),
                 ExportSpec("match", vendor=FTDI[0], product=FTDI[1]))
    devices = [Device("1-1", *FTDI, "A1"), Device("1-2", *FTDI, "B2")]
    assert sorted(jobs_for(cfg, devices)) == ["match:0403:6001:B2@1-2", "match:0403:6001@1-1"]


def test_hotplug_starts_a_worker_only_for_the_right_serial() -> None:
    spawner = FakeSpawner()
    sup = Supervisor(config(ExportSpec("match", vendor=FTDI[0], product=FTDI[1],
                                       serial="B2")), spawner, FakeClock())
    sup.start([])
    sup.on_device("add", Device("1-1", *FTDI, "A1"))
    assert spawner.spawned == []
    sup.on_device("add", Device("1-2", *FTDI, "B2"))
    assert [j.key for _, j in spawner.spawned] == ["match:0403:6001:B2@1-2"]


# -- where serials come from ---------------------------------------------------------------

def test_the_start_up_scan_reads_serials(tmp_path: Any) -> None:
    kernel = FakeKernel(None, "host_unbound", root=tmp_path)
    kernel.set_attr(SERIAL_2_1, "B2\n")
    assert present_devices(kernel.sysfs) == [Device("1-1", 0x1D6B, 0x0104, "0001"),
                                             Device("2-1", 0x1D6B, 0x0104, "B2")]


def test_hotplug_reads_the_serial_of_an_added_device(tmp_path: Any) -> None:
    """A kernel uevent has no serial number: it is read from sysfs, for ``add`` only."""
    kernel = FakeKernel(None, "host_unbound", root=tmp_path)
    kernel.set_attr(SERIAL_2_1, "B2\n")
    seen: list[tuple[str, Device]] = []
    monitor = FakeMonitor()
    hotplug = Hotplug(lambda action, dev: seen.append((action, dev)), monitor=monitor,
                      sysfs=kernel.sysfs)
    monitor.queue.extend([FakeUdevDevice("add", "2-1", "1d6b/104/100"),
                          FakeUdevDevice("add", "9-9", "1d6b/104/100"),  # gone already
                          FakeUdevDevice("remove", "2-1", "1d6b/104/100")])
    hotplug.readable()
    assert seen == [("add", Device("2-1", 0x1D6B, 0x0104, "B2")),
                    ("add", Device("9-9", 0x1D6B, 0x0104, None)),
                    ("remove", Device("2-1", 0x1D6B, 0x0104, None))]
