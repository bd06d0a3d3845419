"""usbipx.pki and ``usbipx pki``: files, modes and extensions read back with cryptography,
refusals, and real TLS handshakes with stdlib ssl between the certificates it issues."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner, Result

import usbipx.cli.pki as cli_pki
from usbipx import pki
from usbipx.cli.app import app
from usbipx.errors import ConfigError, PermissionDenied, ValidationError
from usbipx.identity import peer_identity

NOW = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_error(r: Result, code: int) -> str:
    """The one ``usbipx: error:`` line of a failed command (and its exit code)."""
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usbipx: error: "), r.stderr
    return lines[0].removeprefix("usbipx: error: ")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(c: x509.Certificate, kind: type[Any]) -> x509.Extension[Any]:
    return c.extensions.get_extension_for_class(kind)


def key(path: Path) -> ec.EllipticCurvePrivateKey:
    k = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    return k


def spki(k: Any) -> bytes:
    return k.public_bytes(serialization.Encoding.DER,
                          serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """A CA directory made by init_ca."""
    d = tmp_path / "ca"
    pki.init_ca(d)
    return d


# -- init ---------------------------------------------------------------------


def test_init_files_modes_and_ca_extensions(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    w = pki.init_ca(d, name="Lab CA", days=100, now=NOW)
    assert (w.key, w.cert) == (d / "ca.key", d / "ca.crt")
    assert sorted(os.listdir(d)) == ["ca.crt", "ca.key"]
    assert mode(d) == 0o700 and mode(w.key) == 0o600
    assert stat.S_ISREG(os.lstat(w.key).st_mode)

    text = w.key.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, not encrypted
    k = key(w.key)
    assert isinstance(k.curve, ec.SECP256R1)

    c = cert(w.cert)
    assert spki(c.public_key()) == spki(k.public_key())
    assert c.subject == c.issuer == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lab CA")])
    c.verify_directly_issued_by(c)  # self-signed
    assert isinstance(c.signature_hash_algorithm, hashes.SHA256)
    bc = ext(c, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = ext(c, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature and not ku.value.key_encipherment
    ski = ext(c, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(k.public_key())
    assert ext(c, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert c.not_valid_before_utc == NOW - dt.timedelta(minutes=5)
    assert c.not_valid_after_utc == NOW + dt.timedelta(days=100)
    assert 0 < c.serial_number < 2**128


def test_key_is_0600_from_the_moment_it_exists(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the umask, a key file is created 0600 by open() itself (O_EXCL, no
    symlinks): never write-then-chmod, which leaves a window with the key readable."""
    real_open = os.open
    seen: dict[str, tuple[int, int]] = {}

    def spy(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        fd = real_open(path, flags, mode, *a, **kw)
        if str(path).endswith(".key"):
            seen[os.path.basename(path)] = (flags, stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)
    try:
        pki.init_ca(tmp_path / "ca")
        pki.issue(tmp_path / "ca", "board-1")
    finally:
        os.umask(old)
    assert set(seen) == {"ca.key", "board-1.key"}
    for flags, created_mode in seen.values():
        assert created_mode == 0o600
        assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CREAT
    assert mode(tmp_path / "ca" / "board-1.key") == 0o600


def test_key_is_0600_under_a_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)  # would make a plain 0o600 open() 0o400
    try:
        pki.init_ca(tmp_path / "ca")
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    assert mode(tmp_path / "ca") == 0o700


def test_init_refuses_a_directory_holding_a_ca(ca: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca.iterdir()}
    with pytest.raises(ConfigError, match="already holds a CA"):
        pki.init_ca(ca)
    assert {p.name: p.read_bytes() for p in ca.iterdir()} == before
    # half a CA is a CA too: never overwrite a lone key or certificate
    (ca / "ca.crt").unlink()
    with pytest.raises(ConfigError, match="already holds a CA"):
        pki.init_ca(ca)
    assert (ca / "ca.key").read_bytes() == before["ca.key"]


