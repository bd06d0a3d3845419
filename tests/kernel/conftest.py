"""Kernel tier: runs inside the lab VM (scripts/lab), never on the host.

The session fixture loads the drivers once per boot; tests share one VM boot
and clean up after themselves (see ``lab`` helpers).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from pathlib import Path

import pytest

if os.environ.get("USBIPX_IN_LAB") != "1":
    pytest.exit(
        "tests/kernel runs only inside the lab kernel: "
        "scripts/lab run -- .venv/bin/pytest tests/kernel", returncode=2,
    )

from labkit import (
    HOSTNAME,
    SERVER_IP,
    USBIPX,
    Daemon,
    driver_of,
    free_tcp_port,
    in_ns,
    load_drivers,
    make_disk,
    mass_storage_gadget,
    netns_down,
    reset_usbip,
    usb_busid_on_udc,
    usbipx,
    wait_for,
)

DISK_MB = 4

# Rough seconds per module in the lab (TCG), for splitting the tier between
# parallel VMs (scripts/test runs USBIPX_SHARD=i/n).  Only balance depends on
# these figures; every test runs in exactly one shard whatever they say.
MODULE_WEIGHT: dict[str, float] = {  # measured: "seconds per module" of a lab run
    "tests/kernel/test_tls.py": 585, "tests/kernel/test_export.py": 560,
    "tests/kernel/test_wss.py": 455, "tests/kernel/test_foundation.py": 400,
    "tests/kernel/test_supervisor.py": 260, "tests/kernel/test_gadget.py": 250,
    "tests/kernel/test_concurrency.py": 145, "tests/kernel/test_fleet.py": 95,
    "tests/kernel/test_ownership.py": 30, "tests/kernel/test_ktls.py": 15,
}
DEFAULT_WEIGHT = 60.0


def shard_of(modules: dict[str, float], n: int) -> dict[str, int]:
    """Modules to ``n`` shards, heaviest first onto the lightest shard (LPT)."""
    load = [0.0] * n
    out: dict[str, int] = {}
    for name, weight in sorted(modules.items(), key=lambda kv: (-kv[1], kv[0])):
        k = load.index(min(load))
        out[name] = k
        load[k] += weight
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With USBIPX_SHARD=i/n keep only shard i's modules (whole modules, so that
    module-scoped fixtures are built once)."""
    spec = os.environ.get("USBIPX_SHARD")
    if not spec:
        return
    i, n = (int(x) for x in spec.split("/"))
    names = {item.nodeid.split("::")[0] for item in items}
    shards = shard_of({m: MODULE_WEIGHT.get(m, DEFAULT_WEIGHT) for m in names}, n)
    keep = [item for item in items if shards[item.nodeid.split("::")[0]] == i]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def lab_drivers() -> None:
    """configfs, libcomposite, dummy_hcd (8 UDCs), usbip-host, vhci-hcd, usbip-vudc (8)."""
    load_drivers()


@pytest.fixture
def run():
    """Run a command, return CompletedProcess (text); never raises on failure."""

    def _run(*cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

    return _run


@pytest.fixture(autouse=True)
def clean():
    """Every test starts and ends with no gadgets, stubs, vhci ports or namespaces."""
    reset_usbip()
    yield
    reset_usbip()
    netns_down()


@pytest.fixture
def stub_disk(tmp_path: Path):
    """A mass-storage gadget on dummy_udc.0: a USB disk on this host, not yet bound."""
    backing = tmp_path / "disk.img"
    data = make_disk(backing, DISK_MB)
    mass_storage_gadget("stubdisk", backing, "dummy_udc.0")
    busid = usb_busid_on_udc("dummy_udc.0")
    wait_for(lambda: driver_of(busid) == "usb", what=f"{busid} to enumerate")
    return busid, data


@pytest.fixture
def vudc_disk(tmp_path: Path):
    """A mass-storage gadget bound to usbip-vudc.0."""
    backing = tmp_path / "vdisk.img"
    data = make_disk(backing, DISK_MB)
    mass_storage_gadget("vudcdisk", backing, "usbip-vudc.0", product=0x0105)
    return "usbip-vudc.0", data


@pytest.fixture
def daemons():
    """Start daemons: ``start(kind, *args, ns=None, port=None)`` with kind usbipd, usbipa or
    c-usbipd; ``port`` (default: a free one) is ``-t`` and the port waited for."""
    started: list[Daemon] = []

    def start(kind: str, *extra: str, ns: str | None = None, host: str = "127.0.0.1",
              port: int | None = None) -> Daemon:
        port = port or free_tcp_port()
        if kind == "c-usbipd":
            argv = ["usbipd", "-t", str(port), *extra]
        else:
            argv = [USBIPX, "--debug", kind, "-t", str(port), *extra]
        d = Daemon(in_ns(ns, argv), port, ns=ns, host=host)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost and board certificates; also a
    board of another CA and an expired board certificate."""
    from usbipx import pki as lib

    d = tmp_path_factory.mktemp("pki")
    ca, other = d / "ca", d / "other"
    # The CLI makes the CA and the server's certificate, as a user would; the
    # rest comes from the library in this process (each CLI start costs seconds
    # in the lab, and these certificates only serve other tests).
    usbipx("pki", "init", str(ca))
    usbipx("pki", "issue", str(ca), "server", "--server", HOSTNAME, "--server", "127.0.0.1")
    lib.issue(ca, "server-ns", servers=[SERVER_IP])
    lib.issue(ca, "wrongname", servers=["elsewhere.example"])
    for board in ("board-1", "board-2", "kiosk-1"):
        lib.issue(ca, board)
    lib.init_ca(other)
    lib.issue(other, "board-1")
    _expired(ca, "old-board")
    return {"ca": ca, "other": other}


def _expired(ca: Path, name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (ca / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(ca / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


_test_started: dict[str, float] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    # printk stamps are seconds since boot on the monotonic clock, as this is.
    _test_started[item.nodeid] = time.monotonic()


def _kernel_log_since(started: float, limit: int = 250) -> str:
    lines = []
    for line in subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines():
        stamp = line[1:line.find("]")].strip() if line.startswith("[") else ""
        try:
            if float(stamp) >= started - 1.0:
                lines.append(line)
        except ValueError:
            continue
    cut = len(lines) - limit
    return "\n".join(([f"... {cut} earlier lines left out"] if cut > 0 else []) + lines[-limit:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failed kernel test shows what the kernel said while it ran: most lab
    failures are explained there (a reset device, a refused sockfd), not in the
    traceback."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        started = _test_started.get(item.nodeid, 0.0)
        report.sections.append(("kernel log during the test", _kernel_log_since(started)))


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::")[0]
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """Seconds per module, the figures MODULE_WEIGHT should follow."""
    if _module_seconds:
        terminalreporter.section("seconds per module")
        for module, secs in sorted(_module_seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{secs:7.0f}  {module}")
