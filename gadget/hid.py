"""HID presets for the ``hid`` gadget function.

A preset fills the four attributes f_hid needs (``subclass``, ``protocol``,
``report_length``, ``report_desc``).  The descriptors are the boot-protocol
ones from the HID 1.11 specification (appendix B), so a BIOS or boot loader
can use the device as well as a full HID driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class HidPreset:
    """Values of the hid function attributes for one kind of device."""

    name: str
    subclass: int
    protocol: int
    report_length: int
    report_desc: bytes

    def attrs(self) -> dict[str, int | bytes]:
        """The preset as configfs attribute name -> value."""
        return {
            "subclass": self.subclass,
            "protocol": self.protocol,
            "report_length": self.report_length,
            "report_desc": self.report_desc,
        }


# HID 1.11 appendix B.1: boot keyboard.  Input report: modifier byte, reserved
# byte, six key codes (8 bytes); output report: five LEDs + 3 bits padding.
KEYBOARD_REPORT_DESC = bytes.fromhex(
    "05 01"  # Usage Page (Generic Desktop)
    "09 06"  # Usage (Keyboard)
    "a1 01"  # Collection (Application)
    "05 07"  #   Usage Page (Key Codes)
    "19 e0"  #   Usage Minimum (224)
    "29 e7"  #   Usage Maximum (231)
    "15 00"  #   Logical Minimum (0)
    "25 01"  #   Logical Maximum (1)
    "75 01"  #   Report Size (1)
    "95 08"  #   Report Count (8)
    "81 02"  #   Input (Data, Variable, Absolute): modifier byte
    "95 01"  #   Report Count (1)
    "75 08"  #   Report Size (8)
    "81 01"  #   Input (Constant): reserved byte
    "95 05"  #   Report Count (5)
    "75 01"  #   Report Size (1)
    "05 08"  #   Usage Page (LEDs)
    "19 01"  #   Usage Minimum (1)
    "29 05"  #   Usage Maximum (5)
    "91 02"  #   Output (Data, Variable, Absolute): LED report
    "95 01"  #   Report Count (1)
    "75 03"  #   Report Size (3)
    "91 01"  #   Output (Constant): LED report padding
    "95 06"  #   Report Count (6)
    "75 08"  #   Report Size (8)
    "15 00"  #   Logical Minimum (0)
    "25 65"  #   Logical Maximum (101)
    "05 07"  #   Usage Page (Key Codes)
    "19 00"  #   Usage Minimum (0)
    "29 65"  #   Usage Maximum (101)
    "81 00"  #   Input (Data, Array): key arrays (6 bytes)
    "c0"  # End Collection
)

# HID 1.11 appendix B.2: boot mouse.  Input report: three buttons + 5 bits
# padding, X, Y (relative, -127..127): 3 bytes.
MOUSE_REPORT_DESC = bytes.fromhex(
    "05 01"  # Usage Page (Generic Desktop)
    "09 02"  # Usage (Mouse)
    "a1 01"  # Collection (Application)
    "09 01"  #   Usage (Pointer)
    "a1 00"  #   Collection (Physical)
    "05 09"  #     Usage Page (Buttons)
    "19 01"  #     Usage Minimum (1)
    "29 03"  #     Usage Maximum (3)
    "15 00"  #     Logical Minimum (0)
    "25 01"  #     Logical Maximum (1)
    "95 03"  #     Report Count (3)
    "75 01"  #     Report Size (1)
    "81 02"  #     Input (Data, Variable, Absolute): buttons
    "95 01"  #     Report Count (1)
    "75 05"  #     Report Size (5)
    "81 01"  #     Input (Constant): padding
    "05 01"  #     Usage Page (Generic Desktop)
    "09 30"  #     Usage (X)
    "09 31"  #     Usage (Y)
    "15 81"  #     Logical Minimum (-127)
    "25 7f"  #     Logical Maximum (127)
    "75 08"  #     Report Size (8)
    "95 02"  #     Report Count (2)
    "81 06"  #     Input (Data, Variable, Relative): X, Y
    "c0"  #   End Collection
    "c0"  # End Collection
)

# Interface subclass 1 = boot interface; protocol 1 = keyboard, 2 = mouse.
PRESETS: dict[str, HidPreset] = {
    "keyboard": HidPreset("keyboard", subclass=1, protocol=1, report_length=8,
                          report_desc=KEYBOARD_REPORT_DESC),
    "mouse": HidPreset("mouse", subclass=1, protocol=2, report_length=3,
                       report_desc=MOUSE_REPORT_DESC),
}


def preset_matching(attrs: Mapping[str, object]) -> HidPreset | None:
    """The preset whose four attributes all equal those in ``attrs``, if any."""
    for preset in PRESETS.values():
        if all(attrs.get(k) == v for k, v in preset.attrs().items()):
            return preset
    return None
