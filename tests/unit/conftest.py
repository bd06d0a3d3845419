"""Unit-tier fixtures: a fake kernel (lab-captured sysfs in pyfakefs) and its Sysfs.

    def test_x(kernel): ...                              # default machine, see DEFAULT_SCENARIOS
    @pytest.mark.scenario("host_bound")                  # pick the snapshots
    def test_y(kernel, sysfs): ...
    @pytest.mark.parametrize("kernel", ["vhci_free", "vhci_attached"], indirect=True)
    def test_z(kernel): ...
    def test_w(make_kernel):                             # several kernels / late choice
        k = make_kernel("host_unbound", "vhci_free")

See ``fakekernel.py`` for the kernel's API (write log, faults, races).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator

import pytest
from fakekernel import FakeKernel, FakeKernelSysfs
from loguru import logger
from loopback import LoopbackServer, Spy

from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.vhci import VhciDriver

DEFAULT_SCENARIOS = ("host_unbound", "vhci_free", "vudc")
"""A whole machine with nothing bound, attached or exported (gadget v1 on usbip-vudc.0)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "scenario(*names): sysfs snapshots the `kernel` fixture loads "
        "(host_unbound, host_bound, vhci_free, vhci_attached, vudc)",
    )


@pytest.fixture
def make_kernel(fs: object) -> Callable[..., FakeKernel]:
    """Factory: ``make_kernel(*scenarios)`` -> a :class:`FakeKernel` on pyfakefs."""

    def make(*scenarios: str) -> FakeKernel:
        return FakeKernel(fs, *scenarios)

    return make


@pytest.fixture
def kernel(request: pytest.FixtureRequest, make_kernel: Callable[..., FakeKernel]) -> FakeKernel:
    """A fake kernel loaded with the scenario(s) of ``indirect`` parametrization, the
    ``scenario`` marker, or :data:`DEFAULT_SCENARIOS`."""
    param = getattr(request, "param", None)
    if param is not None:
        names = (param,) if isinstance(param, str) else tuple(param)
    elif (marker := request.node.get_closest_marker("scenario")) is not None:
        names = tuple(marker.args)
    else:
        names = DEFAULT_SCENARIOS
    return make_kernel(*names)


@pytest.fixture
def sysfs(kernel: FakeKernel) -> FakeKernelSysfs:
    """The fake kernel's Sysfs, for the drivers under test."""
    return kernel.sysfs


@pytest.fixture
def usbipa(kernel: FakeKernel) -> Iterator[tuple[LoopbackServer, Spy]]:
    """A real usbipa handler on the fake kernel's vhci, served on loopback."""
    spy = Spy(UsbipaHandler(VhciDriver(kernel.sysfs)))
    with LoopbackServer(spy, "usbipa") as srv:
        yield srv, spy


@pytest.fixture(autouse=True)
def _restore_logging():
    """CLI tests configure loguru (sinks on the runner's stderr); undo after each test."""
    from loguru import logger

    yield
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """The messages logged during the test (DEBUG and up)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    yield lines
    logger.remove(sink)


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    """Connected sockets, as the server would pass them; closed after the test."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()
