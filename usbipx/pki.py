"""A tiny certificate authority for usbipx's mutual TLS: init, issue, show.

A CA directory holds ``ca.key`` and ``ca.crt``; every issued identity NAME gets
``NAME.key`` and ``NAME.crt`` beside them.  Keys are EC P-256, PKCS#8 PEM,
unencrypted, created mode 0600 with ``O_EXCL|O_NOFOLLOW`` (never readable by
others, not even for an instant; never written through a symlink); nothing is
ever overwritten.  A certificate's identity (what policy rules match and logs
name) is its subject commonName, read by :func:`usbipx.identity.peer_identity`.

This module imports ``cryptography``; the CLI imports it only when a ``pki``
command runs, so other commands start fast on slow boards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from usbipx.errors import ConfigError, PermissionDenied, UsbipError, ValidationError
from usbipx.identity import peer_identity

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_NAME = "usbipx CA"
CA_DAYS = 3650
CERT_DAYS = 825
MAX_DAYS = 36500
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from this long before they are made: peers' clocks differ."""

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""An issued identity: it becomes ``NAME.key``/``NAME.crt`` and the subject commonName."""

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
"""One RFC 1123 host name label."""

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700

E = TypeVar("E", bound=x509.ExtensionType)

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


@dataclass(frozen=True)
class Written:
    """The files one command wrote."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class CertInfo:
    """What ``pki show`` reports about a certificate."""

    path: str
    subject: str
    issuer: str
    identity: str | None
    serial: str
    sha256: str
    is_ca: bool
    sans: tuple[str, ...]
    """``DNS:name``, ``IP:address``, ``URI:uri``..."""
    eku: tuple[str, ...]
    """``serverAuth``, ``clientAuth``, or dotted OIDs."""
    not_before: dt.datetime
    not_after: dt.datetime
    expired: bool
    """Past its not-after time."""
    not_yet_valid: bool
    """Before its not-before time."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (times in ISO 8601 UTC)."""
        return {
            "path": self.path, "subject": self.subject, "issuer": self.issuer,
            "identity": self.identity, "serial": self.serial, "sha256": self.sha256,
            "ca": self.is_ca, "sans": list(self.sans), "eku": list(self.eku),
            "not_before": _iso(self.not_before), "not_after": _iso(self.not_after),
            "expired": self.expired, "not_yet_valid": self.not_yet_valid,
        }


# -- validation ---------------------------------------------------------------


def validate_name(name: str) -> str:
    """Return ``name`` if it may name an issued certificate (see :data:`NAME`)."""
    if NAME.fullmatch(name) is None or ".." in name:
        raise ValidationError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    if name.casefold() == "ca":
        raise ValidationError("the name 'ca' is reserved for the CA's own files")
    return name


