"""Every way a TOML file can be unreadable is one ConfigError naming the file; the
number validators take only numbers of the right type within their bounds."""

from __future__ import annotations

import math

import pytest

from usbipx.errors import ConfigError
from usbipx.tomlfile import read_toml, toml_int, toml_number


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


@pytest.mark.parametrize("value", [1, 2, 65535])
def test_toml_int_takes_an_integer_within_its_bounds(value: int) -> None:
    out = toml_int(value, "server.port", 1, 65535)
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [
    0, 65536, -1, 1 << 64,  # out of range, just below, just above, far above
    True, False,  # TOML booleans are Python ints, not integers to a config
    1.0, 80.5, math.inf, math.nan,  # a float where an integer is wanted
    "80", None, [80],
])
def test_toml_int_refuses_anything_else_in_one_line(value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        toml_int(value, "a.toml: server.port", 1, 65535)
    assert str(exc.value) == f"a.toml: server.port must be an integer 1..65535, got {value!r}"


@pytest.mark.parametrize(("value", "expected"), [
    (1, 1.0), (3600, 3600.0), (0.5, 0.5), (1e-3, 0.001), (2.5, 2.5),
])
def test_toml_number_takes_an_int_or_float_within_its_bounds(value: float,
                                                             expected: float) -> None:
    out = toml_number(value, "supervisor.poll_interval", 0.001, 3600)
    assert out == expected and type(out) is float


@pytest.mark.parametrize("value", [
    0, 0.0009, 3600.001, 1e10, -1.0,  # out of range
    True, False,  # booleans are not numbers
    math.nan, math.inf, -math.inf,  # TOML nan/inf: no usable delay or timeout
    "1", None,
])
def test_toml_number_refuses_anything_else_in_one_line(value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        toml_number(value, "a.toml: supervisor.poll_interval", 0.001, 3600)
    assert str(exc.value) == ("a.toml: supervisor.poll_interval must be a number 0.001..3600,"
                              f" got {value!r}")


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_toml_number_refuses_non_finite_values_even_without_an_upper_bound(
        value: float) -> None:
    with pytest.raises(ConfigError, match=r"must be a number 0\.\.inf"):
        toml_number(value, "x", 0, math.inf)
    assert toml_number(1e300, "x", 0, math.inf) == 1e300
