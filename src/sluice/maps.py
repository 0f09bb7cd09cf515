"""Typed access to the datapath's maps.

The ctypes structures below mirror bpf/lib/maps.h field for field;
tests/bpf/test_btf_layout.py compares every one of them with the struct of the
same name in the compiled object's BTF, so the two cannot drift apart
unnoticed. Addresses and ports that are network byte order in C are handled as
text and ints here; the conversion lives in `be32`/`be16`.
"""

from __future__ import annotations


import errno
import hashlib
import ipaddress
import os
import socket
import struct
import sys
import time
from ctypes import Structure, Union, _SimpleCData, byref, c_uint8, c_uint16, c_uint32, c_uint64, sizeof
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from .bpf import libbpf as lb

# Constants of bpf/lib that Python needs before it has an object at hand (a ctypes array size, flags it
# writes into maps, the counters' slot layout): tests/bpf/test_btf_layout.py compares each with the
# object's BTF. Hook and outcome numbers are read from the BTF at run time (sluice.datapath.enums).
MAGLEV_SIZE = 1021          # SL_MAGLEV_SIZE, the length of sl_lb_vip.table
IPPROTO = {"tcp": 6, "udp": 17}
PROTO_NAME = {v: k for k, v in IPPROTO.items()}
INGRESS, EGRESS = 1, 2      # enum sl_policy_direction: a direction, and a bit of a pod's isolation


def be32(ip: str) -> int:
    """An IPv4 address as the integer a __be32 field holds on this host (inet_pton for the dotted quads
    it takes, ipaddress for anything else, and for its error)."""
    try:
        packed = socket.inet_pton(socket.AF_INET, ip)
    except (OSError, TypeError, ValueError):
        packed = ipaddress.IPv4Address(ip).packed
    return int.from_bytes(packed, sys.byteorder)


def ip_str(value: int) -> str:
    """The text of a __be32 address field (inet_ntoa: a map dump decodes tens of thousands)."""
    return socket.inet_ntoa(value.to_bytes(4, sys.byteorder))


def be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def port_int(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, sys.byteorder), "big")


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"invalid MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


# ---- mirrors of bpf/lib/maps.h -------------------------------------------------

class sl_config(Structure):
    _fields_ = [("node_ip", c_uint32), ("nic_ifindex", c_uint32), ("flags", c_uint32), ("cpu_count", c_uint32)]


class sl_endpoint_key(Structure):
    _fields_ = [("ip", c_uint32)]


class sl_endpoint(Structure):
    _fields_ = [("ifindex", c_uint32), ("pod_mac", c_uint8 * 6), ("host_mac", c_uint8 * 6), ("flags", c_uint32)]


class sl_route_key(Structure):
    _fields_ = [("prefixlen", c_uint32), ("ip", c_uint32)]


class sl_route(Structure):
    _fields_ = [("nexthop", c_uint32), ("ifindex", c_uint32), ("flags", c_uint32), ("vni", c_uint32)]


class sl_service_key(Structure):
    _fields_ = [("vip", c_uint32), ("port", c_uint16), ("proto", c_uint8), ("pad", c_uint8),
                ("slot", c_uint16), ("pad2", c_uint16)]


class _sl_service_u(Union):
    _fields_ = [("backend_id", c_uint32), ("affinity_timeout", c_uint32)]


class sl_service(Structure):
    """Its first member is C's anonymous union: backend_id (slots) / affinity_timeout (master)."""
    _anonymous_ = ("u",)
    _fields_ = [("u", _sl_service_u), ("svc_id", c_uint32), ("count", c_uint16), ("flags", c_uint16)]


class sl_backend(Structure):
    _fields_ = [("ip", c_uint32), ("port", c_uint16), ("proto", c_uint8), ("flags", c_uint8)]


class sl_sock_revnat_key(Structure):
    _fields_ = [("cookie", c_uint64), ("ip", c_uint32), ("port", c_uint16), ("pad", c_uint16)]


class sl_sock_revnat(Structure):
    _fields_ = [("vip", c_uint32), ("port", c_uint16), ("pad", c_uint16)]


class sl_sock_affinity_key(Structure):
    _fields_ = [("svc_id", c_uint32), ("pad", c_uint32), ("netns_cookie", c_uint64)]


class sl_sock_affinity(Structure):
    _fields_ = [("backend_id", c_uint32), ("slot", c_uint16), ("pad", c_uint16), ("last_used_ns", c_uint64)]


class sl_failsafe_key(Structure):
    _fields_ = [("port", c_uint16), ("proto", c_uint8), ("pad", c_uint8)]


class sl_prefilter_key(Structure):
    _fields_ = [("prefixlen", c_uint32), ("ip", c_uint32)]


class sl_lb_vip_key(Structure):
    _fields_ = [("vip", c_uint32), ("port", c_uint16), ("proto", c_uint8), ("pad", c_uint8)]


class sl_lb_vip(Structure):
    _fields_ = [("backend_count", c_uint32), ("flags", c_uint32), ("table", c_uint32 * MAGLEV_SIZE)]


