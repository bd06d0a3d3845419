"""Gadget specs: validation before configfs is touched, TOML round trip, HID presets."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usbipx.errors import ConfigError
from usbipx.gadget import hid
from usbipx.gadget.dump import dump_spec
from usbipx.gadget.osdesc import InterfaceOsDesc, OsDescSpec
from usbipx.gadget.spec import (
    ConfigSpec,
    FunctionSpec,
    GadgetSpec,
    load_spec,
    loads_spec,
    parse_spec,
)

BASE = """
name = "g1"
id_vendor = 0x1d6b
id_product = 0x0104
"""


@pytest.fixture
def disk(fs):
    fs.create_file("/img/disk.img", contents=b"\0" * 4096)
    fs.create_file("/img/other.img", contents=b"\0" * 4096)
    return "/img/disk.img"


def spec_of(extra: str) -> GadgetSpec:
    return loads_spec(BASE + extra, source="t.toml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        loads_spec(text, source="t.toml")
    return str(info.value)


DESIGN_EXAMPLE = """
name = "demo"                  # directory under usb_gadget/
udc = "dummy_udc.0"            # optional; bind after building (also --udc)
id_vendor = 0x1d6b
id_product = 0x0104
bcd_device = 0x0100            # optional fields: bcd_usb, device_class, max_speed …

[strings]                      # language 0x409
manufacturer = "Example"
product = "Demo gadget"
serialnumber = "0001"

[[configs]]
number = 1
max_power = 250
functions = ["mass_storage.disk", "acm.tty", "hid.kbd"]

[functions."mass_storage.disk".lun.0]
file = "/img/disk.img"
removable = true

[functions."acm.tty"]

