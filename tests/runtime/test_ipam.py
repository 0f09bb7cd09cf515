"""Node IPAM on the real filesystem, including concurrent CNI ADD/DEL from many processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from netaddr import IPAddress, IPNetwork

from sluice.ipam import Ipam, IpamError, IpamExhausted

# One CNI ADD: the address goes to stdout. Workers wait at a gate (EOF on the pipe
# in argv[1]) so that they all start allocating at once, after the interpreter
# start-up that would otherwise spread them out.
ALLOCATE_ONCE = """
import os, sys
from sluice.ipam import Ipam
gate, state_dir, pod_cidr, container_id = int(sys.argv[1]), *sys.argv[2:]
ipam = Ipam(state_dir, pod_cidr)
print("ready", flush=True)
os.read(gate, 1)
print(ipam.allocate(container_id, "eth0"))
"""

# A random run of ADDs and DELs over a few containers of its own; a worker checks
# every answer against what it holds and prints what it holds at the end.
MIXED_OPERATIONS = """
import json, os, random, sys
from sluice.ipam import Ipam
gate, state_dir, pod_cidr = int(sys.argv[1]), sys.argv[2], sys.argv[3]
worker, operations = int(sys.argv[4]), int(sys.argv[5])
ipam = Ipam(state_dir, pod_cidr)
rng = random.Random(worker)
held = {}
print("ready", flush=True)
os.read(gate, 1)
for _ in range(operations):
    container_id = f"w{worker}-c{rng.randrange(4)}"
    if rng.random() < 0.5:
        address = str(ipam.allocate(container_id, "eth0"))
        assert held.setdefault(container_id, address) == address, (container_id, address, held)
    else:
        released = ipam.release(container_id, "eth0")
        expected = held.pop(container_id, None)
        assert (released and str(released)) == expected, (container_id, released, expected)