class sl_lb_affinity_key(Structure):
    _fields_ = [("vip", c_uint32), ("port", c_uint16), ("proto", c_uint8), ("pad", c_uint8), ("client", c_uint32)]


class sl_lb_affinity(Structure):
    _fields_ = [("backend_id", c_uint32), ("pad", c_uint32), ("last_used_ns", c_uint64)]


class sl_flow_tuple(Structure):
    _fields_ = [("saddr", c_uint32), ("daddr", c_uint32), ("sport", c_uint16), ("dport", c_uint16),
                ("proto", c_uint8), ("pad", c_uint8 * 3)]


class sl_nat(Structure):
    _fields_ = [("saddr", c_uint32), ("daddr", c_uint32), ("sport", c_uint16), ("dport", c_uint16)]


class sl_sock_key(Structure):
    _fields_ = [("netns", c_uint64), ("sip", c_uint32), ("dip", c_uint32), ("sport", c_uint16), ("dport", c_uint16),
                ("pad", c_uint32)]


class sl_metric(Structure):
    _fields_ = [("packets", c_uint64), ("bytes", c_uint64)]


class sl_ipv4_prefix_key(Structure):
    _fields_ = [("prefixlen", c_uint32), ("ip", c_uint32)]


class sl_policy_key(Structure):
    _fields_ = [("prefixlen", c_uint32), ("endpoint", c_uint32), ("identity", c_uint32), ("direction", c_uint8),
                ("proto", c_uint8), ("port", c_uint16)]


class sl_policy_drop_key(Structure):
    _fields_ = [("endpoint", c_uint32), ("direction", c_uint32)]


class sl_ct_key(Structure):
    _fields_ = [("saddr", c_uint32), ("daddr", c_uint32), ("sport", c_uint16), ("dport", c_uint16),
                ("proto", c_uint8), ("direction", c_uint8), ("pad", c_uint16)]


class sl_ct_entry(Structure):
    _fields_ = [("expires_ns", c_uint64), ("flags", c_uint32), ("pad", c_uint32)]


class bpf_cpumap_val(Structure):
    _fields_ = [("qsize", c_uint32), ("bpf_prog_fd", c_uint32)]


# struct formats of the structures the Reconciler reads in bulk (a dump of 10,000 services is decoded
# with struct.iter_unpack, not element by element through ctypes); tests compare them with the ctypes
# mirrors, which the BTF layout test compares with the object.
PACKED = {
    sl_service_key: struct.Struct("=IHBBHH"),   # vip, port, proto, pad, slot, pad2
    sl_service: struct.Struct("=IIHH"),         # backend_id / affinity_timeout, svc_id, count, flags
    sl_backend: struct.Struct("!4sHBB"),        # ip, port (network order: address bytes, port number), proto, flags
    c_uint32: struct.Struct("=I"),
}

# Every struct that maps.h defines, for the layout test.
LAYOUTS = [sl_config, sl_endpoint_key, sl_endpoint, sl_route_key, sl_route, sl_service_key, sl_service,
           sl_backend, sl_sock_revnat_key, sl_sock_revnat, sl_sock_affinity_key, sl_sock_affinity, sl_failsafe_key,
           sl_prefilter_key,
           sl_lb_vip_key, sl_lb_vip, sl_lb_affinity_key, sl_lb_affinity, sl_flow_tuple, sl_nat, sl_sock_key,
           sl_metric, sl_ipv4_prefix_key, sl_policy_key, sl_policy_drop_key, sl_ct_key, sl_ct_entry]


def members(struct) -> dict[str, tuple[int, int]]:
    """{member: (byte offset, byte size)} of a ctypes mirror, an anonymous union's members named as members
    of `struct`, as C (and Btf.struct_layout) name them."""
    out = {}
    for name, ctype, *_bits in struct._fields_:
        if name in getattr(struct, "_anonymous_", ()):
            base = getattr(struct, name).offset
            out.update({n: (base + off, size) for n, (off, size) in members(ctype).items()})
        else:
            out[name] = (getattr(struct, name).offset, getattr(struct, name).size)
    return out