[functions."hid.kbd"]
preset = "keyboard"            # or protocol, subclass, report_length, report_desc (hex)
"""


def test_design_example_parses_to_configfs_names(disk):
    spec = loads_spec(DESIGN_EXAMPLE)
    assert spec.name == "demo" and spec.udc == "dummy_udc.0"
    assert spec.attrs == {"idVendor": 0x1D6B, "idProduct": 0x0104, "bcdDevice": 0x0100}
    assert spec.strings == {0x409: {"manufacturer": "Example", "product": "Demo gadget",
                                    "serialnumber": "0001"}}
    (c,) = spec.configs
    assert c.dirname == "c.1" and c.attrs == {"MaxPower": 250}
    assert c.functions == ("mass_storage.disk", "acm.tty", "hid.kbd")
    assert list(spec.functions) == ["mass_storage.disk", "acm.tty", "hid.kbd"]
    assert spec.functions["mass_storage.disk"].luns == {0: {"file": disk, "removable": True}}
    kbd = spec.functions["hid.kbd"].attrs
    assert kbd == {"subclass": 1, "protocol": 1, "report_length": 8,
                   "report_desc": hid.KEYBOARD_REPORT_DESC}


def test_configfs_attribute_names_are_accepted_too():
    spec = loads_spec('name = "g"\nidVendor = 0x1234\nidProduct = 5\nbDeviceClass = 0xef\n')
    assert spec.attrs == {"idVendor": 0x1234, "idProduct": 5, "bDeviceClass": 0xEF}


def test_explicit_hid_keys_override_the_preset():
    spec = spec_of('[functions."hid.k"]\npreset = "keyboard"\nreport_length = 16\n'
                   'no_out_endpoint = true\n')
    attrs = spec.functions["hid.k"].attrs
    assert attrs["report_length"] == 16 and attrs["no_out_endpoint"] is True
    assert attrs["report_desc"] == hid.KEYBOARD_REPORT_DESC


def test_raw_hex_report_desc_with_separators():
    spec = spec_of('[functions."hid.x"]\nreport_length = 1\nreport_desc = "05 01:09,06\\nc0"\n')
    assert spec.functions["hid.x"].attrs["report_desc"] == bytes([5, 1, 9, 6, 0xC0])


def test_several_luns_both_spellings(disk):
    spec = spec_of('[functions."mass_storage.m".lun.0]\nfile = "/img/disk.img"\nro = true\n'
                   '[functions."mass_storage.m"."lun.3"]\ncdrom = true\n'
                   'inquiry_string = "usbipx  cdrom           0001"\n')
    assert spec.functions["mass_storage.m"].luns == {
        0: {"file": "/img/disk.img", "ro": True},
        3: {"cdrom": True, "inquiry_string": "usbipx  cdrom           0001"},
    }


def test_uncatalogued_function_types_take_any_scalar_attribute():
    spec = spec_of('[functions."uac2.mic"]\nc_srate = 48000\nc_sync = "adaptive"\n')
    assert spec.functions["uac2.mic"].attrs == {"c_srate": 48000, "c_sync": "adaptive"}


def test_other_string_languages():
    spec = spec_of('[strings]\nproduct = "Disk"\n[strings."0x407"]\nproduct = "Platte"\n'
                   '[[configs]]\nnumber = 2\nlabel = "b"\nconfiguration = "x"\n'
                   '[configs.strings."0x407"]\nconfiguration = "y"\n')
    assert spec.strings == {0x409: {"product": "Disk"}, 0x407: {"product": "Platte"}}
    assert spec.configs[0].dirname == "b.2"
    assert spec.configs[0].strings == {0x409: {"configuration": "x"},
                                       0x407: {"configuration": "y"}}


@pytest.mark.parametrize(("text", "expected"), [
    ('id_vendor = 1\nid_product = 2\n', "name: missing"),
    ('name = "a/b"\nid_vendor = 1\nid_product = 2\n', "name: 'a/b' is not a gadget name"),
    ('name = "g"\nid_product = 2\n', "id_vendor: missing"),
    (BASE.replace("0x1d6b", "0x10000"), "id_vendor: 65536 is out of range 0..65535"),
    (BASE.replace("0x1d6b", "true"), "id_vendor: expected an integer"),
    (BASE + "colour = 3\n", "colour: unknown key"),
    (BASE + 'udc = "a b"\n', "udc: 'a b' is not a UDC name"),
    (BASE + "max_packet_size0 = 12\n", "max_packet_size0: 12 is not 8, 16, 32 or 64"),
    (BASE + 'max_speed = "warp"\n', "max_speed: 'warp' is not one of"),
    (BASE + '[strings]\nvendor = "x"\n', "strings.vendor: unknown string"),
    (BASE + f'[strings]\nproduct = "{"x" * 127}"\n', "strings.product: 127 bytes is longer"),
    (BASE + f'[strings]\nproduct = "{"é" * 64}"\n', "strings.product: 128 bytes is longer"),
    (BASE + '[strings."0x0"]\nproduct = "x"\n', 'strings.0x0: not a language id'),
    (BASE + "[[configs]]\nnumber = 0\n", "configs[0].number: 0 is not 1..255"),
    (BASE + "[[configs]]\nmax_power = 2\n", "configs[0].number: missing"),
    (BASE + "[[configs]]\nnumber = 1\n[[configs]]\nnumber = 1\n",
     "configs[1].number: configuration 1 is given twice"),
    (BASE + "[[configs]]\nnumber = 1\nbm_attributes = 0x40\n",
     "configs[0].bm_attributes: 0x40 must have bit 7 set"),
    (BASE + "[[configs]]\nnumber = 1\nmax_power = 5000\n",
     "configs[0].max_power: 5000 is out of range"),
    (BASE + '[[configs]]\nnumber = 1\nfunctions = ["acm.x"]\n',
     "configs[0].functions: 'acm.x' is not declared"),
    (BASE + '[[configs]]\nnumber = 1\nfunctions = ["acm.x", "acm.x"]\n[functions."acm.x"]\n',
     "configs[0].functions: 'acm.x' is listed twice"),
    (BASE + '[functions.acm]\n', 'functions.acm: a function is named <type>.<instance>'),
    (BASE + f'[functions."acm.{"x" * 36}"]\n', "longer than the kernel's 39 characters"),
    (BASE + '[functions."acm.x"]\nport_num = 3\n', 'functions."acm.x".port_num: read-only'),
    (BASE + '[functions."ecm.x"]\nmtu = 3\n',
     "functions.\"ecm.x\".mtu: ecm has no attribute 'mtu' (known: dev_addr, host_addr"),
    (BASE + '[functions."ecm.x"]\ndev_addr = "03:00:00:00:00:01"\n', "multicast"),
    (BASE + '[functions."ecm.x"]\nhost_addr = "02:00:00:00:00"\n', "is not a MAC address"),
    (BASE + '[functions."ncm.x"]\nifname = "usb0"\n', "with one %d"),
    (BASE + '[functions."hid.x"]\n', 'functions."hid.x": a hid function needs preset'),
    (BASE + '[functions."hid.x"]\npreset = "joystick"\n',
     "functions.\"hid.x\".preset: 'joystick' is not a HID preset (known: keyboard, mouse)"),
    (BASE + '[functions."hid.x"]\nreport_length = 1\nreport_desc = "zz"\n',
     'functions."hid.x".report_desc: is not hex'),
    (BASE + f'[functions."hid.x"]\nreport_length = 1\nreport_desc = "{"00" * 4096}"\n',
     "4096 bytes is longer than the kernel's 4095"),
    (BASE + '[functions."hid.x"]\npreset = "mouse"\nprotocol = 256\n',
     'functions."hid.x".protocol: 256 is out of range 0..255'),
    (BASE + '[functions."mass_storage.m".lun.16]\n', "at most 16 LUNs"),
    (BASE + '[functions."mass_storage.m".lun.0]\nsize = 1\n', "lun.0.size: not a LUN attribute"),
    (BASE + '[functions."mass_storage.m".lun.0]\nfile = "disk.img"\n',
     "lun.0.file: 'disk.img' is not an absolute path"),
    (BASE + '[functions."mass_storage.m".lun.0]\nfile = "/img/none.img"\n',
     "lun.0.file: /img/none.img: No such file or directory"),
    (BASE + '[functions."mass_storage.m".lun.0]\nfile = "/img"\n',
     "not a regular file or block device"),
    (BASE + '[functions."mass_storage.m".lun.0]\nremovable = false\n',
     '"mass_storage.m".lun.0: a non-removable LUN needs a backing file'),
    (BASE + '[functions."mass_storage.m".lun.0]\ninquiry_string = "' + "x" * 29 + '"\n',
     "inquiry_string: longer than 28 bytes"),
    (BASE + '[functions."mass_storage.m".lun.0]\nro = "yes"\n',
     "lun.0.ro: expected true or false"),
    (BASE + '[functions."acm.x".lun.0]\n', "only mass_storage has lun.N"),
    (BASE + 'udc = "dummy_udc.0"\n', "configs: udc = 'dummy_udc.0' needs at least one"),
    (BASE + 'udc = "auto"\n[[configs]]\nnumber = 1\n',
     "configs[0].functions: udc = 'auto' needs at least one function"),
    ("name = \n", "t.toml: invalid TOML"),
])
def test_invalid_specs_name_the_key_at_fault(disk, text, expected):
    message = error_of(text)
    assert message.startswith("t.toml: ")
    assert expected in message


# ---------------------------------------------------------------- Microsoft OS descriptors

OS_DESC = """
[os_desc]
use = true
b_vendor_code = 0xcd
qw_sign = "MSFT100"
config = 2