def validate_server_name(text: str) -> x509.GeneralName:
    """The subjectAltName for ``--server text``: an IP address, or an RFC 1123 DNS name
    (lower-cased; no wildcards, no trailing dot, not all-numeric at the end)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise ValidationError(f"invalid server address {text!r}: no scope ids in certificates")
        return x509.IPAddress(ip)
    labels = text.split(".")
    if (len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValidationError(
            f"invalid server name {text!r}: not an IP address or an RFC 1123 DNS name"
        )
    return x509.DNSName(text.lower())


def _validate_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise ValidationError(f"invalid --days {days}: must be 1..{MAX_DAYS}")
    return days


def _validate_ca_name(name: str) -> str:
    if not (1 <= len(name) <= 64 and name.isprintable() and name.strip() == name):
        raise ValidationError(
            f"invalid CA name {name!r}: 1-64 printable characters, no surrounding spaces"
        )
    return name


# -- commands -----------------------------------------------------------------


def init_ca(directory: str | os.PathLike[str], name: str = CA_NAME, days: int = CA_DAYS,
            now: dt.datetime | None = None) -> Written:
    """Create the CA directory (mode 0700) with a new CA key and self-signed certificate.

    An existing directory is used (and made 0700) unless it already holds a CA;
    on any failure nothing this call created is left behind.
    """
    _validate_ca_name(name)
    _validate_days(days)
    root = Path(directory)
    key_path, cert_path = root / CA_KEY, root / CA_CERT
    if os.path.lexists(key_path) or os.path.lexists(cert_path):
        raise ConfigError(f"{root}: already holds a CA ({CA_KEY}/{CA_CERT}); not overwriting")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(subject, subject, key.public_key(), now, now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    created_dir = _make_dir(root)
    try:
        _write_pair(key_path, _key_pem(key), cert_path, _cert_pem(cert))
    except BaseException:
        if created_dir:
            with contextlib.suppress(OSError):  # the first error matters more
                root.rmdir()
        raise
    return Written(key_path, cert_path)


def issue(directory: str | os.PathLike[str], name: str, servers: list[str] | None = None,
          days: int = CERT_DAYS, now: dt.datetime | None = None) -> Written:
    """Issue ``NAME.key``/``NAME.crt`` from the CA in ``directory``.

    Without ``servers`` it is a client (board) certificate: EKU clientAuth.
    With server names (DNS names or IP addresses) it is a server certificate:
    EKU serverAuth and clientAuth, and those names as subjectAltNames.  The
    certificate never outlives the CA's.
    """
    validate_name(name)
    sans = _dedupe([validate_server_name(s) for s in servers or []])
    _validate_days(days)
    root = Path(directory)
    key_path, cert_path = root / f"{name}.key", root / f"{name}.crt"
    for path in (key_path, cert_path):
        if os.path.lexists(path):
            raise ConfigError(f"{path}: already exists; not overwriting")
    ca_key, ca_cert = _load_ca(root)
    now = now or _now()
    ca_until = _validity(ca_cert)[1]
    if ca_until <= now:
        raise ConfigError(f"{root / CA_CERT}: the CA expired on {_iso(ca_until)}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if sans:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), now,
                 min(now + dt.timedelta(days=days), ca_until))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_pair(key_path, _key_pem(key), cert_path, _cert_pem(cert))
    return Written(key_path, cert_path)


def show(path: str | os.PathLike[str], now: dt.datetime | None = None) -> CertInfo:
    """Read a certificate (PEM, or DER) and describe it."""
    cert = load_certificate(Path(path))
    now = now or _now()
    san_ext = _extension(cert, x509.SubjectAlternativeName)
    sans = tuple(_san_text(g) for g in san_ext or [])
    eku_ext = _extension(cert, x509.ExtendedKeyUsage)
    eku = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku_ext or [])
    bc = _extension(cert, x509.BasicConstraints)
    not_before, not_after = _validity(cert)
    return CertInfo(
        path=str(path),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        identity=peer_identity(peercert_dict(cert)),
        serial=f"{cert.serial_number:x}",
        sha256=cert.fingerprint(hashes.SHA256()).hex(":"),
        is_ca=bool(bc is not None and bc.ca),
        sans=sans, eku=eku, not_before=not_before, not_after=not_after,
        expired=now >= not_after, not_yet_valid=now < not_before,
    )


def peercert_dict(cert: x509.Certificate) -> dict[str, object]:
    """The subject and subjectAltName of ``cert`` shaped as ``getpeercert()`` returns
    them, so that ``pki show`` names the identity exactly as a daemon will."""
    subject = tuple(
        tuple(("commonName" if a.oid == NameOID.COMMON_NAME else a.rfc4514_attribute_name,
               _text(a.value)) for a in rdn)
        for rdn in cert.subject.rdns
    )
    out: dict[str, object] = {"subject": subject}
    ext = _extension(cert, x509.SubjectAlternativeName)
    if ext is not None:
        pairs: list[tuple[str, str]] = []
        for g in ext:
            if isinstance(g, x509.DNSName):
                pairs.append(("DNS", g.value))
            elif isinstance(g, x509.UniformResourceIdentifier):
                pairs.append(("URI", g.value))
            elif isinstance(g, x509.IPAddress):
                pairs.append(("IP Address", _ssl_ip_text(g.value)))
        out["subjectAltName"] = tuple(pairs)
    return out


def load_certificate(path: Path) -> x509.Certificate:
    """A certificate from a PEM (first one) or DER file; ConfigError if it is not one."""
    data = _read(path)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM or DER X.509 certificate") from None


# -- helpers ------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: dt.datetime, until: dt.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        # 128 random bits: unique without a serial-number database.
        .serial_number(max(1, secrets.randbits(128)))
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(until)
    )


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
        crl_sign=crl_sign, encipher_only=False, decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate,
                      ca_key: ec.EllipticCurvePrivateKey) -> x509.AuthorityKeyIdentifier:
    ski = _extension(ca_cert, x509.SubjectKeyIdentifier)
    if ski is not None:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    # A CA made elsewhere without an SKI: derive the id from its key (matched to ca.crt).
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())


def _extension(cert: x509.Certificate, kind: type[E]) -> E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _load_ca(root: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = root / CA_KEY, root / CA_CERT
    if not (key_path.exists() and cert_path.exists()):
        raise ConfigError(f"{root}: no CA here (run: usbipx pki init {root})")
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except TypeError:
        raise ConfigError(f"{key_path}: the key is encrypted; usbipx needs it unencrypted") \
            from None
    except ValueError:
        raise ConfigError(f"{key_path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an EC key (usbipx pki init makes EC P-256 CAs)")
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise ConfigError(f"{cert_path}: not a CA certificate")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ConfigError(f"{key_path} does not match {cert_path}")
    return key, cert


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _os_error(path, exc) from None


def _os_error(path: Path, exc: OSError) -> UsbipError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{path}: {exc.strerror}")
    return ConfigError(f"{path}: {exc.strerror or exc}")


def _make_dir(root: Path) -> bool:
    """Make ``root`` a 0700 directory; True if this call created it."""
    try:
        root.mkdir(mode=_DIR_MODE, parents=False)
        created = True
    except FileExistsError:
        if not root.is_dir():
            raise ConfigError(f"{root}: exists and is not a directory") from None
        created = False
    except FileNotFoundError:
        # Parents get the default mode; only the CA directory itself is private.
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            root.mkdir(mode=_DIR_MODE)
        except OSError as exc:
            raise _os_error(root, exc) from None
        created = True
    except OSError as exc:
        raise _os_error(root, exc) from None
    try:
        # mkdir's mode passes through the umask; an existing directory keeps its own.
        os.chmod(root, _DIR_MODE)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):  # the first error matters more
                root.rmdir()
        raise _os_error(root, exc) from None
    return created


def _write_pair(key_path: Path, key_pem: bytes, cert_path: Path, cert_pem: bytes) -> None:
    """Write the key, then the certificate; if the certificate fails, remove the key."""
    _write_new(key_path, key_pem, _KEY_MODE, exact=True)
    try:
        _write_new(cert_path, cert_pem, _CERT_MODE, exact=False)
    except BaseException:
        with contextlib.suppress(OSError):  # the first error matters more
            key_path.unlink()
        raise


def _write_new(path: Path, data: bytes, mode: int, *, exact: bool) -> None:
    """Create ``path`` (never existing, never through a symlink) with ``mode`` from the
    start; ``exact`` also undoes the umask (a key is 0600 whatever it is)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; not overwriting") from None
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if exact:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the first error matters more
            path.unlink()
        if isinstance(exc, OSError):
            raise _os_error(path, exc) from None
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _dedupe(names: list[x509.GeneralName]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def _validity(cert: x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) in aware UTC."""
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    # cryptography 41 has only the naive (UTC) attributes; *_utc arrived in 42.
    return (cert.not_valid_before.replace(tzinfo=dt.UTC),
            cert.not_valid_after.replace(tzinfo=dt.UTC))


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.hex()


def _san_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    return f"{type(name).__name__}"


def _ssl_ip_text(ip: object) -> str:
    """An IP SAN as CPython's getpeercert() spells it (IPv6: eight uppercase groups)."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ":".join(f"{int.from_bytes(ip.packed[i:i + 2]):X}" for i in range(0, 16, 2))
    return str(ip)
