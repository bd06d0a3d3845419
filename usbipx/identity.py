"""Who a TLS peer is: the identity its certificate names, and policy patterns over it.

Over mutual TLS a peer *is* its certificate's identity.  :func:`peer_identity`
reads it from the dict :meth:`ssl.SSLSocket.getpeercert` returns (no
cryptography import: the daemons call this on every connection), and
:func:`identity_matches` checks it against a policy rule's pattern.

Identities end up in logs, policy matching and record files, so only a
conservative character set is accepted (:data:`IDENTITY`); a certificate whose
identity falls outside it has no identity, and the caller refuses the peer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

IDENTITY = re.compile(r"[A-Za-z0-9._:@/+=-]{1,255}")
"""An acceptable identity: at most 255 printable ASCII characters, no spaces,
nothing a log line, a TOML string or a path component could misread."""

PATTERN = re.compile(r"[A-Za-z0-9._:@/+=*-]{1,255}")
"""An identity pattern: an identity that may also contain ``*``."""

_SEGMENT = r"[^./:@]*"
"""What one ``*`` stands for: a run of characters inside one label or path segment."""

# getpeercert()'s subjectAltName keys, in the order they are tried.
_SAN_ORDER = ("DNS", "URI", "IP Address")


def is_identity(text: str) -> bool:
    """Whether ``text`` is an acceptable identity (see :data:`IDENTITY`)."""
    return IDENTITY.fullmatch(text) is not None


def is_identity_pattern(pattern: str) -> bool:
    """Whether ``pattern`` is a valid :func:`identity_matches` pattern (for config loaders)."""
    return PATTERN.fullmatch(pattern) is not None


def peer_identity(cert: Mapping[str, object] | None) -> str | None:
    """The identity of the peer whose certificate ``getpeercert()`` returned as ``cert``.

    It is the subject's commonName; a certificate without one is named by its
    first subjectAltName: the first DNS name, else the first URI, else the
    first IP address.  Returns None when there is no name, when the subject
    holds more than one commonName (ambiguous), when a value is not a string,
    or when the name is not an acceptable identity (:func:`is_identity`) --
    the caller must then refuse the peer.  An empty dict (``getpeercert()``
    of an unverified peer) and None have no identity.
    """
    if not cert:
        return None
    names = _common_names(cert.get("subject"))
    if names is None or len(names) > 1:
        return None
    if names:
        candidate: object = names[0]
    else:
        candidate = _first_san(cert.get("subjectAltName"))
    if isinstance(candidate, str) and is_identity(candidate):
        return candidate
    return None


def _common_names(subject: object) -> list[object] | None:
    """The commonName values of a getpeercert() subject: a tuple of RDNs, each a
    tuple of (attribute, value) pairs.  None when the shape is wrong."""
    if subject is None:
        return []
    if not isinstance(subject, tuple | list):
        return None
    found: list[object] = []
    for rdn in subject:
        if not isinstance(rdn, tuple | list):
            return None
        for pair in rdn:
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                return None
            if pair[0] == "commonName":
                found.append(pair[1])
    return found


def _first_san(sans: object) -> object:
    """The first DNS, else URI, else IP Address value of a getpeercert() subjectAltName."""
    if not isinstance(sans, tuple | list):
        return None
    pairs = [p for p in sans if isinstance(p, tuple | list) and len(p) == 2]
    for kind in _SAN_ORDER:
        for key, value in pairs:
            if key == kind:
                return value
    return None


def identity_matches(pattern: str, identity: str) -> bool:
    """Whether a policy rule's ``pattern`` matches ``identity``.

    A pattern is an identity, matched exactly (case-sensitively), or one with
    ``*`` wildcards, each standing for any run of characters (possibly none)
    inside one DNS-like label or path segment: ``*`` never matches ``.``,
    ``/``, ``:`` or ``@``.  So ``board-*`` matches ``board-17`` but not
    ``board-17.evil.example``, and ``*.lab.example`` matches
    ``pi.lab.example`` but not ``a.b.lab.example``.  A pattern of ``*``
    alone matches every identity.  Nothing else of fnmatch (``?``, ``[...]``)
    is supported.  An invalid pattern or identity matches nothing.
    """
    if not (is_identity(identity) and is_identity_pattern(pattern)):
        return False
    if pattern == "*":
        return True
    if "*" not in pattern:
        return pattern == identity
    regex = _SEGMENT.join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, identity) is not None
