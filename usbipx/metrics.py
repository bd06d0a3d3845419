"""Prometheus metrics of usbipa, usbipd and the supervisor (``--metrics ADDR:PORT``).

One :class:`Metrics` object per process holds every metric, in a registry of
its own (never prometheus_client's global one: two objects, say two tests,
never share a number).  The parts that count take it as an optional
argument -- None when metrics are off -- so nothing here is global, and
``prometheus_client`` is imported only when metrics are on: a command that
does not serve them does not pay for it.

=====================================  =======  ================================================
metric                                 labels   what
=====================================  =======  ================================================
``usbipx_exports_active``              peer     usbipa: devices attached for each peer; the
                                                supervisor: its exports held by each usbipa
``usbipx_imports_active``              peer     usbipd: devices each peer has imported
``usbipx_attaches_total``                       devices attached (usbipa) or handed over (usbipd)
``usbipx_refusals_total``              reason   connections and requests refused (:data:`REASONS`)
``usbipx_handshake_seconds``           transport  TLS (``tls``) and ``wss`` handshakes served
``usbipx_link_losses_total``                    exports that ended without being withdrawn
``usbipx_reexports_total``                      supervisor: exports made again after a loss
``usbipx_worker_restarts_total``                supervisor: workers started again
``usbipx_workers``                     state    supervisor: exports in each state
``usbipx_relay_bytes_total``           direction  plaintext relayed ``to_network`` / ``to_kernel``
                                                (the supervisor: by its relaying workers)
=====================================  =======  ================================================

A peer is its certificate identity over TLS and wss, its IP address over plain
TCP (for the supervisor: the usbipa's URL).
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from usbipx.errors import UsbipError, ValidationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

REASONS = (
    "network",      # the peer's address is outside the allowed networks
    "connections",  # a cap on connections (in all, per address) was reached
    "handshake",    # the TLS handshake failed or timed out
    "identity",     # the TLS peer's certificate identity is not allowed
    "bad_request",  # a malformed, late or missing request, a wrong wss path
    "policy",       # a device rule or the default policy refused the device
    "serial",       # a rule named a serial number the device does not have
    "limit",        # the peer already has as many devices as it may
    "busy",         # already attached and alive; in use (usbipd)
    "no_port",      # no free vhci_hcd port of the device's speed
    "no_device",    # usbipd: no such exportable device
    "unsupported",  # a speed vhci_hcd cannot take, a request this daemon does not serve
    "error",        # the kernel refused, or could not be read
)
"""The values of ``usbipx_refusals_total``'s ``reason`` label."""

HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: a handshake on a LAN takes milliseconds, over a cellular link up to seconds."""

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``127.0.0.1:9240``, ``[::1]:9240``, ``localhost:9240``) as
    (address, port); :class:`ValidationError` naming the problem otherwise."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ok = ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
    else:
        ok = _HOST.fullmatch(host) is not None
    if not sep or not ok or not port.isascii() or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise ValidationError(f"bad --metrics address {text!r}: expected ADDR:PORT, e.g. "
                              "127.0.0.1:9240 or [::1]:9240")
    return host, int(port)


class _Live:
    """A gauge whose samples a function gives at each scrape (a state, not a count)."""

    def __init__(self, name: str, doc: str, label: str,
                 source: Callable[[], Mapping[str, float]]) -> None:
        self.name, self.doc, self.label, self.source = name, doc, label, source

    def _family(self, values: Mapping[str, float]) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.doc, labels=[self.label])
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
        return family

    def describe(self) -> Iterator[Any]:
        yield self._family({})

    def collect(self) -> Iterator[Any]:
        yield self._family(self.source())


class Metrics:
    """Every metric of one process, in its own registry; see the module docstring."""

    def __init__(self, address: tuple[str, int] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.address = address
        """Where :meth:`serve` serves them (``--metrics``)."""
        self.registry: CollectorRegistry = CollectorRegistry()
        r = self.registry
        self.attaches = Counter(
            "usbipx_attaches", "Devices attached to vhci_hcd (usbipa) or handed to the kernel "
            "for a peer (usbipd).", registry=r)
        self.refusals = Counter(
            "usbipx_refusals", "Connections and requests refused, by reason.", ["reason"],
            registry=r)
        self.handshake = Histogram(
            "usbipx_handshake_seconds", "TLS and wss handshakes served, from accept to done.",
            ["transport"], buckets=HANDSHAKE_BUCKETS, registry=r)
        self.link_losses = Counter(
            "usbipx_link_losses", "Exports that ended without being withdrawn (the "
            "connection died, or the kernel gave up on it).", registry=r)
        self.reexports = Counter(
            "usbipx_reexports", "Exports made again after one was lost (supervisor).",
            registry=r)
        self.worker_restarts = Counter(
            "usbipx_worker_restarts", "Workers started again after one ended (supervisor).",
            registry=r)
        self.relay_bytes = Counter(
            "usbipx_relay_bytes", "Plaintext bytes relayed between the kernel and the "
            "network (TLS without kernel TLS, wss).", ["direction"], registry=r)
        self._server: Any = None

    # -- counting ----------------------------------------------------------------------

    def refused(self, reason: str) -> None:
        """Count a refusal; ``reason`` is one of :data:`REASONS`."""
        if reason not in REASONS:  # a bug: the label set must stay small and known
            raise ValueError(f"unknown refusal reason {reason!r}")
        self.refusals.labels(reason).inc()

    def relayed(self, direction: str, nbytes: int) -> None:
        """Count ``nbytes`` relayed ``to_network`` or ``to_kernel``."""
        self.relay_bytes.labels(direction).inc(nbytes)

    def live(self, name: str, doc: str, label: str,
             source: Callable[[], Mapping[str, float]]) -> None:
        """Register gauge ``name`` whose values ``source()`` returns at each scrape,
        keyed by the value of ``label`` (e.g. devices attached per peer)."""
        self.registry.register(_Live(name, doc, label, source))

    def text(self) -> str:
        """The Prometheus text exposition of every metric (what a scrape gets)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    # -- serving ---------------------------------------------------------------------

    def serve(self) -> None:
        """Serve ``/metrics`` on :attr:`address` from a daemon thread; :class:`UsbipError`
        (one line) if the address cannot be had."""
        from prometheus_client import start_http_server

        assert self.address is not None
        address = host, port = self.address
        try:
            self._server, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise UsbipError(f"cannot serve metrics on {_show(address)}: "
                             f"{exc.strerror or exc}") from None

    @property
    def port(self) -> int:
        """The port metrics are served on (after :meth:`serve`)."""
        assert self._server is not None
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving (tests; a daemon serves until it exits)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _show(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_address(address: tuple[str, int]) -> None:
    """Raise :class:`UsbipError` unless ``address`` can be listened on now: a daemon
    that detaches starts serving only in its final process, but a port in use must be
    said while the terminal still sees it."""
    import socket

    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as exc:
        raise UsbipError(f"cannot serve metrics on {_show(address)}: "
                         f"{exc.strerror or exc}") from None


class Holdings:
    """What a daemon holds for its peers right now: key -> owner, behind a lock (the
    handler runs on the event loop, scrapes come from the metrics thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[Any, str] = {}

    def add(self, key: Any, owner: str) -> None:
        with self._lock:
            self._held[key] = owner

    def forget(self, key: Any) -> str | None:
        """Drop ``key``; its owner, or None if it was not held."""
        with self._lock:
            return self._held.pop(key, None)

    def items(self) -> list[tuple[Any, str]]:
        with self._lock:
            return list(self._held.items())

    def by_owner(self) -> dict[str, float]:
        """How many each owner holds."""
        counts: dict[str, float] = {}
        for _, owner in self.items():
            counts[owner] = counts.get(owner, 0) + 1
        return counts