def test_init_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir()
    (d / "ca.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError):
        pki.init_ca(d)
    assert not (tmp_path / "elsewhere").exists()


def test_init_uses_an_existing_directory_and_makes_it_private(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    (d / "README").write_text("mine")
    pki.init_ca(d)
    assert mode(d) == 0o700
    assert sorted(os.listdir(d)) == ["README", "ca.crt", "ca.key"]


def test_init_creates_parents(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a" / "b" / "ca")
    assert mode(tmp_path / "a" / "b" / "ca") == 0o700


def test_init_on_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        pki.init_ca(tmp_path / "f")


def failing_open(monkeypatch: pytest.MonkeyPatch, suffix: str, err: int) -> None:
    """Make os.open of a path ending in ``suffix`` fail with ``err``."""
    real_open = os.open

    def fake(path: Any, *a: Any, **kw: Any) -> int:
        if str(path).endswith(suffix):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", fake)


def test_init_leaves_nothing_behind_when_the_certificate_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_open(monkeypatch, "ca.crt", errno.ENOSPC)
    with pytest.raises(ConfigError, match=r"ca\.crt: No space left on device"):
        pki.init_ca(tmp_path / "ca")
    assert os.listdir(tmp_path) == []


def test_init_in_an_existing_directory_removes_only_its_own_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keep").write_text("x")
    failing_open(monkeypatch, "ca.crt", errno.ENOSPC)
    with pytest.raises(ConfigError):
        pki.init_ca(tmp_path)
    assert os.listdir(tmp_path) == ["keep"]


def test_unwritable_directory_is_permission_denied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_open(monkeypatch, "ca.key", errno.EACCES)
    with pytest.raises(PermissionDenied, match=r"ca\.key"):
        pki.init_ca(tmp_path / "ca")


@pytest.mark.parametrize("name", ["", " CA", "CA\n", "x" * 65, "a\x00b"])
def test_init_bad_ca_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationError):
        pki.init_ca(tmp_path / "ca", name=name)
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize("days", [0, -1, pki.MAX_DAYS + 1])
def test_bad_days(tmp_path: Path, ca: Path, days: int) -> None:
    with pytest.raises(ValidationError, match="--days"):
        pki.init_ca(tmp_path / "other", days=days)
    with pytest.raises(ValidationError, match="--days"):
        pki.issue(ca, "board-1", days=days)
    assert not (tmp_path / "other").exists() and not (ca / "board-1.key").exists()


# -- issue --------------------------------------------------------------------


def test_client_certificate(ca: Path) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    w = pki.issue(ca, "board-1", now=now)
    assert (w.key, w.cert) == (ca / "board-1.key", ca / "board-1.crt")
    assert mode(w.key) == 0o600
    assert w.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    k, c, ca_c = key(w.key), cert(w.cert), cert(ca / "ca.crt")
    assert isinstance(k.curve, ec.SECP256R1)
    assert spki(c.public_key()) == spki(k.public_key())
    assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "board-1"
    assert len(c.subject) == 1
    assert c.issuer == ca_c.subject
    c.verify_directly_issued_by(ca_c)
    bc = ext(c, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(c, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    assert list(ext(c, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        c.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    aki = ext(c, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca_c, x509.SubjectKeyIdentifier).value.digest
    assert ext(c, x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(k.public_key())
    assert c.not_valid_before_utc == now - dt.timedelta(minutes=5)
    assert c.not_valid_after_utc == now + dt.timedelta(days=825)
    assert 0 < c.serial_number < 2**128


def test_serials_are_random(ca: Path) -> None:
    serials = set()
    for i in range(5):
        serials.add(cert(pki.issue(ca, f"b{i}").cert).serial_number)
    serials.add(cert(ca / "ca.crt").serial_number)
    assert len(serials) == 6
    assert max(serials).bit_length() > 64  # not a counter


def test_server_certificate(ca: Path) -> None:
    w = pki.issue(ca, "appserver",
                  servers=["localhost", "App.Lab.Example", "127.0.0.1", "::1", "localhost"])
    c = cert(w.cert)
    assert list(ext(c, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = ext(c, x509.SubjectAlternativeName)
    assert not san.critical  # the subject has a CN
    assert list(san.value) == [
        x509.DNSName("localhost"), x509.DNSName("app.lab.example"),
        x509.IPAddress(ip_address("127.0.0.1")), x509.IPAddress(ip_address("::1")),
    ]
    assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "appserver"


def test_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    pki.init_ca(d, days=30, now=NOW)
    c = cert(pki.issue(d, "board-1", days=825, now=NOW + dt.timedelta(days=1)).cert)
    assert c.not_valid_after_utc == cert(d / "ca.crt").not_valid_after_utc


def test_expired_ca_issues_nothing(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    pki.init_ca(d, days=1, now=NOW)
    with pytest.raises(ConfigError, match="the CA expired on 2030-06-02T12:00:00Z"):
        pki.issue(d, "board-1", now=NOW + dt.timedelta(days=2))
    assert sorted(os.listdir(d)) == ["ca.crt", "ca.key"]


@pytest.mark.parametrize("existing", ["board-1.crt", "board-1.key"])
def test_issue_refuses_to_overwrite(ca: Path, existing: str) -> None:
    (ca / existing).write_text("precious")
    with pytest.raises(ConfigError, match=re.escape(f"{existing}: already exists; not overwriting")):
        pki.issue(ca, "board-1")
    assert (ca / existing).read_text() == "precious"
    assert sorted(os.listdir(ca)) == sorted(["ca.crt", "ca.key", existing])


def test_issue_never_writes_through_a_symlink(ca: Path, tmp_path: Path) -> None:
    (ca / "board-1.key").symlink_to(tmp_path / "stolen.key")
    with pytest.raises(ConfigError, match="already exists"):
        pki.issue(ca, "board-1")
    assert not (tmp_path / "stolen.key").exists()


def test_issue_leaves_no_key_when_the_certificate_fails(
        ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_open(monkeypatch, "board-1.crt", errno.EIO)
    with pytest.raises(ConfigError, match=r"board-1\.crt"):
        pki.issue(ca, "board-1")
    assert sorted(os.listdir(ca)) == ["ca.crt", "ca.key"]


@pytest.mark.parametrize("name", [
    "", "-x", ".x", "_x", "a..b", "..", "../x", "a/b", "/abs", "x" * 65, "a b", "a\n", "a\nb",
    "ca", "CA", "é", "a:b", "a*", "a\x00",
])
def test_bad_names(ca: Path, name: str) -> None:
    with pytest.raises(ValidationError):
        pki.issue(ca, name)
    assert sorted(os.listdir(ca)) == ["ca.crt", "ca.key"]
    assert sorted(os.listdir(ca.parent)) == ["ca"]


@pytest.mark.parametrize("name", ["a", "board-1", "A.b_c-d", "x" * 64, "9"])
def test_good_names(ca: Path, name: str) -> None:
    c = cert(pki.issue(ca, name).cert)
    assert peer_identity(pki.peercert_dict(c)) == name


@pytest.mark.parametrize("server", [
    "", "-a.example", "a-.example", "a..b", "a.", ".a", "*.example.com", "a_b.example",
    "x" * 64, ".".join(["a" * 63] * 4) + ".ab", "1.2.3", "256.1.1.1", "a.123",
    "fe80::1%eth0", "localhost\n", "a b", "a/b", "ex\u00e4mple.com", "http://a",
])
def test_bad_server_names(ca: Path, server: str) -> None:
    with pytest.raises(ValidationError, match="invalid server"):
        pki.issue(ca, "appserver", servers=["localhost", server])
    assert sorted(os.listdir(ca)) == ["ca.crt", "ca.key"]


@pytest.mark.parametrize("server", [
    "localhost", "a-b.example.com", "x" * 63, "xn--bcher-kva.example", "1.2.3.4", "::1",
    "2001:db8::7", "a1.example", "0a.example", ".".join(["a" * 63] * 3) + "." + "b" * 61,
])
def test_good_server_names(ca: Path, server: str) -> None:
    pki.issue(ca, "appserver", servers=[server])


def test_issue_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no CA here \(run: usbipx pki init "):
        pki.issue(tmp_path, "board-1")
    assert os.listdir(tmp_path) == []


def test_issue_with_a_mismatched_ca_key(ca: Path, tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "other")
    (ca / "ca.key").unlink()
    (ca / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        pki.issue(ca, "board-1")


def test_issue_with_an_encrypted_ca_key(ca: Path) -> None:
    k = key(ca / "ca.key")
    (ca / "ca.key").write_bytes(k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="encrypted"):
        pki.issue(ca, "board-1")


def test_a_ca_made_elsewhere_with_an_rsa_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa CA")])
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(k.public_key()).serial_number(1)
         .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .sign(k, hashes.SHA256()))
    (tmp_path / "ca.crt").write_bytes(c.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="not an EC key"):
        pki.issue(tmp_path, "board-1", now=NOW)
    assert sorted(os.listdir(tmp_path)) == ["ca.crt", "ca.key"]


def test_a_leaf_certificate_is_no_ca(ca: Path) -> None:
    pki.issue(ca, "board-1")
    leaf = ca.parent / "leaf"
    leaf.mkdir()
    (leaf / "ca.key").write_bytes((ca / "board-1.key").read_bytes())
    (leaf / "ca.crt").write_bytes((ca / "board-1.crt").read_bytes())
    with pytest.raises(ConfigError, match="not a CA certificate"):
        pki.issue(leaf, "board-2")


# -- show ---------------------------------------------------------------------


def test_show_server_certificate(ca: Path) -> None:
    w = pki.issue(ca, "appserver", servers=["localhost", "::1"], days=10, now=NOW)
    info = pki.show(w.cert, now=NOW)
    assert (info.subject, info.issuer, info.identity) == ("CN=appserver", "CN=usbipx CA",
                                                          "appserver")
    assert info.sans == ("DNS:localhost", "IP:::1")
    assert info.eku == ("serverAuth", "clientAuth")
    assert not info.is_ca and not info.expired and not info.not_yet_valid
    assert info.serial == f"{cert(w.cert).serial_number:x}"
    d = info.to_dict()
    assert d["not_before"] == "2030-06-01T11:55:00Z" and d["not_after"] == "2030-06-11T12:00:00Z"
    assert pki.show(w.cert, now=NOW + dt.timedelta(days=10)).expired
    assert not pki.show(w.cert, now=NOW + dt.timedelta(days=10, seconds=-1)).expired
    early = pki.show(w.cert, now=NOW - dt.timedelta(minutes=6))
    assert early.not_yet_valid and not early.expired


def test_show_reads_der(ca: Path, tmp_path: Path) -> None:
    der = tmp_path / "ca.der"
    der.write_bytes(cert(ca / "ca.crt").public_bytes(serialization.Encoding.DER))
    info = pki.show(der)
    assert info.is_ca and info.subject == "CN=usbipx CA" and info.eku == ()
    # "usbipx CA" has a space: the CA itself is no peer identity
    assert info.identity is None


@pytest.mark.parametrize("content", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nxx\n"])
def test_show_not_a_certificate(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(ConfigError, match=r"not a PEM or DER X\.509 certificate"):
        pki.show(tmp_path / "f")


def test_show_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        pki.show(tmp_path / "nope.crt")


# -- CLI ----------------------------------------------------------------------


def test_three_commands(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = run("pki", "init", str(d))
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {d}/ca.key\nwrote {d}/ca.crt\n"
    r = run("pki", "issue", str(d), "appserver", "--server", "localhost", "--server", "10.1.2.3")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {d}/appserver.key\nwrote {d}/appserver.crt\n"
    r = run("--json", "pki", "issue", str(d), "board-1", "--days", "30")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"key": f"{d}/board-1.key", "cert": f"{d}/board-1.crt"}
    assert mode(d) == 0o700
    assert {p.name: mode(p) for p in d.iterdir() if p.suffix == ".key"} == {
        "ca.key": 0o600, "appserver.key": 0o600, "board-1.key": 0o600}

    r = run("pki", "show", str(d / "appserver.crt"))
    assert r.exit_code == 0, r.output
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    assert {k: v.strip() for k, v in lines.items() if k in (
        "subject", "issuer", "identity", "san", "eku", "expired", "ca")} == {
        "subject": "CN=appserver", "issuer": "CN=usbipx CA", "identity": "appserver",
        "san": "DNS:localhost, IP:10.1.2.3", "eku": "serverAuth, clientAuth",
        "expired": "no", "ca": "no"}
    assert "not before" in lines and "not after" in lines

    r = run("pki", "show", str(d / "board-1.crt"), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["identity"] == "board-1" and out["eku"] == ["clientAuth"] and out["sans"] == []
    assert out["expired"] is False and out["ca"] is False
    days = (dt.datetime.fromisoformat(out["not_after"])
            - dt.datetime.fromisoformat(out["not_before"]))
    assert days == dt.timedelta(days=30, minutes=5)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert run("pki", "init", str(d)).exit_code == 0
    assert one_error(run("pki", "init", str(d)), 2) == \
        f"{d}: already holds a CA (ca.key/ca.crt); not overwriting"
    assert one_error(run("pki", "issue", str(d), "../etc"), 2).startswith("invalid name '../etc'")
    assert one_error(run("pki", "issue", str(d), "x", "--server", "a..b"), 2) == \
        "invalid server name 'a..b': not an IP address or an RFC 1123 DNS name"
    assert run("pki", "issue", str(d), "board-1").exit_code == 0
    assert one_error(run("pki", "issue", str(d), "board-1"), 2) == \
        f"{d}/board-1.key: already exists; not overwriting"
    assert one_error(run("pki", "issue", str(tmp_path), "b"), 2) == \
        f"{tmp_path}: no CA here (run: usbipx pki init {tmp_path})"
    assert one_error(run("pki", "show", str(d / "ca.key")), 2) == \
        f"{d}/ca.key: not a PEM or DER X.509 certificate"
    assert sorted(os.listdir(d)) == ["board-1.crt", "board-1.key", "ca.crt", "ca.key"]


def test_cli_init_name_and_days(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = run("pki", "init", str(d), "--name", "Lab 7 CA", "--days", "20")
    assert r.exit_code == 0, r.output
    c = cert(d / "ca.crt")
    assert c.subject.rfc4514_string() == "CN=Lab 7 CA"
    assert c.not_valid_after_utc - c.not_valid_before_utc == dt.timedelta(days=20, minutes=5)


def test_cli_days_range(tmp_path: Path) -> None:
    r = run("pki", "init", str(tmp_path / "pki"), "--days", "0")
    assert r.exit_code == 2 and not (tmp_path / "pki").exists()


def test_cli_defaults_are_the_library_defaults() -> None:
    # cli/pki.py spells them out so that its import does not load cryptography.
    assert (cli_pki.CA_NAME, cli_pki.CA_DAYS, cli_pki.CERT_DAYS, cli_pki.MAX_DAYS) == (
        pki.CA_NAME, pki.CA_DAYS, pki.CERT_DAYS, pki.MAX_DAYS)


STARTUP = textwrap.dedent("""
    import json, sys
    from usbipx.cli.app import app
    import usbipx.identity
    try:
        app(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"
                    or m == "usbipx.pki")
    print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
""")


@pytest.mark.parametrize(("args", "heavy"), [
    (["pki", "--help"], False),
    (["pki", "issue", "--help"], False),
    (["gadget", "--help"], False),
    (["pki", "show", "/nonexistent.crt"], True),  # the control: a pki command does load it
])
def test_cryptography_loads_only_when_a_pki_command_runs(tmp_path: Path, args: list[str],
                                                         heavy: bool) -> None:
    # Not from the checkout: its top-level usbipx/ would shadow the installed package.
    res = subprocess.run([sys.executable, "-c", STARTUP, *args], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    out = json.loads(res.stderr.splitlines()[-1])
    assert ("usbipx.pki" in out["loaded"]) is heavy, out
    assert ("cryptography" in out["loaded"]) is heavy, out


# -- real TLS -----------------------------------------------------------------


def server_context(d: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; be ready for it
    ctx.load_verify_locations(d / "ca.crt")
    ctx.load_cert_chain(d / f"{name}.crt", d / f"{name}.key")
    return ctx


def client_context(d: Path, name: str, ca_dir: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_dir / "ca.crt" if ca_dir else d / "ca.crt")
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(d / f"{name}.crt", d / f"{name}.key")
    return ctx


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              hostname: str = "localhost") -> dict[str, Any]:
    """A TLS handshake over a socketpair (server in a thread), then b"ok" from the
    server.  Returns what each side saw of the other, or the error each side got."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    out: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                out["client_cert"] = s.getpeercert()
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            out["server_error"] = exc
        finally:
            a.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=hostname) as c:
            out["server_cert"] = c.getpeercert()
            out["data"] = c.recv(2)
    except (ssl.SSLError, OSError) as exc:
        out["client_error"] = exc
    finally:
        b.close()
    t.join(10)
    assert not t.is_alive()
    return out


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """One CA with a server certificate for localhost and 127.0.0.1, and board-1."""
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "appserver", servers=["localhost", "127.0.0.1"])
    pki.issue(d, "board-1")
    return d


def test_handshake_mutual_tls(lab: Path) -> None:
    out = handshake(server_context(lab, "appserver"), client_context(lab, "board-1"))
    assert out.get("data") == b"ok", out
    assert peer_identity(out["client_cert"]) == "board-1"
    assert peer_identity(out["server_cert"]) == "appserver"
    # `pki show` names each identity exactly as the peer's getpeercert() does
    for name, seen in (("board-1", out["client_cert"]), ("appserver", out["server_cert"])):
        mine = pki.peercert_dict(cert(lab / f"{name}.crt"))
        assert mine["subject"] == seen["subject"]
        assert mine.get("subjectAltName") == seen.get("subjectAltName")
        assert pki.show(lab / f"{name}.crt").identity == peer_identity(seen)


def test_handshake_by_ip_address(lab: Path) -> None:
    out = handshake(server_context(lab, "appserver"), client_context(lab, "board-1"),
                    hostname="127.0.0.1")
    assert out.get("data") == b"ok", out


def test_ipv6_san_reads_as_getpeercert_spells_it(lab: Path) -> None:
    pki.issue(lab, "v6", servers=["2001:db8::7"])
    out = handshake(server_context(lab, "v6"), client_context(lab, "board-1"),
                    hostname="2001:db8::7")
    assert out.get("data") == b"ok", out
    assert pki.peercert_dict(cert(lab / "v6.crt"))["subjectAltName"] == \
        out["server_cert"]["subjectAltName"] == (("IP Address", "2001:DB8:0:0:0:0:0:7"),)


def test_handshake_refuses_a_client_from_another_ca(lab: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue(other, "board-1")  # same name, wrong CA
    out = handshake(server_context(lab, "appserver"), client_context(other, "board-1", lab))
    assert "client_cert" not in out and "data" not in out, out
    err = out["server_error"]
    assert isinstance(err, ssl.SSLCertVerificationError), err
    assert "certificate verify failed" in str(err)
    assert isinstance(out.get("client_error"), ssl.SSLError | ConnectionError), out


def test_handshake_refuses_a_server_certificate_for_another_name(lab: Path) -> None:
    pki.issue(lab, "other", servers=["other.example"])
    out = handshake(server_context(lab, "other"), client_context(lab, "board-1"))
    err = out["client_error"]
    assert isinstance(err, ssl.SSLCertVerificationError), out
    assert "hostname mismatch" in err.verify_message.lower(), err.verify_message
    assert "data" not in out


def test_a_client_certificate_cannot_serve(lab: Path) -> None:
    """Without --server there is no serverAuth: a board cannot pose as a server."""
    pki.issue(lab, "localhost")  # a client certificate whose CN is the host name
    out = handshake(server_context(lab, "localhost"), client_context(lab, "board-1"))
    err = out["client_error"]
    assert isinstance(err, ssl.SSLCertVerificationError), out
    assert "data" not in out


def test_a_server_certificate_can_also_be_a_client(lab: Path) -> None:
    pki.issue(lab, "appserver-2", servers=["localhost"])
    out = handshake(server_context(lab, "appserver-2"), client_context(lab, "appserver"))
    assert out.get("data") == b"ok", out
    assert peer_identity(out["client_cert"]) == "appserver"