print(json.dumps(held))
"""


def run_workers(script: str, argvs: list[list[str]]) -> list[str]:
    """Run one process per argv, released together once all are ready; their stdout, after "ready"."""
    gate_read, gate_write = os.pipe()
    workers = [subprocess.Popen([sys.executable, "-c", script, str(gate_read), *argv], pass_fds=[gate_read],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    os.close(gate_read)
    try:
        with os.fdopen(gate_write, "wb"):  # closing it opens the gate, also when a worker fails to start
            for worker in workers:
                assert worker.stdout.readline() == "ready\n", worker.communicate()[1]
        outputs = []
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=60)
            assert worker.returncode == 0, stderr
            outputs.append(stdout)
        return outputs
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def held_by(ipam: Ipam) -> dict[str, str]:
    return {str(address): record["container_id"] for address, record in ipam.allocations().items()}


def test_allocate_and_release_are_idempotent(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    first = ipam.allocate("ctr-a", "eth0")
    assert first == IPAddress("10.0.0.2")
    assert ipam.allocate("ctr-a", "eth0") == first
    second = ipam.allocate("ctr-a", "eth1")
    assert second != first
    assert ipam.lookup("ctr-a", "eth1") == second
    assert ipam.used == 2

    assert ipam.release("ctr-a", "eth0") == first
    assert ipam.release("ctr-a", "eth0") is None
    assert ipam.release("never-added", "eth0") is None
    assert ipam.lookup("ctr-a", "eth0") is None
    assert held_by(ipam) == {str(second): "ctr-a"}


def test_record_is_one_inspectable_file_per_address(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    address = ipam.allocate("ctr-a", "eth0")
    with open(tmp_path / "10.0.0.0_24" / str(address)) as f:
        record = json.load(f)
    assert record["container_id"] == "ctr-a" and record["ifname"] == "eth0" and record["allocated_at"]
    assert ipam.allocations()[address] == {**record, "pool": "10.0.0.0/24"}


def test_network_broadcast_gateway_and_reserved_are_never_handed_out(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/28", gateway="10.0.0.14",
                reserved=["10.0.0.2", "10.0.0.8/30", "10.0.0.12-10.0.0.13"])
    assert ipam.gateway == IPAddress("10.0.0.14")
    assert ipam.network == IPNetwork("10.0.0.0/28")
    assert ipam.capacity == 6
    handed_out = {str(ipam.allocate(f"ctr-{n}", "eth0")) for n in range(6)}
    assert handed_out == {"10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"}
    with pytest.raises(IpamExhausted):
        ipam.allocate("one-too-many", "eth0")


def test_default_gateway_is_first_usable_address(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/29")
    assert ipam.gateway == IPAddress("10.0.0.1")
    assert ipam.capacity == 5
    handed_out = {str(ipam.allocate(f"ctr-{n}", "eth0")) for n in range(5)}
    assert handed_out == {f"10.0.0.{n}" for n in range(2, 7)}


def test_exhaustion_names_the_cidr_and_usage(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/30")
    assert ipam.allocate("ctr-a", "eth0") == IPAddress("10.0.0.2")
    with pytest.raises(IpamExhausted, match=r"pod CIDR 10\.0\.0\.0/30 is exhausted: 1 of 1 allocatable"):
        ipam.allocate("ctr-b", "eth0")
    ipam.release("ctr-a", "eth0")
    assert ipam.allocate("ctr-b", "eth0") == IPAddress("10.0.0.2")


def test_requested_address_is_handed_out_and_kept(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    assert ipam.allocate("ctr-a", "eth0", "10.0.0.10") == IPAddress("10.0.0.10")
    assert ipam.allocate("ctr-a", "eth0", "10.0.0.10") == IPAddress("10.0.0.10")   # a retried ADD
    assert ipam.allocate("ctr-a", "eth0") == IPAddress("10.0.0.10")
    assert ipam.allocate("ctr-b", "eth0") == IPAddress("10.0.0.2")                  # dynamic ones go around it
    assert held_by(ipam) == {"10.0.0.10": "ctr-a", "10.0.0.2": "ctr-b"}


@pytest.mark.parametrize("requested, message", [
    ("10.0.0.2", r"requested address 10\.0\.0\.2 is already allocated to ctr-b/eth0"),
    ("10.0.1.5", r"requested address 10\.0\.1\.5 is outside pod CIDR 10\.0\.0\.0/24"),
    ("10.0.0.1", r"requested address 10\.0\.0\.1 is the network, broadcast, gateway or a reserved"),
    ("10.0.0.255", r"requested address 10\.0\.0\.255 is the network, broadcast"),
    ("10.0.0.300", r"requested address '10\.0\.0\.300' is not an IPv4 address"),
])
def test_unusable_requested_address_is_refused_naming_it(tmp_path, requested, message):
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    ipam.allocate("ctr-b", "eth0")
    with pytest.raises(IpamError, match=message):
        ipam.allocate("ctr-a", "eth0", requested)
    assert held_by(ipam) == {"10.0.0.2": "ctr-b"}


def test_requested_address_conflicting_with_the_held_one_is_refused(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    ipam.allocate("ctr-a", "eth0", "10.0.0.10")
    with pytest.raises(IpamError, match=r"requested address 10\.0\.0\.11 differs from 10\.0\.0\.10"):
        ipam.allocate("ctr-a", "eth0", "10.0.0.11")
    assert held_by(ipam) == {"10.0.0.10": "ctr-a"}


def test_allocation_is_round_robin(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/29")
    assert str(ipam.allocate("ctr-a", "eth0")) == "10.0.0.2"
    ipam.release("ctr-a", "eth0")
    # The address just released is not the next one handed out...
    assert str(ipam.allocate("ctr-b", "eth0")) == "10.0.0.3"
    assert [str(ipam.allocate(f"ctr-{n}", "eth0")) for n in range(3)] == ["10.0.0.4", "10.0.0.5", "10.0.0.6"]
    # ...and the search wraps around the end of the CIDR.
    assert str(ipam.allocate("ctr-wrap", "eth0")) == "10.0.0.2"


def test_state_persists_across_instances(tmp_path):
    first = Ipam(str(tmp_path), "10.0.0.0/24")
    address = first.allocate("ctr-a", "eth0")
    first.allocate("ctr-b", "eth0")
    first.release("ctr-b", "eth0")

    second = Ipam(str(tmp_path), "10.0.0.0/24")
    assert second.lookup("ctr-a", "eth0") == address
    assert second.allocate("ctr-a", "eth0") == address
    # The round-robin position is on disk too: 10.0.0.3 was released last, so 10.0.0.4 comes next.
    assert str(second.allocate("ctr-c", "eth0")) == "10.0.0.4"


def test_gc_releases_exactly_the_attachments_not_valid(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    addresses = {name: ipam.allocate(name, "eth0") for name in ("a", "b", "c", "d")}
    second_interface = ipam.allocate("a", "eth1")

    released = ipam.gc({("a", "eth0"), ("c", "eth0")})

    assert released == sorted([addresses["b"], addresses["d"], second_interface])
    assert held_by(ipam) == {str(addresses["a"]): "a", str(addresses["c"]): "c"}
    assert ipam.gc({("a", "eth0"), ("c", "eth0")}) == []


def test_damaged_record_keeps_its_address_until_gc(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/29")
    (tmp_path / "10.0.0.0_29" / "10.0.0.2").write_text("{trunc")
    (tmp_path / "10.0.0.0_29" / ".tmp-1234-deadbeef").write_text("left by a crash")

    assert str(ipam.allocate("ctr-a", "eth0")) == "10.0.0.3"
    assert ipam.allocations()[IPAddress("10.0.0.2")] == {"pool": "10.0.0.0/29"}

    assert ipam.gc({("ctr-a", "eth0")}) == [IPAddress("10.0.0.2")]
    assert sorted(os.listdir(tmp_path / "10.0.0.0_29")) == ["10.0.0.3", "last_reserved"]


def test_pod_cidr_change_reports_old_allocations_as_stale(tmp_path):
    old = Ipam(str(tmp_path), "10.0.0.0/24")
    old_address = old.allocate("ctr-a", "eth0")
    old.allocate("ctr-b", "eth0")

    new = Ipam(str(tmp_path), "10.1.0.0/24")
    assert set(new.stale()) == set(new.allocations()) == {IPAddress("10.0.0.2"), IPAddress("10.0.0.3")}
    assert new.stale()[old_address]["pool"] == "10.0.0.0/24"
    assert new.used == 0
    # The old address is not reused: ADD gets an address of the new pool.
    new_address = new.allocate("ctr-a", "eth0")
    assert new_address == IPAddress("10.1.0.2")
    assert new.lookup("ctr-a", "eth0") == new_address
    assert set(new.stale()) == {IPAddress("10.0.0.2"), IPAddress("10.0.0.3")}

    assert new.gc({("ctr-a", "eth0")}) == [IPAddress("10.0.0.3")]
    assert new.release("ctr-a", "eth0") == new_address
    assert new.allocations() == {}


def test_overlapping_new_cidr_does_not_hand_out_addresses_still_held(tmp_path):
    old = Ipam(str(tmp_path), "10.0.0.0/24")
    held = [old.allocate(f"ctr-{n}", "eth0") for n in range(3)]  # 10.0.0.2-4

    # The new gateway is an address a running pod still holds: that allocation is stale too.
    new = Ipam(str(tmp_path), "10.0.0.0/29", gateway="10.0.0.3")
    assert set(new.stale()) == set(held)
    assert new.used == 2
    assert [str(new.allocate(f"new-{n}", "eth0")) for n in range(2)] == ["10.0.0.1", "10.0.0.5"]
    assert str(new.allocate("ctr-0", "eth0")) == "10.0.0.6"  # a new address, not the old pool's 10.0.0.2
    with pytest.raises(IpamExhausted, match=r"5 of 5 .* 2 of them by stale allocations that GC can reclaim"):
        new.allocate("new-2", "eth0")


@pytest.mark.parametrize("kwargs, message", [
    ({"pod_cidr": "10.0.0.0/33"}, "pod CIDR '10.0.0.0/33' is not a valid IPv4 network"),
    ({"pod_cidr": "banana"}, "pod CIDR 'banana' is not a valid IPv4 network"),
    ({"pod_cidr": None}, "pod CIDR None is not a valid IPv4 network"),
    ({"pod_cidr": "fd00::/64"}, "pod CIDR 'fd00::/64' is IPv6"),
    ({"pod_cidr": "10.0.0.5/24"}, "pod CIDR '10.0.0.5/24' has host bits set; the network is 10.0.0.0/24"),
    ({"pod_cidr": "10.0.0.0/31"}, "pod CIDR '10.0.0.0/31' is too small"),
    ({"gateway": "10.0.1.1"}, "gateway '10.0.1.1' is not a usable address of pod CIDR 10.0.0.0/24"),
    ({"gateway": "10.0.0.255"}, "gateway '10.0.0.255' is not a usable address"),
    ({"gateway": "fd00::1"}, "gateway 'fd00::1' is not an IPv4 address"),
    ({"reserved": ["10.0.1.0/28"]}, "reserved entry '10.0.1.0/28' is outside pod CIDR 10.0.0.0/24"),
    ({"reserved": ["10.0.0.250-10.0.1.5"]}, "reserved entry '10.0.0.250-10.0.1.5' is outside pod CIDR"),
    ({"reserved": ["10.0.0.9-10.0.0.3"]}, "reserved entry '10.0.0.9-10.0.0.3' is not an IPv4 address, CIDR"),
    ({"reserved": ["fd00::5"]}, "reserved entry 'fd00::5' is not an IPv4 address, CIDR or range"),
    ({"reserved": [7]}, "reserved entry 7 is not an IPv4 address, CIDR or range"),
    ({"reserved": "10.0.0.5"}, "reserved must be a list of entries, not the string '10.0.0.5'"),
])
def test_invalid_configuration_is_rejected_naming_the_value(tmp_path, kwargs, message):
    config = {"pod_cidr": "10.0.0.0/24", **kwargs}
    with pytest.raises(IpamError) as raised:
        Ipam(str(tmp_path), **config)
    assert message in str(raised.value)


def test_invalid_attachment_is_rejected(tmp_path):
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    with pytest.raises(IpamError, match="container ID '' must be a non-empty string"):
        ipam.allocate("", "eth0")
    with pytest.raises(IpamError, match="interface name None must be a non-empty string"):
        ipam.release("ctr-a", None)


def test_concurrent_adds_from_separate_processes_get_distinct_addresses(tmp_path):
    outputs = run_workers(ALLOCATE_ONCE, [[str(tmp_path), "10.0.0.0/24", f"ctr-{n}"] for n in range(50)])

    addresses = [output.strip() for output in outputs]
    assert len(set(addresses)) == 50
    ipam = Ipam(str(tmp_path), "10.0.0.0/24")
    assert held_by(ipam) == {address: f"ctr-{n}" for n, address in enumerate(addresses)}
    assert ipam.used == 50


def test_concurrent_retries_of_one_add_share_one_address(tmp_path):
    # A runtime retrying an ADD: the idempotence check and the allocation must be one locked step.
    outputs = run_workers(ALLOCATE_ONCE, [[str(tmp_path), "10.0.0.0/24", "ctr-retried"] for _worker in range(20)])

    assert len({output.strip() for output in outputs}) == 1
    assert held_by(Ipam(str(tmp_path), "10.0.0.0/24")) == {outputs[0].strip(): "ctr-retried"}


def test_concurrent_adds_and_dels_leave_no_duplicates_or_leaks(tmp_path):
    # 10 processes x 20 operations over 4 containers each: at most 40 of the /26's 61 addresses in use.
    outputs = run_workers(MIXED_OPERATIONS, [[str(tmp_path), "10.0.0.0/26", str(n), "20"] for n in range(10)])

    expected: dict[str, str] = {}
    for output in outputs:
        for container_id, address in json.loads(output).items():
            assert address not in expected, f"{address} held by both {expected[address]} and {container_id}"
            expected[address] = container_id
    ipam = Ipam(str(tmp_path), "10.0.0.0/26")
    assert held_by(ipam) == expected
    assert ipam.used == len(expected)
    assert [name for name in os.listdir(tmp_path / "10.0.0.0_26") if name.startswith(".tmp-")] == []
