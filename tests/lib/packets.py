"""Crafting packets for BPF_PROG_TEST_RUN and checking what comes out."""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import time

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from sluice.bpf.btf import Btf
from sluice.netlink import in_netns

MAC_A = "02:00:00:00:0a:01"
MAC_B = "02:00:00:00:0b:01"


def tcp(src: str, dst: str, sport: int = 40000, dport: int = 80, smac: str = MAC_A, dmac: str = MAC_B,
        ttl: int = 64, flags: str = "S", payload: bytes = b"") -> bytes:
    return bytes(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, ttl=ttl) /
                 TCP(sport=sport, dport=dport, flags=flags) / payload)


def udp(src: str, dst: str, sport: int = 40000, dport: int = 53, smac: str = MAC_A, dmac: str = MAC_B,
        ttl: int = 64, payload: bytes = b"ping", chksum: int | None = None) -> bytes:
    l4 = UDP(sport=sport, dport=dport) if chksum is None else UDP(sport=sport, dport=dport, chksum=chksum)
    return bytes(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, ttl=ttl) / l4 / payload)


def icmp(src: str, dst: str, smac: str = MAC_A, dmac: str = MAC_B) -> bytes:
    return bytes(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst) / ICMP())


def arp(src: str, dst: str, smac: str = MAC_A) -> bytes:
    return bytes(Ether(src=smac, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=src, pdst=dst, hwsrc=smac))


def parse(frame: bytes) -> Ether:
    return Ether(frame)


def assert_checksums_valid(frame: bytes) -> None:
    """IPv4 header and TCP/UDP checksums of `frame` are what a fresh computation gives."""
    pkt = Ether(frame)
    ip = pkt[IP]
    fresh = Ether(bytes(pkt))
    del fresh[IP].chksum
    l4 = TCP if TCP in ip else UDP if UDP in ip else None
    if l4 is not None and not (l4 is UDP and ip[UDP].chksum == 0):
        del fresh[l4].chksum
    fresh = Ether(bytes(fresh))
    assert ip.chksum == fresh[IP].chksum, f"IPv4 checksum {ip.chksum:#06x}, expected {fresh[IP].chksum:#06x}"
    if l4 is not None:
        assert ip[l4].chksum == fresh[l4].chksum, \
            f"{l4.__name__} checksum {ip[l4].chksum:#06x}, expected {fresh[l4].chksum:#06x}"


@functools.cache
def _skb_layout() -> tuple[int, dict]:
    with Btf("/sys/kernel/btf/vmlinux") as btf:
        return btf.struct_layout("__sk_buff")


def skb_ctx(**fields: int) -> bytes:
    """A struct __sk_buff for ctx_in, e.g. skb_ctx(ifindex=5) to run as if on device 5."""
    size, members = _skb_layout()
    buf = ctypes.create_string_buffer(size)
    for name, value in fields.items():
        off, width = members[name]
        buf[off:off + width] = value.to_bytes(width, "little")
    return buf.raw


@functools.cache
def _xdp_layout() -> tuple[int, dict]:
    with Btf("/sys/kernel/btf/vmlinux") as btf:
        return btf.struct_layout("xdp_md")


def xdp_ctx(ingress_ifindex: int, rx_queue_index: int = 0) -> bytes:
    """A struct xdp_md for ctx_in: runs the program as if on `ingress_ifindex`
    (the test run needs data_end = packet length, filled in by test_run_xdp)."""
    size, members = _xdp_layout()
    buf = ctypes.create_string_buffer(size)
    for name, value in (("ingress_ifindex", ingress_ifindex), ("rx_queue_index", rx_queue_index)):
        off, width = members[name]
        buf[off:off + width] = value.to_bytes(width, "little")
    return buf.raw


def xdp_ctx_for(frame: bytes, ingress_ifindex: int) -> bytes:
    size, members = _xdp_layout()
    buf = bytearray(xdp_ctx(ingress_ifindex))
    off, width = members["data_end"]
    buf[off:off + width] = len(frame).to_bytes(width, "little")
    return bytes(buf)


def echo(ns: str, dst: str, count: int = 3, timeout: float = 2.0) -> list[int]:
    """ICMP echoes from network namespace `ns` (a name under /run/netns or a path) through a raw
    socket (there is no ping binary here); the TTL of each reply that came back."""
    with in_netns(ns if ns.startswith("/") else f"/run/netns/{ns}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident, ttls = os.getpid() & 0xFFFF, []
    with sock:
        for seq in range(count):
            sock.sendto(bytes(ICMP(type=8, id=ident, seq=seq) / b"sluice"), (dst, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    reply = IP(sock.recv(2048))
                except socket.timeout:
                    break
                if (reply.src == dst and ICMP in reply and reply[ICMP].type == 0
                        and reply[ICMP].id == ident and reply[ICMP].seq == seq):
                    ttls.append(reply.ttl)
                    break
    return ttls
