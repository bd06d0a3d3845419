"""Every way a TOML file can be unreadable is one ConfigError naming the file."""

from __future__ import annotations

import pytest

from usbipx.errors import ConfigError
from usbipx.tomlfile import read_toml


def test_reads_a_table(tmp_path) -> None:
    p = tmp_path / "a.toml"
    p.write_text('name = "x"\n[t]\nn = 1\n')
    assert read_toml(p) == {"name": "x", "t": {"n": 1}}


@pytest.mark.parametrize(("content", "message"), [
    (None, r"cannot read policy .*missing\.toml: No such file"),
    (b"\xff\xfe = 1\n", r"bad\.toml: not UTF-8 text"),
    (b"name = \n", r"bad\.toml: invalid TOML"),
])
def test_failures_name_the_file(tmp_path, content: bytes | None, message: str) -> None:
    p = tmp_path / ("missing.toml" if content is None else "bad.toml")
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_toml(p, "policy")
