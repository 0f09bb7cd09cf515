"""Node IPAM: hands out pod addresses from the node's pod CIDR.

Every CNI ADD and DEL runs in its own plugin process, so the allocations live on
disk and every change happens under an exclusive flock. The layout follows the
reference host-local plugin, one small file per allocated address:

    <state_dir>/lock                 flock taken around every read and change
    <state_dir>/10.244.1.0_24/       one directory per pod CIDR (pool)
        10.244.1.7                   {"container_id": ..., "ifname": ..., "allocated_at": ...}
        last_reserved                round-robin hint: the address handed out last

A record appears by link(2) of a fully written, fsynced temp file, so it is
created exclusively (like O_CREAT|O_EXCL) and never seen half written.

The lock lives in state_dir rather than in each pool because the pools of an old
and a new pod CIDR may overlap: after a CIDR change, the addresses still held in
the old pool stay taken, and are reported by `stale()`, until DEL or GC frees
them; they are never handed back as if they belonged to the new pool.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from typing import Callable, Iterable, Iterator

from netaddr import AddrFormatError, IPAddress, IPNetwork, IPRange, IPSet, valid_ipv4

LOCK_FILE = "lock"
HINT_FILE = "last_reserved"
TEMP_PREFIX = ".tmp-"
# Network, gateway and broadcast address plus at least one pod address.
MAX_PREFIXLEN = 30

# A CNI attachment: (container_id, ifname).
AttachmentKey = tuple[str, str]


class IpamError(Exception):
    """Invalid IPAM configuration or request."""


class IpamExhausted(IpamError):
    """Every allocatable address of the pod CIDR is in use."""


@dataclass(frozen=True)
class _Allocation:
    pool: IPNetwork
    value: int          # the address as an integer: a scan reads every record, netaddr parsing would dominate
    path: str
    record: dict

    @property
    def address(self) -> IPAddress:
        return IPAddress(self.value, 4)

    @property
    def key(self) -> tuple:
        return self.record.get("container_id"), self.record.get("ifname")


def _parse_pod_cidr(pod_cidr: str) -> IPNetwork:
    try:
        network = IPNetwork(pod_cidr)
    except (AddrFormatError, TypeError, ValueError):
        raise IpamError(f"pod CIDR {pod_cidr!r} is not a valid IPv4 network") from None
    if network.version != 4:
        raise IpamError(f"pod CIDR {pod_cidr!r} is IPv6; the node IPAM hands out IPv4 addresses only")
    if network.ip != network.network:
        raise IpamError(f"pod CIDR {pod_cidr!r} has host bits set; the network is {network.cidr}")
    if network.prefixlen > MAX_PREFIXLEN:
        raise IpamError(f"pod CIDR {pod_cidr!r} is too small: it needs room for network, gateway, broadcast "
                        f"and a pod, so at most /{MAX_PREFIXLEN}")
    return network


def _parse_ipv4(value: str, what: str) -> IPAddress:
    # IPAddress() also takes ints, which would turn a config mistake into some address.
    if not isinstance(value, str) or not valid_ipv4(value):
        raise IpamError(f"{what} {value!r} is not an IPv4 address")
    return IPAddress(value)


def _parse_reserved(entry: str, network: IPNetwork) -> IPSet:
    """A reserved address ("10.0.0.9"), CIDR ("10.0.0.16/28") or range ("10.0.0.20-10.0.0.29")."""
    invalid = IpamError(f"reserved entry {entry!r} is not an IPv4 address, CIDR or range")
    if not isinstance(entry, str):
        raise invalid
    try:
        if "-" in entry:
            first, _dash, last = entry.partition("-")
            reserved = IPSet(IPRange(_parse_ipv4(first.strip(), "address"), _parse_ipv4(last.strip(), "address")))
        elif "/" in entry:
            reserved = IPSet([IPNetwork(entry)])
        else:
            reserved = IPSet([_parse_ipv4(entry, "address")])
    except (AddrFormatError, IpamError, ValueError):
        raise invalid from None
    if not reserved.issubset(IPSet([network])):
        raise IpamError(f"reserved entry {entry!r} is outside pod CIDR {network}")
    return reserved


def _check_key(container_id: str, ifname: str) -> AttachmentKey:
    for what, value in (("container ID", container_id), ("interface name", ifname)):
        if not isinstance(value, str) or not value:
            raise IpamError(f"{what} {value!r} must be a non-empty string")
    return container_id, ifname


def _pool_dir_name(network: IPNetwork) -> str:
    return f"{network.ip}_{network.prefixlen}"


def _parse_pool_dir_name(name: str) -> IPNetwork | None:
    try:
        network = IPNetwork(name.replace("_", "/", 1))
    except (AddrFormatError, ValueError):
        return None
    return network if _pool_dir_name(network) == name else None


def _address_value(name: str) -> int | None:
    """The address a record's file name holds, as an integer; None for any other name."""
    try:
        packed = socket.inet_aton(name)
    except OSError:
        return None
    return int.from_bytes(packed, "big") if socket.inet_ntoa(packed) == name else None


