"""What a daemon's handler decides, and how the server carries it out on each transport.

A handler is a plain function ``(request, peer) -> Outcome``: the reply, and
(for IMPORT on usbipd, EXPORT on usbipa) a *handoff* that gives a socket
to the kernel.  The server calls the handoff with the descriptor the
transport provides:

* plain TCP: the connection itself, *before* the reply is sent, so that a
  kernel refusal still reaches the peer as a status (:func:`settle`);
* TLS, relayed: one end of a socketpair, also before the reply;
* kernel TLS: the connection, *after* the reply -- the reply is the last
  record user space encrypts, and the kernel's reader must find the keys
  installed from its first read on.

A handoff returns None on success, or the reply to send instead (it logs
why).  ``undo`` takes the kernel action back if the reply cannot be sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from usbipx.protocol import Reply, Request


@dataclass(frozen=True)
class Peer:
    """The remote end of a connection: its address and, over TLS, its identity."""

    host: str
    port: int
    identity: str | None = None
    """The certificate identity of a TLS peer (subject CN, or SAN)."""
    transport: str = "tcp"
    """``tcp`` or ``tls``: how the peer reached us."""

    @property
    def owner(self) -> str:
        """Who an attachment belongs to: the identity over TLS, else the address."""
        return self.identity if self.identity is not None else self.host

    @property
    def name(self) -> str:
        """How logs name the peer."""
        return f"{self.identity} ({self.host})" if self.identity is not None else self.host


Handoff = Callable[[int, str], Reply | None]
"""``handoff(fd, transport)``: give ``fd`` to the kernel; None, or the reply to send
instead if the kernel refused.  ``transport`` is ``tcp``, ``ktls`` or ``tls-relay``."""


@dataclass
class Outcome:
    """What a handler decided: the reply, the kernel handoff (if any), and how to
    undo that handoff if the reply cannot be delivered."""

    reply: Reply
    handoff: Handoff | None = None
    undo: Callable[[], None] | None = None
    reply_first: bool = False
    """The kernel speaks as soon as it has the socket (vhci_hcd enumerates the
    device it was given), so over plain TCP the reply must be on the wire before
    the handoff, or the peer reads a URB where it waits for the reply."""
    release: Callable[[], None] | None = None
    """What the handler holds for this request until it is carried out (usbipa:
    the (peer, bus id) being exported).  The server calls :meth:`close` when it
    is done with the outcome, whether or not the handoff happened."""

    def close(self) -> None:
        """Let the handler release what it holds for this request (once)."""
        release, self.release = self.release, None
        if release is not None:
            release()


Handler = Callable[[Request, Peer], Outcome]


def settle(outcome: Outcome, fd: int, transport: str) -> Reply:
    """Do the handoff (if any) with ``fd``; the reply to send."""
    if outcome.handoff is None:
        return outcome.reply
    failed = outcome.handoff(fd, transport)
    if failed is not None:
        outcome.undo = None  # nothing to undo: the kernel refused
        return failed
    return outcome.reply
