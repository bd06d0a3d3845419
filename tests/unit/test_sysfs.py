"""Sysfs: kernel paths mapped under an injectable root, and nothing outside it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from usbipx.sysfs import Sysfs


@pytest.mark.parametrize(("root", "rel", "host"), [
    ("/", "/sys/bus/usb", "/sys/bus/usb"),
    ("/srv/fake", "/sys/bus/usb", "/srv/fake/sys/bus/usb"),
    ("/srv/fake/", "/var/run/vhci_hcd/port3", "/srv/fake/var/run/vhci_hcd/port3"),
    ("/srv/fake", PurePosixPath("/sys/kernel/config"), "/srv/fake/sys/kernel/config"),
])
def test_kernel_paths_map_under_the_root(root: str, rel: str, host: str) -> None:
    fs = Sysfs(root)
    assert fs.host(rel) == host
    assert fs.path(rel) == Path(host)


@pytest.mark.parametrize("rel", ["sys/bus/usb", "", "/sys/../etc/shadow", "/..",
                                 "/sys/bus/usb/devices/..", "..//etc"])
def test_a_path_that_could_leave_the_root_is_refused(rel: str) -> None:
    fs = Sysfs("/srv/fake")
    with pytest.raises(ValueError, match="unsafe kernel path"):
        fs.host(rel)
    with pytest.raises(ValueError, match="unsafe kernel path"):
        fs.read(rel)
    with pytest.raises(ValueError, match="unsafe kernel path"):
        fs.write(rel, "x")


def test_a_dotted_name_that_is_not_a_parent_reference_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "sys" / "..x").mkdir(parents=True)
    (tmp_path / "sys" / "..x" / "a").write_text("1\n")
    assert Sysfs(tmp_path).read_int("/sys/..x/a") == 1


def test_replace_text_writes_whole_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    fs = Sysfs(tmp_path)
    fs.makedirs("/var/run/vhci_hcd", mode=0o700)
    fs.replace_text("/var/run/vhci_hcd/port1", "10.0.0.2 3240 1-1\n")
    fs.replace_text("/var/run/vhci_hcd/port1", "10.0.0.3 3240 1-2\n")
    assert fs.read("/var/run/vhci_hcd/port1") == "10.0.0.3 3240 1-2"
    assert fs.listdir("/var/run/vhci_hcd") == ["port1"]
