"""Mutual TLS settings: the certificate files and the SSL contexts built from them.

Both ends authenticate: a board (client) verifies the server's certificate
and its name, a daemon (server) requires a client certificate signed by its
CA.  There is deliberately no way to turn verification off.  Servers send
no session tickets: a ticket is a TLS record that arrives after the
handshake, and once the kernel reads the connection (kernel TLS) it cannot
take anything but application data.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from usbipx.errors import ConfigError

ENV = {"cert": "USBIPX_CERT", "key": "USBIPX_KEY", "ca": "USBIPX_CA"}


@dataclass(frozen=True)
class TlsFiles:
    """This end's certificate and key, and the CA its peers' certificates must chain to."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, ca: str | None,
                     env: Mapping[str, str] | None = None) -> TlsFiles | None:
        """The files given as options, else from ``USBIPX_CERT/KEY/CA``; None if none
        is given at all, :class:`ConfigError` if only some are."""
        env = os.environ if env is None else env
        given = {"cert": cert or env.get(ENV["cert"]), "key": key or env.get(ENV["key"]),
                 "ca": ca or env.get(ENV["ca"])}
        if not any(given.values()):
            return None
        missing = [f"--{k} (or {ENV[k]})" for k, v in given.items() if not v]
        if missing:
            raise ConfigError(f"TLS needs --cert, --key and --ca; missing {', '.join(missing)}")
        files = cls(Path(given["cert"] or ""), Path(given["key"] or ""), Path(given["ca"] or ""))
        files.check()
        return files

    def check(self) -> None:
        """Each file is a readable regular file; the key is readable by its owner only."""
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            try:
                st = path.stat()
            except OSError as exc:
                raise ConfigError(f"TLS {what} {path}: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"TLS {what} {path}: not a regular file")
        mode = stat.S_IMODE(self.key.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"TLS key {self.key} is readable by others (mode {mode:04o}); "
                              f"chmod 600 {self.key}")


def _context(purpose: int, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS CA {files.ca}: cannot load it ({_reason(exc)})") from None
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS certificate {files.cert} with key {files.key}: cannot load "
                          f"them ({_reason(exc)})") from None
    return ctx


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A board's context: the server's certificate must chain to ``files.ca`` and
    name the host we dial."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = True
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A daemon's context: clients must present a certificate signed by ``files.ca``."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, files)
    ctx.num_tickets = 0
    return ctx
