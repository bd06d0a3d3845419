"""OwnershipStore on the real filesystem: whose directory it trusts, and writes that no
planted symlink can redirect.  (clean_leftovers' use of the records is in test_worker.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from usbipx.errors import UsbipError
from usbipx.lease import Lease
from usbipx.ownership import Owned, OwnershipStore

KEY = "busid:1-1"
RECORD = "busid_1-1.json"
LEASE = Lease("usbip-host", "1-1", bound_here=True, original_driver="usb")
OTHER_UID = 4242


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "owned"
    d.mkdir(mode=0o700)
    return d


def test_a_directory_owned_by_another_uid_is_refused(state: Path) -> None:
    """Mode 0700 is not enough: a directory another user owns is theirs to fill."""
    assert os.geteuid() == 0, "chown needs root (the unit tier runs as root)"
    os.chown(state, OTHER_UID, OTHER_UID)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for act in (lambda s: s.write(Owned(KEY, LEASE)), lambda s: s.read(KEY), OwnershipStore.all):
        with pytest.raises(UsbipError) as exc:
            act(OwnershipStore(state))
        msg = str(exc.value)
        assert "\n" not in msg
        assert f"owned by uid {os.geteuid()}" in msg and f"it is uid {OTHER_UID}" in msg
    assert os.listdir(state) == []


def test_our_own_directory_is_used(state: Path) -> None:
    """The other side of the test above: the same directory, ours, takes records."""
    store = OwnershipStore(state)
    store.write(Owned(KEY, LEASE))
    rec = store.read(KEY)
    assert rec is not None and rec.lease == LEASE


def _assert_our_regular_record(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), "the record must be a file, not the planted symlink"
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)


@pytest.mark.parametrize("planted", [RECORD, RECORD + ".tmp"])
def test_a_symlink_at_the_records_path_is_replaced_not_followed(
        state: Path, tmp_path: Path, planted: str) -> None:
    """Someone plants a symlink where the record (or its temporary file) will go:
    the write replaces the link itself; the file it points to is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, state / planted)
    store = OwnershipStore(state)
    store.write(Owned(KEY, LEASE))
    assert victim.read_text() == "precious\n"
    _assert_our_regular_record(state / RECORD)
    assert sorted(os.listdir(state)) == [RECORD]
    rec = store.read(KEY)
    assert rec is not None and rec.lease == LEASE


@pytest.mark.parametrize("planted", [RECORD, RECORD + ".tmp"])
def test_a_dangling_symlink_creates_nothing_where_it_points(
        state: Path, tmp_path: Path, planted: str) -> None:
    """A link to a file that does not exist yet: O_CREAT through it would create
    that file (e.g. in /etc); the write must not."""
    target = tmp_path / "created-through-the-link"
    os.symlink(target, state / planted)
    OwnershipStore(state).write(Owned(KEY, LEASE))
    assert not target.exists()
    _assert_our_regular_record(state / RECORD)
    assert sorted(os.listdir(state)) == [RECORD]