def _read_record(path: str) -> dict:
    # A damaged record still holds its address; its key matches no container, so GC reclaims it.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            record = json.loads(os.read(fd, 1 << 16))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_temp(directory: str, data: bytes, durable: bool) -> str:
    path = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ipam:
    """Addresses of one node's pod CIDR, shared by every process using the same state_dir."""

    def __init__(self, state_dir: str, pod_cidr: str, gateway: str | None = None, reserved: Iterable[str] = ()):
        self._network = _parse_pod_cidr(pod_cidr)
        if gateway is None:
            # The node side configures the first usable address as the pods' gateway.
            self._gateway = IPAddress(self._network.first + 1)
        else:
            self._gateway = _parse_ipv4(gateway, "gateway")
            if self._gateway not in self._network or self._gateway in (self._network.network,
                                                                       self._network.broadcast):
                raise IpamError(f"gateway {gateway!r} is not a usable address of pod CIDR {self._network}")
        if isinstance(reserved, str):
            raise IpamError(f"reserved must be a list of entries, not the string {reserved!r}")
        self._reserved = IPSet()
        for entry in reserved:
            self._reserved |= _parse_reserved(entry, self._network)
        self._allocatable = (IPSet([self._network])
                             - IPSet([self._network.network, self._network.broadcast, self._gateway])
                             - self._reserved)
        self._state_dir = state_dir
        self._pool_dir = os.path.join(state_dir, _pool_dir_name(self._network))
        os.makedirs(self._pool_dir, exist_ok=True)

    def __repr__(self) -> str:
        return f"Ipam({self._state_dir!r}, {str(self._network)!r}, gateway={str(self._gateway)!r})"

    @property
    def network(self) -> IPNetwork:
        return self._network

    @property
    def gateway(self) -> IPAddress:
        return self._gateway

    @property
    def capacity(self) -> int:
        """How many addresses can be handed out: the CIDR less network, broadcast, gateway and reserved."""
        return len(self._allocatable)

    @property
    def used(self) -> int:
        """How many of the allocatable addresses are held, by current or stale allocations."""
        with self._locked(fcntl.LOCK_SH):
            return self._count_used(self._scan())

    def allocate(self, container_id: str, ifname: str, requested: str | None = None) -> IPAddress:
        """The attachment's address: the one it already holds in this pool, else `requested` (the
        runtime's static address for it), else the next free one."""
        return self.claim(container_id, ifname, requested)[0]

    def claim(self, container_id: str, ifname: str, requested: str | None = None) -> tuple[IPAddress, bool]:
        """allocate(), and whether the attachment held no address at all before (in any pool): then
        releasing it undoes this claim. One scan of the records where lookup() + allocate() take two."""
        key = _check_key(container_id, ifname)
        wanted = None if requested is None else self._check_requested(requested)
        with self._locked(fcntl.LOCK_EX):
            held = self._scan()
            new = not any(allocation.key == key for allocation in held)
            return self._allocate(key, wanted, held), new

    def _allocate(self, key: AttachmentKey, wanted: IPAddress | None, held: list[_Allocation]) -> IPAddress:
        for allocation in held:
            if allocation.key == key and self._is_current(allocation):
                if wanted is not None and allocation.address != wanted:
                    raise IpamError(f"requested address {wanted} differs from {allocation.address}, "
                                    f"which {key[0]}/{key[1]} already holds")
                return allocation.address
        if wanted is not None:
            return self._allocate_requested(wanted, key, held)
        taken = {allocation.value for allocation in held}
        for candidate in self._round_robin():
            if candidate in taken:
                continue
            address = IPAddress(candidate)
            # Losing the exclusive create means someone bypassed the lock; just move on.
            if self._create_record(address, key):
                self._write_hint(address)
                return address
        stale = sum(1 for a in held if not self._is_current(a) and a.address in self._allocatable)
        message = (f"pod CIDR {self._network} is exhausted: {self._count_used(held)} of {self.capacity} "
                   f"allocatable addresses are in use")
        if stale:
            message += f", {stale} of them by stale allocations that GC can reclaim"
        raise IpamExhausted(message)

    def _check_requested(self, requested: str) -> IPAddress:
        address = _parse_ipv4(requested, "requested address")
        if address not in self._network:
            raise IpamError(f"requested address {address} is outside pod CIDR {self._network}")
        if address not in self._allocatable:
            raise IpamError(f"requested address {address} is the network, broadcast, gateway or a reserved "
                            f"address of pod CIDR {self._network}")
        return address

    def _allocate_requested(self, address: IPAddress, key: AttachmentKey, held: list[_Allocation]) -> IPAddress:
        for allocation in held:
            if allocation.address == address:
                owner = "/".join(map(str, allocation.key))
                raise IpamError(f"requested address {address} is already allocated to {owner}")
        if not self._create_record(address, key):
            raise IpamError(f"requested address {address} was allocated concurrently by another process")
        return address

    def release(self, container_id: str, ifname: str,
                before: Callable[[list[IPAddress]], object] | None = None) -> IPAddress | None:
        """Free every address the attachment holds; the one in the current pool is returned. `before` is
        called with those addresses under the lock, before they are freed: what must not outlive an
        address's allocation (its endpoint entry) goes with it, and no other attachment can have been
        given the address in between."""
        key = _check_key(container_id, ifname)
        with self._locked(fcntl.LOCK_EX):
            mine = [allocation for allocation in self._scan() if allocation.key == key]
            if before is not None and mine:
                before([allocation.address for allocation in mine])
            for allocation in mine:
                # No fsync: a release lost in a crash only leaks the address until the next GC.
                os.unlink(allocation.path)
        mine.sort(key=lambda allocation: not self._is_current(allocation))
        return mine[0].address if mine else None

    def gc(self, valid: Iterable[AttachmentKey]) -> list[IPAddress]:
        """Release every allocation, in any pool, whose (container_id, ifname) is not in `valid`.

        A stale allocation of a live attachment is kept: its pod still uses the address.
        """
        valid_keys = {tuple(key) for key in valid}
        released = []
        with self._locked(fcntl.LOCK_EX):
            for allocation in self._scan():
                if allocation.key not in valid_keys:
                    os.unlink(allocation.path)
                    released.append(allocation.address)
            self._remove_orphaned_temp_files()
        return sorted(released)

    def lookup(self, container_id: str, ifname: str) -> IPAddress | None:
        """The attachment's address, preferring one in the current pool over a stale one."""
        key = _check_key(container_id, ifname)
        with self._locked(fcntl.LOCK_SH):
            mine = [allocation for allocation in self._scan() if allocation.key == key]
        mine.sort(key=lambda allocation: not self._is_current(allocation))
        return mine[0].address if mine else None

    def allocations(self) -> dict[IPAddress, dict]:
        """Every held address, in any pool, with its record plus "pool" (the CIDR it was allocated from)."""
        with self._locked(fcntl.LOCK_SH):
            return {a.address: {**a.record, "pool": str(a.pool)} for a in self._scan()}

    def stale(self) -> dict[IPAddress, dict]:
        """The allocations this pool would not hand out: from another pod CIDR, or now gateway or reserved."""
        with self._locked(fcntl.LOCK_SH):
            return {a.address: {**a.record, "pool": str(a.pool)} for a in self._scan() if not self._is_current(a)}

    # ---- internals -------------------------------------------------------------

    @contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        fd = os.open(os.path.join(self._state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # drops the lock

    def _pool_dirs(self) -> Iterator[tuple[IPNetwork, str]]:
        for name in sorted(os.listdir(self._state_dir)):
            pool = _parse_pool_dir_name(name)
            path = os.path.join(self._state_dir, name)
            if pool is not None and os.path.isdir(path):
                yield pool, path

    def _scan(self) -> list[_Allocation]:
        found = []
        for order, (pool, pool_dir) in enumerate(self._pool_dirs()):
            for name in os.listdir(pool_dir):
                value = _address_value(name)
                if value is not None:
                    path = os.path.join(pool_dir, name)
                    found.append((value, order, _Allocation(pool, value, path, _read_record(path))))
        found.sort(key=lambda entry: entry[:2])  # by address, then pool
        return [allocation for _value, _order, allocation in found]

    def _is_current(self, allocation: _Allocation) -> bool:
        return allocation.pool == self._network and allocation.address in self._allocatable

    def _count_used(self, held: list[_Allocation]) -> int:
        return len({a.value for a in held if a.address in self._allocatable})

    def _round_robin(self) -> Iterator[int]:
        """Allocatable addresses starting after the last one handed out, so a freed one is not reused at once."""
        first, last = self._network.first + 1, self._network.last - 1
        start = first
        try:
            with open(os.path.join(self._pool_dir, HINT_FILE)) as f:
                hint = int(IPAddress(f.read().strip()))
            if first <= hint < last:
                start = hint + 1
        except (OSError, AddrFormatError, ValueError):
            pass  # no or unusable hint: start from the beginning
        for candidate in chain(range(start, last + 1), range(first, start)):
            if IPAddress(candidate) in self._allocatable:
                yield candidate

    def _create_record(self, address: IPAddress, key: AttachmentKey) -> bool:
        record = {"container_id": key[0], "ifname": key[1],
                  "allocated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        temp = _write_temp(self._pool_dir, json.dumps(record).encode(), durable=True)
        try:
            os.link(temp, os.path.join(self._pool_dir, str(address)))
        except FileExistsError:
            return False
        finally:
            os.unlink(temp)
        # A pod's address must survive a crash, or it could be handed to a second pod.
        _fsync_dir(self._pool_dir)
        return True

    def _write_hint(self, address: IPAddress) -> None:
        # Not fsynced: a lost hint only changes where the next search starts.
        temp = _write_temp(self._pool_dir, str(address).encode(), durable=False)
        os.replace(temp, os.path.join(self._pool_dir, HINT_FILE))

    def _remove_orphaned_temp_files(self) -> None:
        # Under the exclusive lock no one is writing, so any temp file was left by a crash.
        for _pool, pool_dir in self._pool_dirs():
            for name in os.listdir(pool_dir):
                if name.startswith(TEMP_PREFIX):
                    os.unlink(os.path.join(pool_dir, name))
