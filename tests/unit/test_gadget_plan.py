"""The gadget plan, pure: exact step sequences from specs, with no tree at all.

``live(spec, udc)`` is the spec as :func:`read_gadget` shows it once built (every
kernel default filled in), which is what :func:`plan_apply` gets as ``actual``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from usbipx.gadget.attrs import Attr, AttrValue
from usbipx.gadget.functions import CONFIG_ATTRS, GADGET_ATTRS, GADGET_STRINGS, function_type
from usbipx.gadget.osdesc import (
    B_VENDOR_CODE,
    COMPATIBLE_ID,
    QW_SIGN_ATTR,
    SUB_COMPATIBLE_ID,
    USE,
    InterfaceOsDesc,
    OsDescSpec,
)
from usbipx.gadget.plan import plan_apply, plan_remove
from usbipx.gadget.spec import ConfigSpec, FunctionSpec, GadgetSpec, loads_spec
from usbipx.gadget.steps import (
    TEXT,
    BindUdc,
    Link,
    Mkdir,
    OsDescLink,
    OsDescUnlink,
    Rmdir,
    Step,
    UnbindUdc,
    Unlink,
    Write,
)

U0, V0 = "dummy_udc.0", "usbip-vudc.0"
MS = function_type("mass_storage")
ECM = function_type("ecm")
assert MS is not None and ECM is not None


def gattr(name: str) -> Attr:
    return next(ga.attr for ga in (*GADGET_ATTRS, *CONFIG_ATTRS) if ga.attr.name == name)


def lattr(name: str) -> Attr:
    a = MS.lun_attr(name)
    assert a is not None
    return a


@pytest.fixture
def disk(tmp_path: Path) -> str:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\0" * 4096)
    return str(p)


def demo(disk: str, **changes: str) -> GadgetSpec:
    text = f"""