[[configs]]
number = 1
functions = ["acm.a"]

[[configs]]
number = 2
functions = ["rndis.usb0", "ncm.n"]

[functions."rndis.usb0".os_desc.interface.rndis]
compatible_id = "RNDIS"
sub_compatible_id = "5162001"

[functions."ncm.n".os_desc.interface.ncm]
compatible_id = "WINNCM"

[functions."acm.a"]
"""


def test_os_desc_of_the_gadget_and_of_its_interfaces():
    spec = spec_of(OS_DESC)
    assert spec.os_desc == OsDescSpec(use=True, b_vendor_code=0xCD, qw_sign="MSFT100", config=2)
    assert spec.os_desc_config() is spec.configs[1]
    assert spec.functions["rndis.usb0"].os_desc == {
        "rndis": InterfaceOsDesc(compatible_id="RNDIS", sub_compatible_id="5162001")}
    assert spec.functions["ncm.n"].os_desc == {"ncm": InterfaceOsDesc("WINNCM", "")}
    assert spec.functions["acm.a"].os_desc == {}
    assert spec_of("").os_desc is None


def test_os_desc_defaults_use_msft100_and_the_first_config():
    spec = spec_of('[os_desc]\nb_vendor_code = 1\n[[configs]]\nnumber = 5\n[[configs]]\nnumber = 2\n')
    assert spec.os_desc == OsDescSpec(use=True, b_vendor_code=1, qw_sign="MSFT100", config=5)
    # switched off, it needs no config and links none unless told
    assert spec_of("[os_desc]\nuse = false\nb_vendor_code = 1\n").os_desc == OsDescSpec(
        use=False, b_vendor_code=1, config=None)
    off = spec_of("[os_desc]\nuse = false\nb_vendor_code = 1\n[[configs]]\nnumber = 5\n")
    assert off.os_desc is not None and off.os_desc.config is None


def test_dump_spec_writes_os_desc_back():
    spec = spec_of(OS_DESC)
    text = dump_spec(spec)
    assert "[os_desc]\nuse = true\nb_vendor_code = 0xcd\nqw_sign = \"MSFT100\"\nconfig = 2\n" in text
    assert '[functions."rndis.usb0".os_desc.interface.rndis]\ncompatible_id = "RNDIS"\n' in text
    assert loads_spec(text) == spec


CONFIG1 = '[[configs]]\nnumber = 1\nfunctions = ["rndis.r"]\n[functions."rndis.r"]\n'
RNDIS_IF = '[functions."rndis.r".os_desc.interface.rndis]\n'


@pytest.mark.parametrize(("text", "expected"), [
    (BASE + "os_desc = 1\n", "os_desc: expected a table"),
    (BASE + "[os_desc]\nb_vendor_code = 1\nvendor = 2\n" + CONFIG1, "os_desc.vendor: unknown key"),
    (BASE + "[os_desc]\nuse = true\n" + CONFIG1, "os_desc.b_vendor_code: missing"),
    (BASE + "[os_desc]\nb_vendor_code = 256\n" + CONFIG1,
     "os_desc.b_vendor_code: 256 is out of range 0..255"),
    (BASE + "[os_desc]\nb_vendor_code = 1\nuse = 2\n" + CONFIG1, "os_desc.use: expected true or false"),
    (BASE + '[os_desc]\nb_vendor_code = 1\nqw_sign = "MSFT10"\n' + CONFIG1,
     "os_desc.qw_sign: 'MSFT10' is not 7 printable ASCII characters"),
    (BASE + '[os_desc]\nb_vendor_code = 1\nqw_sign = "MSFT1000"\n' + CONFIG1, "longer than 7 bytes"),
    (BASE + '[os_desc]\nb_vendor_code = 1\nqw_sign = "MSFT10é"\n' + CONFIG1, "longer than 7 bytes"),
    (BASE + '[os_desc]\nb_vendor_code = 1\nqw_sign = "MSFT 10"\n' + CONFIG1,
     "is not 7 printable ASCII"),
    (BASE + "[os_desc]\nb_vendor_code = 1\nconfig = 2\n" + CONFIG1,
     "os_desc.config: 2 is not the number of one of the [[configs]] (1)"),
    (BASE + "[os_desc]\nb_vendor_code = 1\nconfig = true\n" + CONFIG1, "os_desc.config: True is not"),
    (BASE + "[os_desc]\nb_vendor_code = 1\n", "os_desc: use = true needs a [[configs]]"),
    (BASE + CONFIG1 + RNDIS_IF + 'compatible_id = "rndis"\n',
     "functions.\"rndis.r\".os_desc.interface.rndis.compatible_id: 'rndis' is not a compatible id"),
    (BASE + CONFIG1 + RNDIS_IF + 'compatible_id = "RNDIS6789"\n', "longer than 8 bytes"),
    (BASE + CONFIG1 + RNDIS_IF + 'sub_compatible_id = "5162 01"\n', "is not a compatible id"),
    (BASE + CONFIG1 + RNDIS_IF + "compatible_id = 5162001\n", "expected a string"),
    (BASE + CONFIG1 + RNDIS_IF + 'class_id = "X"\n', "rndis.class_id: unknown key"),
    (BASE + CONFIG1 + '[functions."rndis.r".os_desc.interface.usb0]\n',
     "rndis names its interface os_desc/interface.rndis, not interface.usb0"),
    (BASE + '[functions."acm.a".os_desc.interface.acm]\n',
     "functions.\"acm.a\".os_desc.interface.acm: acm has no OS descriptor interface"),
    (BASE + CONFIG1 + '[functions."rndis.r".os_desc]\nrndis = {}\n',
     "functions.\"rndis.r\".os_desc.rndis: unknown key (known: interface)"),
    (BASE + CONFIG1 + '[functions."rndis.r".os_desc.interface]\n"a/b" = {}\n',
     'os_desc.interface."a/b": not an interface name'),
    (BASE + CONFIG1 + '[functions."rndis.r".os_desc.interface]\n"rndis\\n" = {}\n',
     'os_desc.interface."rndis\\n": not an interface name'),
    (BASE + CONFIG1 + '[functions."rndis.r".os_desc]\ninterface = 1\n',
     "os_desc.interface: expected a table"),
])
def test_invalid_os_desc_names_the_key_at_fault(text, expected):
    message = error_of(text)
    assert message.startswith("t.toml: ")
    assert expected in message


def test_uncatalogued_functions_may_have_os_desc_interfaces():
    spec = spec_of('[functions."ffs.adb".os_desc.interface.adb]\ncompatible_id = "WINUSB"\n')
    assert spec.functions["ffs.adb"].os_desc == {"adb": InterfaceOsDesc("WINUSB")}


def test_load_spec_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('name = "g"\nid_vendor = 1\nid_product = "x"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: id_product: expected an integer"):
        load_spec(p)
    with pytest.raises(ConfigError, match=r"missing\.toml: No such file"):
        load_spec(tmp_path / "missing.toml")


def test_parse_spec_accepts_plain_dicts():
    spec = parse_spec({"name": "g", "id_vendor": 1, "id_product": 2,
                       "functions": {"acm.a": {}}, "configs": [{"number": 1,
                                                                "functions": ["acm.a"]}]})
    assert spec.configs == (ConfigSpec(number=1, functions=("acm.a",)),)
    assert spec.functions == {"acm.a": FunctionSpec(name="acm.a")}


# ---------------------------------------------------------------- HID presets

def _hid_report_bits(desc: bytes) -> tuple[dict[str, int], list[int]]:
    """Walk a report descriptor: bits per Input/Output report, and the usages seen."""
    bits = {"input": 0, "output": 0}
    size = count = 0
    depth = 0
    usages = []
    i = 0
    while i < len(desc):
        prefix = desc[i]
        n = (0, 1, 2, 4)[prefix & 3]
        data = int.from_bytes(desc[i + 1:i + 1 + n], "little")
        tag = prefix & 0xFC
        if tag == 0x74:
            size = data
        elif tag == 0x94:
            count = data
        elif tag == 0x80:
            bits["input"] += size * count
        elif tag == 0x90:
            bits["output"] += size * count
        elif tag == 0xA0:
            depth += 1
        elif tag == 0xC0:
            depth -= 1
        elif tag == 0x08:
            usages.append(data)
        i += 1 + n
    assert depth == 0, "collections must balance"
    return bits, usages


def test_keyboard_preset_is_a_boot_keyboard():
    p = hid.PRESETS["keyboard"]
    bits, usages = _hid_report_bits(p.report_desc)
    assert (p.subclass, p.protocol) == (1, 1)  # boot interface, keyboard
    assert usages[0] == 0x06  # Generic Desktop / Keyboard
    assert bits == {"input": 64, "output": 8}  # 8-byte input report, 1-byte LED report
    assert p.report_length == bits["input"] // 8
    assert len(p.report_desc) == 63


def test_mouse_preset_is_a_boot_mouse():
    p = hid.PRESETS["mouse"]
    bits, usages = _hid_report_bits(p.report_desc)
    assert (p.subclass, p.protocol) == (1, 2)
    assert usages[:2] == [0x02, 0x01]  # Mouse, Pointer
    assert bits == {"input": 24, "output": 0}
    assert p.report_length == 3
    assert len(p.report_desc) == 50


# ---------------------------------------------------------------- TOML round trip

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\0"),
                max_size=30)  # at most 120 bytes of UTF-8
_word = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=8)


@st.composite
def specs(draw: st.DrawFn) -> GadgetSpec:
    functions: dict[str, FunctionSpec] = {}
    if draw(st.booleans()):
        functions["hid." + draw(_word)] = FunctionSpec(
            name="", attrs={**hid.PRESETS[draw(st.sampled_from(["keyboard", "mouse"]))].attrs(),
                            "no_out_endpoint": draw(st.booleans())})
    if draw(st.booleans()):
        functions["hid.raw" + draw(_word)] = FunctionSpec(
            name="", attrs={"report_length": draw(st.integers(1, 64)),
                            "report_desc": draw(st.binary(min_size=1, max_size=40))})
    if draw(st.booleans()):
        luns = {n: {"removable": True, "ro": draw(st.booleans()),
                    "inquiry_string": draw(st.text(string.ascii_letters + " ", max_size=28))
                    .strip()}
                for n in draw(st.sets(st.integers(0, 15), max_size=3))}
        functions["mass_storage." + draw(_word)] = FunctionSpec(name="", luns=luns)
    if draw(st.booleans()):
        functions["ecm." + draw(_word)] = FunctionSpec(
            name="", attrs={"qmult": draw(st.integers(0, 20)), "dev_addr": "02:00:00:00:00:01",
                            "ifname": "usb%d"})
    functions["acm." + draw(_word)] = FunctionSpec(name="")
    if draw(st.booleans()):
        ids = st.text(string.ascii_uppercase + string.digits + "_", max_size=8)
        functions["rndis." + draw(_word)] = FunctionSpec(
            name="", os_desc={"rndis": InterfaceOsDesc(draw(ids), draw(ids))})
    if draw(st.booleans()):
        functions["uac2." + draw(_word)] = FunctionSpec(
            name="", attrs={"c_srate": draw(st.integers(0, 10**6)), "function_name": draw(
                st.text(string.ascii_letters + " /", min_size=1, max_size=10)).strip() or "x"})
    functions = {k: FunctionSpec(name=k, attrs=v.attrs, luns=v.luns, os_desc=v.os_desc)
                 for k, v in functions.items()}
    names = list(functions)
    configs = tuple(
        ConfigSpec(number=i + 1, label=draw(st.sampled_from(["c", "b"])),
                   attrs={"MaxPower": draw(st.integers(0, 500))},
                   strings={0x409: {"configuration": draw(_text)}} if draw(st.booleans()) else {},
                   functions=tuple(draw(st.permutations(names))[:draw(st.integers(1, len(names)))]))
        for i in range(draw(st.integers(0, 2)))
    )
    strings = {0x409: {"manufacturer": draw(_text), "product": draw(_text)}}
    if draw(st.booleans()):
        strings[0x407] = {"serialnumber": draw(_text)}
    os_desc = None
    if configs and draw(st.booleans()):
        os_desc = OsDescSpec(use=draw(st.booleans()), b_vendor_code=draw(st.integers(0, 255)),
                             qw_sign=draw(st.from_regex(r"\A[!-~]{7}\Z")),
                             config=draw(st.sampled_from([c.number for c in configs])))
    return GadgetSpec(
        os_desc=os_desc,
        name=draw(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,15}\Z")),
        attrs={"idVendor": draw(st.integers(0, 0xFFFF)), "idProduct": draw(st.integers(0, 0xFFFF)),
               "bDeviceClass": draw(st.integers(0, 255))},
        strings=strings, configs=configs, functions=functions,
        udc=draw(st.sampled_from([None, "auto", "none", "usbip-vudc.3"])) if configs else None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_dump_spec_reads_back_to_the_same_spec(spec):
    text = dump_spec(spec)
    assert loads_spec(text) == spec, text


# ---------------------------------------------------------------- names: the whole string

# A pattern anchored with ``$`` and used with ``re.match`` accepts a trailing newline;
# each of these names ends up in a configfs path (or is written to UDC), so none may.
ACM = '[[configs]]\nnumber = 1\nfunctions = ["acm.a"]\n[functions."acm.a"]\n'


@pytest.mark.parametrize(("text", "expected"), [
    (BASE.replace('"g1"', '"g1\\n"'), "name: 'g1\\n' is not a gadget name"),
    (BASE + ACM.replace("number = 1\n", 'number = 1\nlabel = "c\\n"\n'),
     "configs[0].label: 'c\\n' is not a config label"),
    (BASE + '[functions."acm.a\\n"]\n', 'functions."acm.a\\n": a function is named'),
    (BASE + 'udc = "dummy_udc.0\\n"\n' + ACM, "udc: 'dummy_udc.0\\n' is not a UDC name"),
    (BASE + '[strings."0x409\\n"]\nproduct = "x"\n', 'strings."0x409\\n": not a language id'),
    (BASE + '[functions."mass_storage.m"]\n"lun.0\\n" = {}\n',
     'functions."mass_storage.m"."lun.0\\n": not a configfs attribute name'),
])
def test_a_name_with_a_trailing_newline_is_refused(text, expected):
    assert expected in error_of(text)
