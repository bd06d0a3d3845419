"""TLS and wss figures for scripts/bench (inside the lab VM): sequential read throughput
of a 64 MB disk exported over plain TCP, kernel TLS, the TLS relay and wss://, the relays'
CPU time per MB on both sides, and connect-to-usable time over TLS against plain TCP --
all in one VM run, as ratios to plain TCP."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import labkit as lab

DISK_MB = 64


def _pki(tmp: Path) -> list[str]:
    ca = tmp / "pki"
    lab.usbipx("pki", "init", str(ca))
    lab.usbipx("pki", "issue", str(ca), "server", "--server", "localhost")
    lab.usbipx("pki", "issue", str(ca), "board")
    return ["--cert", str(ca / "board.crt"), "--key", str(ca / "board.key"),
            "--ca", str(ca / "ca.crt")]


def _read_all(dev: str, size: int) -> float:
    """Seconds to read ``size`` bytes of ``dev`` sequentially, bypassing the page cache."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT needs
        t0 = time.monotonic()
        done = 0
        while done < size:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            done += n
        return time.monotonic() - t0
    finally:
        os.close(fd)


def bench_tls(result: Callable[[str, str, str], None], rounds: int) -> None:
    print("\n== TLS: read throughput of a 64 MB disk and connect-to-usable, vs plain TCP",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    board = _pki(tmp)
    server = ["--cert", str(tmp / "pki/server.crt"), "--key", str(tmp / "pki/server.key"),
              "--ca", str(tmp / "pki/ca.crt")]
    disk = tmp / "disk.img"
    lab.make_disk(disk, DISK_MB)
    lab.mass_storage_gadget("benchtls", disk, "dummy_udc.0")
    busid = lab.usb_busid_on_udc("dummy_udc.0")
    lab.wait_for(lambda: lab.driver_of(busid) == "usb", what="the bench disk")
    usbipa = lab.Daemon([lab.USBIPX, "usbipa", "-t", "3310", "--listen", "tcp://127.0.0.1:3311",
                         "--listen", "tls://127.0.0.1:3310",
                         "--listen", "wss://127.0.0.1:3312/usbip", *server], 3310)
    # kind: (port, remote, connect options, disconnect options)
    paths = {"tcp": ("3311", "127.0.0.1", [], []),
             "ktls": ("3310", "tls://localhost", board, board),
             "tls-relay": ("3310", "tls://localhost", ["--tls-data", "relay", *board], board),
             "wss-relay": ("3312", "wss://localhost:3312/usbip", board, board)}
    cpu: dict[str, list[tuple[float, float]]] = {"tls-relay": [], "wss-relay": []}
    speed: dict[str, list[float]] = {k: [] for k in paths}
    usable: dict[str, list[float]] = {k: [] for k in paths}
    pss: dict[str, list[float]] = {k: [] for k in cpu}
    try:
        for _ in range(rounds):
            for kind, (port, remote, opts, dopts) in paths.items():  # interleaved
                t0 = time.monotonic()
                lab.usbipx("-t", port, "connect", "-r", remote, "-b", busid, *opts)
                dev = lab.vhci_disk(60)
                lab.read_block(dev, 4096)
                usable[kind].append(time.monotonic() - t0)
                relay = _relay_pid() if kind in cpu else None
                if relay:
                    pss[kind].append(_pss_mb(relay))
                before = (_cpu(relay) if relay else 0.0, _cpu(usbipa.proc.pid))
                took = _read_all(dev, DISK_MB << 20)
                speed[kind].append(DISK_MB / took)
                if relay:
                    after = (_cpu(relay), _cpu(usbipa.proc.pid))
                    cpu[kind].append(((after[0] - before[0]) / DISK_MB,
                                      (after[1] - before[1]) / DISK_MB))
                lab.usbipx("-t", port, "disconnect", "-r", remote, "-b", busid, *dopts)
                lab.wait_for(lambda: not lab.vhci_used_ports(), 30, what="the port free")
                lab.wait_for(lambda: lab.driver_of(busid) == "usb", 30, what="the driver")
        med = {k: statistics.median(v) for k, v in speed.items()}
        use = {k: statistics.median(v) for k, v in usable.items()}
        for k in paths:
            print(f"  {k:>9}: {med[k]:.2f} MB/s read, connect-to-usable {use[k]:.2f} s "
                  f"(median of {rounds})")
        result("read throughput kernel TLS/plain", f"{med['ktls'] / med['tcp']:.2f}x",
               ">= 0.9x")
        result("read throughput TLS relay/plain", f"{med['tls-relay'] / med['tcp']:.2f}x",
               ">= 0.6x")
        result("read throughput wss relay/plain", f"{med['wss-relay'] / med['tcp']:.2f}x",
               ">= 0.6x")
        result("read throughput wss/TLS relay", f"{med['wss-relay'] / med['tls-relay']:.2f}x",
               "(reported)")
        for kind, samples in cpu.items():
            board_ms = statistics.median(b for b, _ in samples) * 1000
            app_ms = statistics.median(a for _, a in samples) * 1000
            result(f"{kind} CPU per MB board/app side", f"{board_ms:.0f}/{app_ms:.0f} ms",
                   "(reported)")
        for kind, mbs in pss.items():
            result(f"{kind} relaying process PSS", f"{statistics.median(mbs):.2f} MB",
                   "(reported; a plain worker's is above)")
        result("connect-to-usable TLS (ktls)/plain", f"{use['ktls'] / use['tcp']:.2f}x",
               "(reported)")
        # What the ratios above pay per byte in this VM: AES-GCM on an emulated CPU.
        driver, kernel_mbs = _kernel_gcm_speed()
        result(f"kernel AES-128-GCM ({driver})", f"{kernel_mbs:.1f} MB/s",
               "(reported; plain TCP reads at " f"{med['tcp']:.1f} MB/s)")
        result("OpenSSL AES-128-GCM (relays)", f"{_openssl_gcm_speed():.1f} MB/s", "(reported)")
    finally:
        usbipa.stop()
        lab.reset_usbip()


CRYPTO_CHUNK = 16384  # a full TLS record's plaintext
CRYPTO_SECONDS = 2.0


def _kernel_gcm_speed() -> tuple[str, float]:
    """The kernel's gcm(aes) (the implementation kernel TLS gets) through AF_ALG:
    its driver name and MB/s encrypting record-sized chunks."""
    import socket

    alg = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET)
    alg.bind(("aead", "gcm(aes)"))
    alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, bytes(16))
    alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, 16)
    op, _ = alg.accept()
    data, done = bytes(CRYPTO_CHUNK), 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < CRYPTO_SECONDS:
        op.sendmsg_afalg([data], op=socket.ALG_OP_ENCRYPT, iv=bytes(12), assoclen=0)
        op.recv(CRYPTO_CHUNK + 16)
        done += CRYPTO_CHUNK
    speed = done / (time.monotonic() - t0) / 1e6
    op.close()
    alg.close()
    # The kernel picks the gcm(aes) of highest priority; /proc/crypto lists them all.
    best = max(((int(alg.get("priority", "0")), alg.get("driver", "?"))
                for alg in lab.kernel_crypto() if alg.get("name") == "gcm(aes)"),
               default=(-1, "?"))
    return best[1], speed


def _openssl_gcm_speed() -> float:
    """OpenSSL's AES-128-GCM (what the relays' TLS uses) in MB/s, record-sized chunks."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, data, done = AESGCM(bytes(16)), bytes(CRYPTO_CHUNK), 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < CRYPTO_SECONDS:
        aead.encrypt(bytes(12), data, None)
        done += CRYPTO_CHUNK
    return done / (time.monotonic() - t0) / 1e6


def _pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` in MB: what the board pays for that process."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for {pid}")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _relay_pid() -> int | None:
    """The background relay ``usbipx connect`` left (its command line is connect's)."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"connect" in cmd and any(c.endswith(b"usbipx") for c in cmd):
                return int(p.name)
    return None