def possible_cpus() -> int:
    """Number of possible CPUs: the per-CPU value count of per-CPU maps."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _dash, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


# ---- generic map -----------------------------------------------------------------

# What BPF_MAP_LOOKUP_BATCH answers for a map type without batch operations (cpumap, sockhash; LPM
# tries on older kernels; every map before 5.6): 524 is the kernel's ENOTSUPP.
BATCH_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, 524)


def _elements(ctype, data: bytes, count: int) -> list:
    """`count` packed `ctype`s as ctypes objects, as key_type()/value_type() instances read one by one are
    (indexing an array of c_uint32 would give ints)."""
    arr = (ctype * count).from_buffer_copy(data)
    return [ctype(v) for v in arr] if issubclass(ctype, _SimpleCData) else list(arr)


class Map:
    """A BPF map with fixed ctypes key and value types."""

    name = ""
    key_type: type = c_uint32
    value_type: type = c_uint32
    percpu = False

    def __init__(self, fd: int, owns_fd: bool = False):
        self.fd = fd
        self._owns_fd = owns_fd
        info = lb.map_info(fd)
        self.max_entries = info.max_entries
        value_size = sizeof(self.value_type)
        if info.key_size != sizeof(self.key_type) or (not self.percpu and info.value_size != value_size):
            raise lb.BpfError(errno.EINVAL, f"map {info.name.decode()} has key/value size {info.key_size}/"
                              f"{info.value_size}, {type(self).__name__} expects {sizeof(self.key_type)}/{value_size}")
        self._ncpu = possible_cpus() if self.percpu else 1
        self.map_type = info.type

    @classmethod
    def open(cls, pin_dir: str):
        """Open the map pinned as `pin_dir/<name>`."""
        return cls(lb.obj_get(os.path.join(pin_dir, cls.name)), owns_fd=True)

    def close(self):
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _value_buf(self):
        return (self.value_type * self._ncpu)() if self.percpu else self.value_type()

    def lookup(self, key):
        value = self._value_buf()
        if lb.bpf_map_lookup_elem(self.fd, byref(key), byref(value)) < 0:
            return None
        return list(value) if self.percpu else value

    def update(self, key, value, flags: int = lb.BPF_ANY) -> None:
        lb.check(lb.bpf_map_update_elem(self.fd, byref(key), byref(value), flags), f"update {self.name}")

    def remove(self, key) -> bool:
        ret = lb.bpf_map_delete_elem(self.fd, byref(key))
        if ret == -errno.ENOENT:
            return False
        lb.check(ret, f"delete from {self.name}")
        return True

    def raw_keys(self) -> Iterator:
        key, prev = self.key_type(), None
        while lb.bpf_map_get_next_key(self.fd, byref(prev) if prev is not None else None, byref(key)) == 0:
            yield key
            prev, key = key, self.key_type()

    def _iter_items(self) -> Iterator:
        for key in list(self.raw_keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def dump(self) -> tuple[bytes, bytes, int]:
        """Every entry as (keys, values, count), packed back to back as the kernel lays them out: with
        BPF_MAP_LOOKUP_BATCH (a few calls for the whole map) where the kernel has it for the map type,
        else key by key (BPF_MAP_GET_NEXT_KEY and a lookup each), which gives the same entries."""
        batch = self._batch_dump()
        if batch is not None:
            return batch
        pairs = list(self._iter_items())
        return b"".join(bytes(k) for k, _v in pairs), b"".join(bytes(v) for _k, v in pairs), len(pairs)

    def _batch_dump(self) -> tuple[bytes, bytes, int] | None:
        """dump() by BPF_MAP_LOOKUP_BATCH; None where the kernel has no batch lookup for the map."""
        if self.percpu:
            return None
        entry = sizeof(self.key_type) + sizeof(self.value_type)
        chunk = max(16, min(self.max_entries, (1 << 20) // entry))
        try:
            return lb.map_lookup_batch(self.fd, sizeof(self.key_type), sizeof(self.value_type), chunk)
        except lb.BpfError as e:
            if e.errno not in BATCH_UNSUPPORTED:
                raise
        return None

    def raw_items(self) -> list:
        """Every (key, value) as ctypes structures (read with dump())."""
        if self.percpu:
            return list(self._iter_items())
        keys, values, count = self.dump()
        if not count:
            return []
        return list(zip(_elements(self.key_type, keys, count), _elements(self.value_type, values, count)))

    def update_batch(self, pairs: list, flags: int = lb.BPF_ANY) -> None:
        """Write many entries in one BPF_MAP_UPDATE_BATCH call."""
        if not pairs:
            return
        keys = (self.key_type * len(pairs))(*(k for k, _value in pairs))
        values = (self.value_type * len(pairs))(*(v for _key, v in pairs))
        count = c_uint32(len(pairs))
        opts = lb.BpfMapBatchOpts(sz=sizeof(lb.BpfMapBatchOpts), elem_flags=flags)
        lb.check(lb.bpf_map_update_batch(self.fd, keys, values, byref(count), byref(opts)),
                 f"batch update of {self.name} ({count.value}/{len(pairs)} written)")

    def delete_batch(self, keys: list) -> None:
        if not keys:
            return
        arr = (self.key_type * len(keys))(*keys)
        count = c_uint32(len(keys))
        opts = lb.BpfMapBatchOpts(sz=sizeof(lb.BpfMapBatchOpts))
        lb.check(lb.bpf_map_delete_batch(self.fd, arr, byref(count), byref(opts)),
                 f"batch delete from {self.name} ({count.value}/{len(keys)} deleted)")

    def __len__(self) -> int:
        batch = self._batch_dump()    # a few calls rather than one per key (metrics, status)
        return batch[2] if batch is not None else sum(1 for _key in self.raw_keys())

    def clear(self) -> None:
        self.delete_batch(list(self.raw_keys()))


# ---- typed maps --------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    ifindex: int
    pod_mac: str
    host_mac: str
    flags: int = 0


class EndpointsMap(Map):
    name = "sl_endpoints"
    key_type, value_type = sl_endpoint_key, sl_endpoint

    @staticmethod
    def _key(ip: str):
        return sl_endpoint_key(be32(ip))

    @staticmethod
    def _value(ep: Endpoint):
        return sl_endpoint(ep.ifindex, (c_uint8 * 6)(*mac_bytes(ep.pod_mac)),
                           (c_uint8 * 6)(*mac_bytes(ep.host_mac)), ep.flags)

    @staticmethod
    def _decode(v) -> Endpoint:
        return Endpoint(v.ifindex, mac_str(v.pod_mac), mac_str(v.host_mac), v.flags)

    def put(self, ip: str, ep: Endpoint) -> None:
        self.update(self._key(ip), self._value(ep))

    def get(self, ip: str) -> Endpoint | None:
        v = self.lookup(self._key(ip))
        return self._decode(v) if v is not None else None

    def delete(self, ip: str) -> bool:
        return self.remove(self._key(ip))

    def items(self) -> dict[str, Endpoint]:
        return {ip_str(k.ip): self._decode(v) for k, v in self.raw_items()}


def _lpm_key(key_type, cidr: str):
    net = ipaddress.IPv4Network(cidr, strict=True)
    return key_type(net.prefixlen, be32(str(net.network_address)))


@dataclass(frozen=True)
class Route:
    nexthop: str
    ifindex: int
    tunnel: bool = False
    vni: int = 0


class RoutesMap(Map):
    name = "sl_routes"
    key_type, value_type = sl_route_key, sl_route
    TUNNEL = 1                  # SL_ROUTE_TUNNEL of enum sl_route_flags

    def put(self, cidr: str, route: Route) -> None:
        self.update(_lpm_key(sl_route_key, cidr),
                    sl_route(be32(route.nexthop), route.ifindex, self.TUNNEL if route.tunnel else 0, route.vni))

    def delete(self, cidr: str) -> bool:
        return self.remove(_lpm_key(sl_route_key, cidr))

    def items(self) -> dict[str, Route]:
        return {
            f"{ip_str(k.ip)}/{k.prefixlen}": Route(ip_str(v.nexthop), v.ifindex, bool(v.flags & self.TUNNEL), v.vni)
            for k, v in self.raw_items()
        }


class Backend(NamedTuple):
    """A tuple, not a dataclass: sluice.state sorts backends (an LB VIP's are a set) and a map dump
    decodes tens of thousands of them."""

    ip: str
    port: int
    proto: str = "tcp"


class BackendsMap(Map):
    name = "sl_backends"
    key_type, value_type = c_uint32, sl_backend

    @staticmethod
    def _value(b: Backend):
        return sl_backend(be32(b.ip), be16(b.port), IPPROTO[b.proto], 0)

    def put(self, backend_id: int, b: Backend, flags: int = lb.BPF_ANY) -> None:
        self.update(c_uint32(backend_id), self._value(b), flags)

    def put_many(self, backends: dict[int, Backend]) -> None:
        self.update_batch([(c_uint32(i), self._value(b)) for i, b in backends.items()])

    def get(self, backend_id: int) -> Backend | None:
        v = self.lookup(c_uint32(backend_id))
        return Backend(ip_str(v.ip), port_int(v.port), PROTO_NAME.get(v.proto, str(v.proto))) if v is not None else None

    def delete(self, backend_id: int) -> bool:
        return self.remove(c_uint32(backend_id))

    def items(self) -> dict[int, Backend]:
        """{backend id: backend}, the whole map in one batch read."""
        keys, values, count = self.dump()
        if not count:
            return {}
        ntoa, names, make = socket.inet_ntoa, PROTO_NAME, Backend._make     # _make: half the cost of Backend()
        pairs = zip(PACKED[c_uint32].iter_unpack(keys), PACKED[sl_backend].iter_unpack(values))
        return {i: make((ntoa(ip), port, names.get(proto) or str(proto))) for (i,), (ip, port, proto, _flags) in pairs}


@dataclass(frozen=True)
class Service:
    svc_id: int
    backend_ids: tuple[int, ...]
    affinity_timeout: int = 0   # seconds of ClientIP session affinity; 0: none


class ServicesMap(Map):
    """Slot 0 of (vip, port, proto) is the master entry; slots 1..n name backends."""

    name = "sl_services"
    key_type, value_type = sl_service_key, sl_service
    AFFINITY = 1                # SL_SVC_AFFINITY of enum sl_service_flags

    @staticmethod
    def _key(vip: str, port: int, proto: str, slot: int):
        return sl_service_key(be32(vip), be16(port), IPPROTO[proto], 0, slot, 0)

    def entries(self, vip: str, port: int, proto: str, svc: Service) -> list:
        """The (key, value) pairs that describe one service."""
        master = sl_service(affinity_timeout=svc.affinity_timeout, svc_id=svc.svc_id, count=len(svc.backend_ids),
                            flags=self.AFFINITY if svc.affinity_timeout else 0)
        pairs = [(self._key(vip, port, proto, 0), master)]
        pairs += [(self._key(vip, port, proto, slot), sl_service(backend_id=bid, svc_id=svc.svc_id))
                  for slot, bid in enumerate(svc.backend_ids, start=1)]
        return pairs

    def put(self, vip: str, port: int, proto: str, svc: Service, old: Service | None | bool = True) -> None:
        """Write backend slots first and the master last, so a reader never
        sees a count larger than the slots present; then drop extra slots.
        `old`: what the caller just read with get() (True: read it here)."""
        if old is True:
            old = self.get(vip, port, proto)
        pairs = self.entries(vip, port, proto, svc)
        self.update_batch(pairs[1:])
        self.update(*pairs[0])
        if old:
            self.delete_batch([self._key(vip, port, proto, s)
                               for s in range(len(svc.backend_ids) + 1, len(old.backend_ids) + 1)])

    def get(self, vip: str, port: int, proto: str) -> Service | None:
        master = self.lookup(self._key(vip, port, proto, 0))
        if master is None:
            return None
        ids = []
        for slot in range(1, master.count + 1):
            v = self.lookup(self._key(vip, port, proto, slot))
            ids.append(v.backend_id if v is not None else 0)
        return Service(master.svc_id, tuple(ids), self._affinity(master.affinity_timeout, master.flags))

    @classmethod
    def _affinity(cls, timeout: int, flags: int) -> int:
        return timeout if flags & cls.AFFINITY else 0

    def delete(self, vip: str, port: int, proto: str) -> bool:
        old = self.get(vip, port, proto)
        if old is None:
            return False
        self.remove(self._key(vip, port, proto, 0))
        self.delete_batch([self._key(vip, port, proto, s) for s in range(1, len(old.backend_ids) + 1)])
        return True

    def items(self) -> dict[tuple[str, int, str], Service]:
        """Every service, what get() returns for each, from one batch read of the map."""
        keys, values, count = self.dump()
        if not count:
            return {}
        masters, slots = {}, {}
        for (vip, port, proto, _pad, slot, _pad2), (first, svc_id, n, flags) in zip(
                PACKED[sl_service_key].iter_unpack(keys), PACKED[sl_service].iter_unpack(values)):
            if slot == 0:
                masters[(vip, port, proto)] = (svc_id, n, self._affinity(first, flags))
            else:
                slots[(vip, port, proto, slot)] = first
        return {(ip_str(vip), port_int(port), PROTO_NAME.get(proto, str(proto))):
                Service(svc_id, tuple(slots.get((vip, port, proto, s), 0) for s in range(1, n + 1)), affinity)
                for (vip, port, proto), (svc_id, n, affinity) in masters.items()}


class PrefilterMap(Map):
    name = "sl_prefilter"
    key_type, value_type = sl_prefilter_key, c_uint32

    def put(self, cidr: str, rule_id: int = 1, flags: int = lb.BPF_ANY) -> None:
        self.update(_lpm_key(sl_prefilter_key, cidr), c_uint32(rule_id), flags)

    def put_many(self, cidrs: dict[str, int]) -> None:
        self.update_batch([(_lpm_key(sl_prefilter_key, c), c_uint32(r)) for c, r in cidrs.items()])

    def delete(self, cidr: str) -> bool:
        return self.remove(_lpm_key(sl_prefilter_key, cidr))

    def items(self) -> dict[str, int]:
        return {f"{ip_str(k.ip)}/{k.prefixlen}": v.value for k, v in self.raw_items()}

    def cidrs(self) -> set[str]:
        return {f"{ip_str(k.ip)}/{k.prefixlen}" for k, _rule in self.raw_items()}


def maglev_table(backends: dict[int, Backend], size: int = MAGLEV_SIZE) -> list[int]:
    """Maglev lookup table (Eisenbud et al., NSDI'16) of backend ids.

    Each backend's preference list is a permutation of the slots derived from
    its address, so removing one backend moves only the flows it had."""
    if not backends:
        return [0] * size
    ordered = sorted(backends.items(), key=lambda kv: (kv[1].ip, kv[1].port, kv[0]))
    perms = []
    for _backend_id, b in ordered:
        digest = hashlib.sha256(f"{b.ip}:{b.port}/{b.proto}".encode()).digest()
        offset = int.from_bytes(digest[:8], "little") % size
        skip = int.from_bytes(digest[8:16], "little") % (size - 1) + 1
        perms.append((offset, skip))
    table = [-1] * size
    nexts = [0] * len(ordered)
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(perms):
            slot = (offset + nexts[i] * skip) % size
            while table[slot] >= 0:
                nexts[i] += 1
                slot = (offset + nexts[i] * skip) % size
            table[slot] = ordered[i][0]
            nexts[i] += 1
            filled += 1
            if filled == size:
                return table


class FailsafeMap(Map):
    """The node's management ports (protocol, port), passed before any filter (bpf/lib/failsafe.h)."""

    name = "sl_failsafe_ports"
    key_type, value_type = sl_failsafe_key, c_uint32

    @staticmethod
    def _key(proto: str, port: int):
        return sl_failsafe_key(be16(port), IPPROTO[proto], 0)

    def put(self, proto: str, port: int) -> None:
        self.update(self._key(proto, port), c_uint32(1))

    def delete(self, proto: str, port: int) -> bool:
        return self.remove(self._key(proto, port))

    def ports(self) -> set[tuple[str, int]]:
        return {(PROTO_NAME.get(k.proto, str(k.proto)), port_int(k.port)) for k in self.raw_keys()}


class LbOptions(NamedTuple):
    """How the XDP LB serves a VIP, besides its backends."""

    keep_source: bool = False       # local pod backends see the client's address (externalTrafficPolicy Local)
    affinity_timeout: int = 0       # seconds of ClientIP session affinity; 0: none


class LbVipsMap(Map):
    name = "sl_lb_vips"
    key_type, value_type = sl_lb_vip_key, sl_lb_vip
    KEEP_SOURCE = 1             # SL_LB_KEEP_SOURCE of enum sl_lb_vip_flags
    AFFINITY = 2                # SL_LB_AFFINITY
    FLAGS_BITS = 8              # SL_LB_FLAGS_BITS: the affinity timeout sits above the flags

    @staticmethod
    def _key(vip: str, port: int, proto: str):
        return sl_lb_vip_key(be32(vip), be16(port), IPPROTO[proto], 0)

    @classmethod
    def _flags(cls, options: LbOptions) -> int:
        flags = cls.KEEP_SOURCE if options.keep_source else 0
        if options.affinity_timeout:
            flags |= cls.AFFINITY | options.affinity_timeout << cls.FLAGS_BITS
        return flags

    @classmethod
    def _options(cls, flags: int) -> LbOptions:
        return LbOptions(bool(flags & cls.KEEP_SOURCE), flags >> cls.FLAGS_BITS if flags & cls.AFFINITY else 0)

    def put(self, vip: str, port: int, proto: str, backends: dict[int, Backend],
            options: LbOptions = LbOptions()) -> list[int]:
        """Install a VIP with its Maglev table; returns the table."""
        table = maglev_table(backends)
        value = sl_lb_vip(len(backends), self._flags(options), (c_uint32 * MAGLEV_SIZE)(*table))
        self.update(self._key(vip, port, proto), value)
        return table

    def table(self, vip: str, port: int, proto: str) -> list[int] | None:
        v = self.lookup(self._key(vip, port, proto))
        return list(v.table) if v is not None else None

    def entry(self, vip: str, port: int, proto: str) -> tuple[int, list[int], LbOptions] | None:
        """(backend count, Maglev table, options) of one VIP, or None."""
        v = self.lookup(self._key(vip, port, proto))
        return (v.backend_count, list(v.table), self._options(v.flags)) if v is not None else None

    def delete(self, vip: str, port: int, proto: str) -> bool:
        return self.remove(self._key(vip, port, proto))

    def items(self) -> dict[tuple[str, int, str], int]:
        return {(ip_str(k.vip), port_int(k.port), PROTO_NAME.get(k.proto, str(k.proto))): v.backend_count
                for k, v in self.raw_items()}

    def tables(self) -> dict[tuple[str, int, str], tuple[int, list[int], LbOptions]]:
        """{frontend: (backend count, Maglev table, options)} from one batch read."""
        return {(ip_str(k.vip), port_int(k.port), PROTO_NAME.get(k.proto, str(k.proto))):
                (v.backend_count, list(v.table), self._options(v.flags)) for k, v in self.raw_items()}


class ConfigMap(Map):
    name = "sl_config"
    key_type, value_type = c_uint32, sl_config
    CPUMAP = 1                  # SL_CFG_CPUMAP of enum sl_config_flags
    POLICY = 2                  # SL_CFG_POLICY

    def set(self, node_ip: str, nic_ifindex: int, cpus: int = 0, policy: bool = False) -> None:
        flags = (self.CPUMAP if cpus else 0) | (self.POLICY if policy else 0)
        self.update(c_uint32(0), sl_config(be32(node_ip), nic_ifindex, flags, cpus))

    def get(self) -> dict:
        v = self.lookup(c_uint32(0))
        return {"node_ip": ip_str(v.node_ip), "nic_ifindex": v.nic_ifindex,
                "cpumap": bool(v.flags & self.CPUMAP), "cpu_count": v.cpu_count,
                "network_policy": bool(v.flags & self.POLICY)}


class CpuMap(Map):
    """The cpumap (sl_cpu_map) together with the list of CPUs XDP spreads over (sl_cpus)."""

    name = "sl_cpu_map"
    key_type, value_type = c_uint32, bpf_cpumap_val

    def set_cpus(self, cpus_map: "CpuListMap", config: ConfigMap, cpus: list[int], qsize: int = 2048) -> None:
        for cpu in cpus:
            self.update(c_uint32(cpu), bpf_cpumap_val(qsize, 0))
        for i, cpu in enumerate(cpus):
            cpus_map.update(c_uint32(i), c_uint32(cpu))
        cur = config.lookup(c_uint32(0)) or sl_config()
        cur.cpu_count = len(cpus)
        cur.flags = (cur.flags | ConfigMap.CPUMAP) if cpus else (cur.flags & ~ConfigMap.CPUMAP)
        config.update(c_uint32(0), cur)

    def cpus(self) -> list[int]:
        return [k.value for k in self.raw_keys()]


class CpuListMap(Map):
    name = "sl_cpus"
    key_type, value_type = c_uint32, c_uint32


class SockHash(Map):
    """Same-node TCP sockets; userspace lookups return the socket cookie."""

    name = "sl_sock_hash"
    key_type, value_type = sl_sock_key, c_uint64

    def sockets(self) -> list[tuple[str, int, str, int]]:
        return [(ip_str(k.sip), port_int(k.sport), ip_str(k.dip), port_int(k.dport)) for k in self.raw_keys()]


class SockRevNatMap(Map):
    name = "sl_sock_revnat"
    key_type, value_type = sl_sock_revnat_key, sl_sock_revnat


class SockAffinityMap(Map):
    name = "sl_sock_affinity"
    key_type, value_type = sl_sock_affinity_key, sl_sock_affinity


class LbAffinityMap(Map):
    name = "sl_lb_affinity"
    key_type, value_type = sl_lb_affinity_key, sl_lb_affinity

    def forget(self, keep: dict[tuple[str, int, str], set[int] | None]) -> int:
        """For each VIP (frontend) of `keep`, remove its client entries whose backend id is not in the VIP's set
        (all of them for None), so that no client sticks to a backend the VIP lost: one read of the map for
        all of them. Returns how many went."""
        wanted = {(be32(vip), be16(port), IPPROTO[proto]): ids for (vip, port, proto), ids in keep.items()}
        stale = []
        for k, v in self.raw_items():
            vip = (k.vip, k.port, k.proto)
            if vip in wanted and (wanted[vip] is None or v.backend_id not in wanted[vip]):
                stale.append(k)
        for k in stale:
            self.remove(k)
        return len(stale)

    def clients(self) -> dict[tuple[tuple[str, int, str], str], int]:
        """{(frontend, client address): backend id}."""
        return {((ip_str(k.vip), port_int(k.port), PROTO_NAME.get(k.proto, str(k.proto))), ip_str(k.client)):
                v.backend_id for k, v in self.raw_items()}


class NatMap(Map):
    name = "sl_lb_nat"
    key_type, value_type = sl_flow_tuple, sl_nat

    def flows(self) -> list[tuple[tuple, tuple]]:
        return [((ip_str(k.saddr), port_int(k.sport), ip_str(k.daddr), port_int(k.dport), k.proto),
                 (ip_str(v.saddr), port_int(v.sport), ip_str(v.daddr), port_int(v.dport)))
                for k, v in self.raw_items()]


class MetricsMap(Map):
    """Per-CPU counters of (hook, outcome); read summed over CPUs."""

    name = "sl_metrics"
    key_type, value_type = c_uint32, sl_metric
    percpu = True
    PER_HOOK = 256              # SL_METRICS_PER_HOOK: (hook, outcome) counts in slot hook * PER_HOOK + outcome

    def read(self, hooks: dict[str, int], outcomes: dict[str, int]) -> dict[tuple[str, str], tuple[int, int]]:
        """{(hook name, outcome name): (packets, bytes)} for every non-zero counter.
        Names come from the object's BTF (sluice.datapath.enums)."""
        out = {}
        for hook, h in hooks.items():
            for outcome, o in outcomes.items():
                values = self.lookup(c_uint32(h * self.PER_HOOK + o))
                if values is None:
                    continue
                packets = sum(v.packets for v in values)
                if packets:
                    out[(hook, outcome)] = (packets, sum(v.bytes for v in values))
        return out

    def reset(self) -> None:
        zero = (sl_metric * self._ncpu)()
        for slot in range(self.max_entries):
            lb.bpf_map_update_elem(self.fd, byref(c_uint32(slot)), byref(zero), lb.BPF_ANY)


# ---- NetworkPolicy ---------------------------------------------------------------------

def _prefix(k) -> str:
    return f"{ip_str(k.ip)}/{k.prefixlen}"


class _TextKeyedMap(Map):
    """A map of u32 values keyed by text (an address or a prefix), kept equal to a dict by sync()."""

    value_type = c_uint32

    def _key(self, text: str):
        raise NotImplementedError

    def _text(self, key) -> str:
        raise NotImplementedError

    def items(self) -> dict[str, int]:
        return {self._text(k): v.value for k, v in self.raw_items()}

    def sync(self, want: dict[str, int], have: dict[str, int] | None = None) -> int:
        """Make the map hold exactly `want` (`have`: what it holds, when the caller knows): new and changed
        entries first, then the removals. Returns how many entries were written or removed."""
        have = self.items() if have is None else have
        put = [(self._key(k), c_uint32(v)) for k, v in want.items() if have.get(k) != v]
        self.update_batch(put)
        gone = [k for k in have if k not in want]
        for k in gone:
            self.remove(self._key(k))
        return len(put) + len(gone)


class PrefixIdentityMap(_TextKeyedMap):
    """An LPM trie of IPv4 prefixes -> identities."""

    key_type = sl_ipv4_prefix_key

    def _key(self, text: str):
        return _lpm_key(sl_ipv4_prefix_key, text)

    def _text(self, key) -> str:
        return _prefix(key)


class IpcacheMap(PrefixIdentityMap):
    """Every pod of the cluster and every node address -> identity (enum sl_identity_reserved)."""

    name = "sl_ipcache"


class PolicyCidrsMap(PrefixIdentityMap):
    """The prefixes local pods' ipBlocks name -> their identities."""

    name = "sl_policy_cidrs"


class PolicyIsolationMap(_TextKeyedMap):
    """Local pods isolated by a NetworkPolicy: address -> INGRESS | EGRESS bits."""

    name = "sl_policy_isolation"
    key_type = sl_endpoint_key

    def _key(self, text: str):
        return sl_endpoint_key(be32(text))

    def _text(self, key) -> str:
        return ip_str(key.ip)


class PolicyEntryTuple(NamedTuple):
    """What an isolated pod allows: its address, a direction, the peer's identity (0: any), a protocol
    (0: every protocol and port) and a block of ports: the `port_bits` leading bits of `port` (0: any)."""

    endpoint: str
    direction: int
    identity: int
    proto: int
    port: int
    port_bits: int


class PolicyMap(Map):
    name = "sl_policy"
    key_type, value_type = sl_policy_key, c_uint32
    PREFIX_PEER, PREFIX_PROTO, PREFIX_FULL = 72, 80, 96     # enum sl_policy_prefix

    @classmethod
    def _key(cls, e) -> sl_policy_key:
        if not e.proto:
            return sl_policy_key(cls.PREFIX_PEER, be32(e.endpoint), e.identity, e.direction, 0, 0)
        return sl_policy_key(cls.PREFIX_PROTO + e.port_bits, be32(e.endpoint), e.identity, e.direction, e.proto,
                             be16(e.port))

    @classmethod
    def _entry(cls, k) -> PolicyEntryTuple:
        if k.prefixlen < cls.PREFIX_PROTO:
            return PolicyEntryTuple(ip_str(k.endpoint), k.direction, k.identity, 0, 0, 0)
        return PolicyEntryTuple(ip_str(k.endpoint), k.direction, k.identity, k.proto, port_int(k.port),
                                k.prefixlen - cls.PREFIX_PROTO)

    def entries(self) -> set[PolicyEntryTuple]:
        return {self._entry(k) for k in self.raw_keys()}

    def add(self, entries) -> None:
        self.update_batch([(self._key(e), c_uint32(1)) for e in entries])

    def discard(self, entries) -> None:
        for e in entries:
            self.remove(self._key(e))


class PolicyDropsMap(Map):
    """Policy drops per local pod and direction, summed over CPUs."""

    name = "sl_policy_drops"
    key_type, value_type = sl_policy_drop_key, sl_metric
    percpu = True

    def read(self) -> dict[tuple[str, int], tuple[int, int]]:
        """{(pod address, direction): (packets, bytes)}."""
        return {(ip_str(k.endpoint), k.direction): (sum(v.packets for v in vs), sum(v.bytes for v in vs))
                for k, vs in self.raw_items()}


class CtEntry(NamedTuple):
    saddr: str
    sport: int
    daddr: str
    dport: int
    proto: int
    direction: int
    expires_ns: int
    flags: int


class CtMap(Map):
    """Connection tracking of pods' flows (bpf/lib/conntrack.h)."""

    name = "sl_ct"
    key_type, value_type = sl_ct_key, sl_ct_entry
    REPLIED, CLOSING = 1, 2     # enum sl_ct_flags

    def entries(self) -> list[CtEntry]:
        return [CtEntry(ip_str(k.saddr), port_int(k.sport), ip_str(k.daddr), port_int(k.dport), k.proto,
                        k.direction, v.expires_ns, v.flags) for k, v in self.raw_items()]

    def expire(self, now_ns: int | None = None) -> int:
        """Remove the entries expired by `now_ns` (CLOCK_MONOTONIC, the programs' bpf_ktime_get_ns();
        now when None). Returns how many went."""
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        stale = [k for k, v in self.raw_items() if v.expires_ns <= now_ns]
        if stale:
            self.delete_batch(stale)
        return len(stale)


ALL_MAPS = [ConfigMap, EndpointsMap, RoutesMap, ServicesMap, BackendsMap, SockRevNatMap, SockAffinityMap, FailsafeMap,
            PrefilterMap, LbVipsMap, LbAffinityMap, NatMap, CpuMap, CpuListMap, SockHash, MetricsMap, IpcacheMap,
            PolicyCidrsMap, PolicyIsolationMap, PolicyMap, PolicyDropsMap, CtMap]