name = "g"
id_vendor = 0x1d6b
id_product = 0x0104
[strings]
product = "Demo"
[[configs]]
number = 1
max_power = 250
configuration = "Conf"
functions = ["mass_storage.disk", "acm.tty", "ecm.net"]
[functions."mass_storage.disk".lun.0]
file = "{disk}"
ro = true
removable = false
[functions."mass_storage.disk".lun.1]
cdrom = true
[functions."acm.tty"]
[functions."ecm.net"]
qmult = 7
"""
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    return loads_spec(text)


def _full(values: Mapping[str, AttrValue], catalogue: tuple[Attr, ...] | list[Attr],
          ) -> dict[str, AttrValue]:
    return {**{a.name: a.default for a in catalogue if a.default is not None}, **values}


def live(spec: GadgetSpec, udc: str | None) -> GadgetSpec:
    """``spec`` as read back from the kernel once built and bound to ``udc``."""
    functions = {}
    for name, f in spec.functions.items():
        t = function_type(f.type)
        if t is None:
            functions[name] = f
            continue
        luns = {0: {}, **f.luns} if t.lun_attrs else dict(f.luns)
        # rndis and ncm come with os_desc/interface.<type>, ids empty
        os_desc = {**{i: InterfaceOsDesc() for i in t.os_desc_interfaces}, **f.os_desc}
        functions[name] = replace(f, attrs=_full(f.attrs, t.attrs),
                                  luns={n: _full(v, t.lun_attrs) for n, v in sorted(luns.items())},
                                  os_desc=os_desc)
    configs = tuple(replace(c, attrs=_full(c.attrs, [ca.attr for ca in CONFIG_ATTRS]))
                    for c in spec.configs)
    strings = {lang: {n: t.get(n, "") for n in GADGET_STRINGS} for lang, t in spec.strings.items()}
    return replace(spec, attrs=_full(spec.attrs, [ga.attr for ga in GADGET_ATTRS]),
                   strings=strings, configs=configs, functions=functions, udc=udc)


def whats(steps: list[Step]) -> list[str]:
    return [s.what("g") for s in steps]


UNLINK_ALL = ["unlink configs/c.1/ecm.net", "unlink configs/c.1/acm.tty",
              "unlink configs/c.1/mass_storage.disk"]  # newest first
LINK_ALL = ["link configs/c.1/mass_storage.disk", "link configs/c.1/acm.tty",
            "link configs/c.1/ecm.net"]  # in the spec's order: the interfaces' order


# ---------------------------------------------------------------- create

def test_create_writes_attributes_before_links_and_ro_before_file(disk):
    steps = plan_apply(demo(disk), None, U0)
    lun0 = "functions/mass_storage.disk/lun.0"
    assert steps == [
        Mkdir(""),
        Write("idVendor", gattr("idVendor"), 0x1D6B),
        Write("idProduct", gattr("idProduct"), 0x0104),
        Mkdir("strings/0x409"),
        Write("strings/0x409/product", TEXT, "Demo"),  # empty strings are not written
        Mkdir("functions/mass_storage.disk"),
        Write(f"{lun0}/ro", lattr("ro"), True),  # ro before file: EBUSY once a file is open
        Write(f"{lun0}/removable", lattr("removable"), False),
        Write(f"{lun0}/file", lattr("file"), disk),
        Mkdir("functions/mass_storage.disk/lun.1"),  # lun.0 comes with the function
        Write("functions/mass_storage.disk/lun.1/cdrom", lattr("cdrom"), True),
        Mkdir("functions/acm.tty"),
        Mkdir("functions/ecm.net"),
        Write("functions/ecm.net/qmult", ECM.attr("qmult"), 7),
        Mkdir("configs/c.1"),
        Write("configs/c.1/MaxPower", gattr("MaxPower"), 250),
        Mkdir("configs/c.1/strings/0x409"),
        Write("configs/c.1/strings/0x409/configuration", TEXT, "Conf"),
        Link("c.1", "mass_storage.disk"),
        Link("c.1", "acm.tty"),
        Link("c.1", "ecm.net"),
        BindUdc(U0),
    ]
    # nothing inside a directory this plan makes needs restoring
    assert all(s.old is None for s in steps if isinstance(s, Write))


def test_create_unbound(disk):
    steps = plan_apply(demo(disk), None, None)
    assert not any(isinstance(s, BindUdc | UnbindUdc) for s in steps)
    assert steps[-1] == Link("c.1", "ecm.net")


# ---------------------------------------------------------------- converge

def test_a_gadget_as_specified_needs_no_step(disk):
    spec = demo(disk)
    assert plan_apply(spec, live(spec, U0), U0) == []
    assert plan_apply(spec, live(spec, None), None) == []


def test_a_changed_gadget_attribute_is_written_while_unbound(disk):
    steps = plan_apply(demo(disk, **{"0x0104": "0x0105"}), live(demo(disk), U0), U0)
    assert steps == [UnbindUdc(U0), Write("idProduct", gattr("idProduct"), 0x0105, 0x0104),
                     BindUdc(U0)]


def test_a_changed_function_attribute_is_written_unlinked_then_relinked(disk):
    steps = plan_apply(demo(disk, **{"qmult = 7": "qmult = 9"}), live(demo(disk), U0), U0)
    assert whats(steps) == ["unbind UDC dummy_udc.0", *UNLINK_ALL,
                            "write functions/ecm.net/qmult", *LINK_ALL, "bind UDC dummy_udc.0"]
    assert steps[4] == Write("functions/ecm.net/qmult", ECM.attr("qmult"), 9, 7)


def test_an_added_function_is_made_before_the_config_is_linked_again(disk):
    new = demo(disk, **{'"acm.tty", "ecm.net"]': '"acm.tty", "ecm.net", "acm.two"]',
                        '[functions."acm.tty"]\n': '[functions."acm.tty"]\n[functions."acm.two"]\n'})
    steps = plan_apply(new, live(demo(disk), U0), U0)
    assert whats(steps) == ["unbind UDC dummy_udc.0", *UNLINK_ALL, "mkdir functions/acm.two",
                            *LINK_ALL, "link configs/c.1/acm.two", "bind UDC dummy_udc.0"]


def test_a_removed_function_is_unlinked_then_removed(disk):
    new = demo(disk, **{'"acm.tty", ': "", '[functions."acm.tty"]\n': ""})
    steps = plan_apply(new, live(demo(disk), U0), U0)
    assert whats(steps) == ["unbind UDC dummy_udc.0", *UNLINK_ALL, "rmdir functions/acm.tty",
                            "link configs/c.1/mass_storage.disk", "link configs/c.1/ecm.net",
                            "bind UDC dummy_udc.0"]
    assert steps[4] == Rmdir("functions/acm.tty", (Mkdir("functions/acm.tty"),))


def test_a_removed_lun_goes_and_can_come_back(disk):
    new = demo(disk, **{'[functions."mass_storage.disk".lun.1]\ncdrom = true\n': ""})
    steps = plan_apply(new, live(demo(disk), U0), U0)
    assert whats(steps) == ["unbind UDC dummy_udc.0", *UNLINK_ALL,
                            "rmdir functions/mass_storage.disk/lun.1", *LINK_ALL,
                            "bind UDC dummy_udc.0"]
    lun1 = "functions/mass_storage.disk/lun.1"
    (rmdir,) = [s for s in steps if isinstance(s, Rmdir)]
    assert whats(list(rmdir.undo())) == [
        f"mkdir {lun1}", f"write {lun1}/ro", f"write {lun1}/cdrom", f"write {lun1}/removable",
        f"write {lun1}/nofua", f"write {lun1}/inquiry_string", f"write {lun1}/file"]


def test_ro_of_an_open_lun_changes_with_the_file_closed(disk):
    steps = plan_apply(demo(disk, **{"ro = true": "ro = false"}), live(demo(disk), U0), U0)
    lun0 = "functions/mass_storage.disk/lun.0"
    assert steps == [
        UnbindUdc(U0),
        *[Unlink("c.1", n, n) for n in ("ecm.net", "acm.tty", "mass_storage.disk")],
        Write(f"{lun0}/file", lattr("file"), "", disk),  # closed
        Write(f"{lun0}/ro", lattr("ro"), False, True),
        Write(f"{lun0}/file", lattr("file"), disk, ""),  # reopened last
        *[Link("c.1", n) for n in ("mass_storage.disk", "acm.tty", "ecm.net")],
        BindUdc(U0),
    ]


def test_changed_strings_and_config_attributes_need_no_relink(disk):
    new = demo(disk, **{'"Demo"': '"Other"', "max_power = 250": "max_power = 100"})
    steps = plan_apply(new, live(demo(disk), U0), U0)
    assert steps == [
        UnbindUdc(U0),
        Write("strings/0x409/product", TEXT, "Other", "Demo"),
        Write("configs/c.1/MaxPower", gattr("MaxPower"), 100, 250),
        BindUdc(U0),
    ]


def test_a_udc_change_is_unbind_then_bind(disk):
    spec = demo(disk)
    assert plan_apply(spec, live(spec, U0), V0) == [UnbindUdc(U0), BindUdc(V0)]
    assert plan_apply(spec, live(spec, U0), None) == [UnbindUdc(U0)]
    assert plan_apply(spec, live(spec, None), V0) == [BindUdc(V0)]


def test_a_changed_gadget_moving_to_another_udc_is_unbound_once(disk):
    steps = plan_apply(demo(disk, **{"0x0104": "0x0105"}), live(demo(disk), U0), V0)
    assert whats(steps) == ["unbind UDC dummy_udc.0", "write idProduct", "bind UDC usbip-vudc.0"]


# ---------------------------------------------------------------- Microsoft OS descriptors

WINDOWS = """
name = "g"
id_vendor = 0x1d6b
id_product = 0x0104
[os_desc]
b_vendor_code = 0xcd
[[configs]]
number = 1
functions = ["rndis.usb0", "acm.a"]
[[configs]]
number = 2
functions = ["acm.a"]
[functions."rndis.usb0".os_desc.interface.rndis]
compatible_id = "RNDIS"
sub_compatible_id = "5162001"
[functions."acm.a"]
"""
RNDIS_IDS = "functions/rndis.usb0/os_desc/interface.rndis"


def windows(**changes: str) -> GadgetSpec:
    text = WINDOWS
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    return loads_spec(text)


def test_os_desc_is_written_use_last_and_linked_once_its_config_is_complete():
    steps = plan_apply(windows(), None, U0)
    assert steps == [
        Mkdir(""),
        Write("idVendor", gattr("idVendor"), 0x1D6B),
        Write("idProduct", gattr("idProduct"), 0x0104),
        Mkdir("functions/rndis.usb0"),
        # ids before the function is linked, as every function attribute
        Write(f"{RNDIS_IDS}/compatible_id", COMPATIBLE_ID, "RNDIS"),
        Write(f"{RNDIS_IDS}/sub_compatible_id", SUB_COMPATIBLE_ID, "5162001"),
        Mkdir("functions/acm.a"),
        Mkdir("configs/c.1"),
        Mkdir("configs/c.2"),
        Link("c.1", "rndis.usb0"),
        Link("c.1", "acm.a"),
        Link("c.2", "acm.a"),
        Write("os_desc/b_vendor_code", B_VENDOR_CODE, 0xCD),
        Write("os_desc/qw_sign", QW_SIGN_ATTR, "MSFT100"),
        Write("os_desc/use", USE, True),
        OsDescLink("c.1"),  # the first config, by default
        BindUdc(U0),
    ]


def test_a_gadget_with_os_desc_as_specified_needs_no_step():
    spec = windows()
    assert plan_apply(spec, live(spec, U0), U0) == []


def test_a_changed_vendor_code_is_written_while_unbound():
    """libcomposite reads os_desc/ when the gadget binds: a change needs a rebind."""
    steps = plan_apply(windows(**{"0xcd": "0x21"}), live(windows(), U0), U0)
    assert steps == [UnbindUdc(U0), Write("os_desc/b_vendor_code", B_VENDOR_CODE, 0x21, 0xCD),
                     BindUdc(U0)]


def test_moving_os_desc_to_another_config_unlinks_then_links():
    steps = plan_apply(windows(**{"0xcd\n": "0xcd\nconfig = 2\n"}), live(windows(), U0), U0)
    assert steps == [UnbindUdc(U0), OsDescUnlink("c.1", "c.1"), OsDescLink("c.2"), BindUdc(U0)]


def test_a_config_os_desc_links_is_unlinked_before_it_is_removed():
    """rmdir of the config os_desc/ links to is EBUSY."""
    new = windows(**{"0xcd\n": "0xcd\nconfig = 2\n", "number = 1\n": "number = 3\n"})
    steps = plan_apply(new, live(windows(), U0), U0)
    assert whats(steps) == [
        "unbind UDC dummy_udc.0", "unlink os_desc/c.1",
        "unlink configs/c.1/acm.a", "unlink configs/c.1/rndis.usb0", "rmdir configs/c.1",
        "mkdir configs/c.3", "link configs/c.3/rndis.usb0", "link configs/c.3/acm.a",
        "link os_desc/c.2", "bind UDC dummy_udc.0"]


def test_a_spec_without_os_desc_turns_it_off_and_unlinks():
    new = windows(**{"[os_desc]\nb_vendor_code = 0xcd\n": ""})
    steps = plan_apply(new, live(windows(), U0), U0)
    # vendor code and signature do nothing without use; they are left as they are
    assert steps == [UnbindUdc(U0), OsDescUnlink("c.1", "c.1"), Write("os_desc/use", USE, False, True),
                     BindUdc(U0)]
    assert plan_apply(new, live(new, U0), U0) == []


def test_changed_compatible_ids_are_written_with_the_function_unlinked():
    new = windows(**{'"RNDIS"': '"WINUSB"', '"5162001"': '""'})
    steps = plan_apply(new, live(windows(), U0), U0)
    assert whats(steps) == [
        "unbind UDC dummy_udc.0", "unlink configs/c.1/acm.a", "unlink configs/c.1/rndis.usb0",
        f"write {RNDIS_IDS}/compatible_id", f"write {RNDIS_IDS}/sub_compatible_id",
        "link configs/c.1/rndis.usb0", "link configs/c.1/acm.a", "bind UDC dummy_udc.0"]
    assert steps[3] == Write(f"{RNDIS_IDS}/compatible_id", COMPATIBLE_ID, "WINUSB", "RNDIS")
    # an interface the spec leaves out converges to empty ids
    bare = windows(**{'[functions."rndis.usb0".os_desc.interface.rndis]\ncompatible_id = "RNDIS"\n'
                      'sub_compatible_id = "5162001"\n': '[functions."rndis.usb0"]\n'})
    steps = plan_apply(bare, live(windows(), None), None)
    assert [s for s in steps if isinstance(s, Write)] == [
        Write(f"{RNDIS_IDS}/compatible_id", COMPATIBLE_ID, "", "RNDIS"),
        Write(f"{RNDIS_IDS}/sub_compatible_id", SUB_COMPATIBLE_ID, "", "5162001")]
    assert plan_apply(bare, live(bare, None), None) == []


def test_remove_unlinks_os_desc_first_and_can_restore_it():
    actual = live(windows(), U0)
    steps = plan_remove(actual)
    assert whats(steps)[:3] == ["unbind UDC dummy_udc.0", "unlink os_desc/c.1",
                                "unlink configs/c.1/acm.a"]
    (gadget,) = [s for s in steps if isinstance(s, Rmdir) and s.path == ""]
    assert gadget.restore[-3:] == (Write("os_desc/b_vendor_code", B_VENDOR_CODE, 0xCD),
                                   Write("os_desc/qw_sign", QW_SIGN_ATTR, "MSFT100"),
                                   Write("os_desc/use", USE, True))
    assert steps[1].undo() == (OsDescLink("c.1"),)


def test_os_desc_linked_by_another_tool_is_unlinked_by_its_name():
    actual = replace(live(windows(), None),
                     os_desc=OsDescSpec(use=True, b_vendor_code=1, qw_sign=None, config=1,
                                        link="c1"))
    steps = plan_remove(actual)
    assert steps[0] == OsDescUnlink("c1", "c.1")
    assert steps[0].undo() == (OsDescLink("c.1", "c1"),)
    (gadget,) = [s for s in steps if isinstance(s, Rmdir) and s.path == ""]
    # a signature never written is not written back
    assert [s.path for s in gadget.restore if isinstance(s, Write)][-2:] == [
        "os_desc/b_vendor_code", "os_desc/use"]


# ---------------------------------------------------------------- remove

def test_remove_tears_down_in_the_kernel_order(disk):
    actual = live(demo(disk), U0)
    steps = plan_remove(actual)
    assert whats(steps) == [
        "unbind UDC dummy_udc.0",
        *UNLINK_ALL,
        "rmdir configs/c.1/strings/0x409", "rmdir configs/c.1",
        "rmdir functions/mass_storage.disk/lun.1", "rmdir functions/mass_storage.disk",
        "rmdir functions/acm.tty", "rmdir functions/ecm.net",
        "rmdir strings/0x409", "rmdir usb_gadget/g",
    ]
    # each rmdir carries what rebuilds the directory as it was
    by_path = {s.path: s for s in steps if isinstance(s, Rmdir)}
    assert by_path["configs/c.1"].restore == (
        Mkdir("configs/c.1"), Write("configs/c.1/MaxPower", gattr("MaxPower"), 250),
        Write("configs/c.1/bmAttributes", gattr("bmAttributes"), 0x80))
    assert by_path["strings/0x409"].restore == (
        Mkdir("strings/0x409"), Write("strings/0x409/manufacturer", TEXT, ""),
        Write("strings/0x409/product", TEXT, "Demo"),
        Write("strings/0x409/serialnumber", TEXT, ""))
    assert whats(list(by_path["functions/mass_storage.disk"].restore)) == [
        "mkdir functions/mass_storage.disk", "write functions/mass_storage.disk/stall",
        *[f"write functions/mass_storage.disk/lun.0/{a}"
          for a in ("ro", "cdrom", "removable", "nofua", "inquiry_string", "file")]]
    assert by_path[""].restore[0] == Mkdir("")
    assert Write("idVendor", gattr("idVendor"), 0x1D6B) in by_path[""].restore


def test_remove_of_an_unbound_gadget_made_by_another_tool():
    """Links named f1, f2 are removed by their names and come back under them."""
    actual = GadgetSpec(
        name="g", attrs={"idVendor": 1, "idProduct": 2}, udc=None,
        configs=(ConfigSpec(number=2, label="cfg", functions=("uac2.x", "acm.a"),
                            links=("f1", "f2")),),
        functions={n: FunctionSpec(name=n) for n in ("uac2.x", "acm.a")})
    steps = plan_remove(actual)
    assert steps[:2] == [Unlink("cfg.2", "f2", "acm.a"), Unlink("cfg.2", "f1", "uac2.x")]
    assert [s.undo() for s in steps[:2]] == [(Link("cfg.2", "acm.a", "f2"),),
                                             (Link("cfg.2", "uac2.x", "f1"),)]
    assert whats(steps[2:]) == ["rmdir configs/cfg.2", "rmdir functions/uac2.x",
                                "rmdir functions/acm.a", "rmdir usb_gadget/g"]


# ---------------------------------------------------------------- undo

def test_every_step_knows_its_undo():
    a = gattr("idVendor")
    assert Mkdir("functions/acm.a").undo() == (Rmdir("functions/acm.a"),)
    assert Rmdir("x", (Mkdir("x"),)).undo() == (Mkdir("x"),)
    assert Write("idVendor", a, 2, 1).undo() == (Write("idVendor", a, 1),)
    assert Write("idVendor", a, 2).undo() == ()  # in a directory the plan made
    assert Link("c.1", "acm.a").undo() == (Unlink("c.1", "acm.a", "acm.a"),)
    assert Unlink("c.1", "acm.a", "acm.a").undo() == (Link("c.1", "acm.a"),)
    assert OsDescLink("c.2").undo() == (OsDescUnlink("c.2", "c.2"),)
    assert OsDescUnlink("c.2", "c.2").undo() == (OsDescLink("c.2"),)
    assert BindUdc(U0).undo() == (UnbindUdc(U0),)
    assert UnbindUdc(U0).undo() == (BindUdc(U0),)
