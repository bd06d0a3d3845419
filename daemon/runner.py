"""``usbipx supervisor run``: the asyncio loop around :class:`Supervisor`.

It wires the OS to the state machine: workers forked by
:class:`~usbipx.daemon.spawn.ProcessSpawner`, kernel uevents from
:class:`~usbipx.daemon.hotplug.Hotplug`, the control socket of
:mod:`usbipx.daemon.control`, signals (SIGHUP reloads, SIGTERM/SIGINT stop),
systemd's notify protocol, and the clock (:meth:`Supervisor.tick`).

Workers log through the parent: each worker's loguru sink forwards records
over its own pipe, and the parent writes them to the one real sink with the
export and pid bound (:func:`usbipx.log.configure_supervisor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import TYPE_CHECKING

from usbipx.daemon import sdnotify
from usbipx.daemon.config import SupervisorConfig, load_config
from usbipx.daemon.control import control_server
from usbipx.daemon.hotplug import Hotplug, present_devices
from usbipx.daemon.spawn import ProcessSpawner
from usbipx.daemon.supervisor import Supervisor, jobs_for
from usbipx.daemon.worker import clean_leftovers
from usbipx.errors import UsbipError
from usbipx.log import logger
from usbipx.sysfs import Sysfs

if TYPE_CHECKING:
    from usbipx.metrics import Metrics

TICK = 0.25
"""Seconds between :meth:`Supervisor.tick` calls (restarts due, stop deadlines)."""


async def run(config_path: str, sysfs: Sysfs | None = None,
              metrics: Metrics | None = None) -> None:
    """Run the supervisor until SIGTERM/SIGINT; every worker cleans up before we return.

    ``sysfs`` (default: the real one) is what the supervisor and every worker
    act on.  A control socket that cannot be had (another supervisor answers
    there, or the path is impossible), or a metrics address that cannot be,
    is a :class:`UsbipError` before anything is cleaned up, forked or changed.
    """
    sysfs = sysfs or Sysfs()
    config = load_config(config_path)
    loop = asyncio.get_running_loop()
    spawner = ProcessSpawner(loop, sysfs)
    sup = Supervisor(config, spawner, metrics=metrics)
    spawner.sup = sup
    control = await control_server(config.options.control_socket, sup)
    if metrics is not None and metrics.address is not None:
        try:
            metrics.serve()  # workers close the inherited listening socket
        except UsbipError:
            control.close()
            with contextlib.suppress(OSError):
                os.unlink(config.options.control_socket)
            raise
    hotplug: Hotplug | None = None
    try:
        for key in clean_leftovers(config.options.state_dir, _keys(config, sysfs), sysfs):
            logger.info("cleaned up {} left by a previous supervisor", key)
        _handle_signals(loop, sup, config_path)
        try:
            hotplug = Hotplug(sup.on_device, sysfs=sysfs)
            loop.add_reader(hotplug.fileno(), hotplug.readable)
        except Exception as exc:  # no libudev: vendor/product exports see only present devices
            logger.warning("no hotplug events ({}); devices plugged in later are not seen", exc)
        if config.server.scheme == "tls" and config.server.data_path != "relay":
            from usbipx import ktls

            # Before the first export: loading the kernel's tls and gcm modules
            # can take seconds, which workers should not spend mid-handoff.
            await loop.run_in_executor(None, ktls.preload)
        sup.start(present_devices(sysfs))
        sdnotify.notify("READY=1")
        logger.info("supervisor {} running {} export(s)", os.getpid(), len(sup.slots))
        await _loop(loop, sup)
    finally:
        control.close()
        with contextlib.suppress(OSError):
            os.unlink(config.options.control_socket)
        if hotplug is not None:
            loop.remove_reader(hotplug.fileno())
    logger.info("supervisor stopped")


def _handle_signals(loop: asyncio.AbstractEventLoop, sup: Supervisor, config_path: str) -> None:
    """SIGHUP reloads ``config_path``; SIGTERM and SIGINT stop every export."""

    def reload() -> None:
        try:
            new = load_config(config_path)
        except UsbipError as exc:
            logger.error("reload refused, keeping the running configuration: {}", exc)
            return
        logger.info("reloading {}", config_path)
        if (new.options.control_socket, new.options.state_dir) != (
                sup.config.options.control_socket, sup.config.options.state_dir):
            logger.warning("control_socket and state_dir change only with a restart")
        sup.reload(new)

    def shutdown() -> None:
        if not sup.shutting_down:
            logger.info("stopping every export")
            sdnotify.notify("STOPPING=1")
            sup.shutdown()

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, shutdown)
    loop.add_signal_handler(signal.SIGINT, shutdown)


async def _loop(loop: asyncio.AbstractEventLoop, sup: Supervisor) -> None:
    """Tick until every worker has stopped; keep systemd's status and watchdog fed."""
    watchdog = sdnotify.watchdog_interval()
    last_dog = 0.0
    shown = ""
    while not sup.done:
        await asyncio.sleep(TICK)
        sup.tick()
        if sup.summary() != shown:  # systemctl status shows it
            shown = sup.summary()
            sdnotify.notify(f"STATUS={shown}")
        now = loop.time()
        if watchdog and now - last_dog >= watchdog:
            # Pinged from the event loop: a wedged loop stops the pings.
            sdnotify.notify("WATCHDOG=1")
            last_dog = now


def _keys(config: SupervisorConfig, sysfs: Sysfs) -> set[str]:
    """The exports the configuration asks for now: their leftovers are adopted, not undone."""
    return set(jobs_for(config, present_devices(sysfs)))
