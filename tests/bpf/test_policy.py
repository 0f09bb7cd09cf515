"""NetworkPolicy in tc_from_pod (egress) and sl_deliver_local (ingress) on real traffic between namespaces:
isolation, entries by identity / any peer / ipBlock prefix, protocols and port blocks, connection tracking
of replies and of ICMP errors, expiry, and the same across two nodes (native and VXLAN)."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from lib import netns, packets
from sluice import maps as m
# one_node: test_tc_traffic's fixture, used here by name
from test_tc_traffic import POD1, POD2, POD_HOOK, NIC_HOOK, one_node, two_nodes  # noqa: F401  pylint: disable=unused-import

pytestmark = pytest.mark.kernel

POD1_ID, POD2_ID, BLOCK_ID = 300, 301, 1 << 24
PORT, OTHER_PORT = 8080, 8090


def enable(dp, node_ip: str = "192.168.99.1", ipcache: dict | None = None) -> None:
    """SL_CFG_POLICY on, and the two pods' identities."""
    with m.ConfigMap(dp.pod.map_fd("sl_config")) as cfg:
        cfg.set(node_ip, 0, policy=True)
    m.IpcacheMap(dp.pod.map_fd("sl_ipcache")).sync(ipcache or {f"{POD1}/32": POD1_ID, f"{POD2}/32": POD2_ID})


def isolate(dp, ip: str, flags: int, *entries: tuple) -> None:
    isolation = m.PolicyIsolationMap(dp.pod.map_fd("sl_policy_isolation"))
    isolation.sync({**isolation.items(), ip: flags})
    m.PolicyMap(dp.pod.map_fd("sl_policy")).add(m.PolicyEntryTuple(*e) for e in entries)


def ct(dp) -> list[m.CtEntry]:
    return m.CtMap(dp.pod.map_fd("sl_ct")).entries()


def policy_drops(dp) -> dict:
    return m.PolicyDropsMap(dp.pod.map_fd("sl_policy_drops")).read()


@contextlib.contextmanager
def tcp_server(ns: str, ip: str, port: int):
    with netns.entered(ns):
        server = socket.create_server((ip, port))
    with server:
        server.settimeout(3)
        yield server


def connects(ns: str, ip: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection from `ns` gets through (False when its SYNs are dropped)."""
    with netns.entered(ns):
        client = socket.socket()
    with client:
        client.settimeout(timeout)
        try:
            client.connect((ip, port))
        except (TimeoutError, socket.timeout):
            return False
        client.sendall(b"ping")
        return True


def udp_delivered(src_ns: str, dst_ns: str, dst_ip: str, port: int) -> bool:
    with netns.entered(dst_ns):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(src_ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, client:
        server.bind((dst_ip, port))
        server.settimeout(0.5)
        client.sendto(b"x", (dst_ip, port))
        try:
            return server.recv(16) == b"x"
        except (TimeoutError, socket.timeout):
            return False


def test_without_the_policy_flag_nothing_is_checked_or_tracked(one_node):
    n = one_node
    isolate(n.dp, POD2, m.INGRESS)      # isolated, no entry: would refuse everything
    with tcp_server(n.pod2, POD2, PORT):
        assert connects(n.pod1, POD2, PORT)
    assert ct(n.dp) == []


def test_an_isolated_pod_takes_only_the_flows_its_entries_allow(one_node):
    n = one_node
    enable(n.dp)
    # pod1 may reach pod2 on TCP 8080 only; pod2 is not isolated for egress
    isolate(n.dp, POD2, m.INGRESS, (POD2, m.INGRESS, POD1_ID, 6, PORT, 16))
    with tcp_server(n.pod2, POD2, PORT), tcp_server(n.pod2, POD2, OTHER_PORT):
        assert connects(n.pod1, POD2, PORT)
        assert not connects(n.pod1, POD2, OTHER_PORT)
    assert not udp_delivered(n.pod1, n.pod2, POD2, PORT)
    assert n.dp.forwarded()[(POD_HOOK, "SL_DROP_POLICY_INGRESS")] >= 2
    assert (POD2, m.INGRESS) in policy_drops(n.dp)
    assert (POD1, m.INGRESS) not in policy_drops(n.dp)
    # Tracked once, each way it was seen: pod1 sent it, pod2 received it.
    flows = {(e.saddr, e.daddr, e.dport, e.direction) for e in ct(n.dp) if e.proto == 6}
    assert {(POD1, POD2, PORT, m.EGRESS), (POD1, POD2, PORT, m.INGRESS)} <= flows
    # pod2's own connections to pod1 still work, their replies entering pod2 as tracked flows.
    with tcp_server(n.pod1, POD1, OTHER_PORT):
        assert connects(n.pod2, POD1, OTHER_PORT)


def test_replies_pass_both_isolations_and_tcp_state_is_tracked(one_node):
    n = one_node
    enable(n.dp)
    isolate(n.dp, POD1, m.INGRESS | m.EGRESS, (POD1, m.EGRESS, POD2_ID, 6, PORT, 16))
    isolate(n.dp, POD2, m.INGRESS | m.EGRESS, (POD2, m.INGRESS, POD1_ID, 0, 0, 0))
    with tcp_server(n.pod2, POD2, PORT) as server:
        with netns.entered(n.pod1):
            client = socket.create_connection((POD2, PORT), timeout=2)
        conn, _peer = server.accept()
        with client, conn:
            client.sendall(b"a" * 100000)
            got = b""
            while len(got) < 100000:
                got += conn.recv(65536)
            conn.sendall(b"b" * 100000)      # the replies: egress of pod2, ingress of pod1
            got = b""
            client.settimeout(2)
            while len(got) < 100000:
                got += client.recv(65536)
            entries = {(e.direction, e.flags) for e in ct(n.dp) if e.dport == PORT}
            assert entries == {(m.EGRESS, m.CtMap.REPLIED), (m.INGRESS, m.CtMap.REPLIED)}
            lifetime = min(e.expires_ns for e in ct(n.dp) if e.dport == PORT) - time.clock_gettime_ns(
                time.CLOCK_MONOTONIC)
            assert lifetime > 3600 * 10**9          # established: hours, not the SYN's minute
    # Closed: FIN seen, the entries expire within seconds.
    time.sleep(0.2)
    assert {e.flags for e in ct(n.dp) if e.dport == PORT} == {m.CtMap.REPLIED | m.CtMap.CLOSING}
    # pod2 cannot open a connection of its own to pod1 (pod1 allows nothing in, pod2 nothing out).
    with tcp_server(n.pod1, POD1, OTHER_PORT):
        assert not connects(n.pod2, POD1, OTHER_PORT)
    assert n.dp.forwarded()[(POD_HOOK, "SL_DROP_POLICY_EGRESS")] >= 1


def test_port_blocks_any_peer_and_ipblock_prefixes_allow_what_they_cover(one_node):
    n = one_node
    enable(n.dp)
    m.PolicyCidrsMap(n.dp.pod.map_fd("sl_policy_cidrs")).sync({"10.1.1.0/24": BLOCK_ID, "10.1.1.11/32": BLOCK_ID + 1})
    isolate(n.dp, POD2, m.INGRESS,
            (POD2, m.INGRESS, 0, 6, 8080, 15),              # any peer, TCP 8080-8081
            (POD2, m.INGRESS, BLOCK_ID, 17, 0, 0))          # 10.1.1.0/24 except POD1's /32: every UDP port
    with tcp_server(n.pod2, POD2, 8080), tcp_server(n.pod2, POD2, 8081), tcp_server(n.pod2, POD2, 8082):
        assert connects(n.pod1, POD2, 8080) and connects(n.pod1, POD2, 8081)
        assert not connects(n.pod1, POD2, 8082)
    assert not udp_delivered(n.pod1, n.pod2, POD2, 5000)    # POD1 is in the except prefix
    isolate(n.dp, POD2, m.INGRESS, (POD2, m.INGRESS, BLOCK_ID + 1, 17, 0, 0))
    assert udp_delivered(n.pod1, n.pod2, POD2, 5000)


def test_icmp_needs_an_every_protocol_entry_and_errors_follow_their_flow(one_node):
    n = one_node
    enable(n.dp)
    isolate(n.dp, POD2, m.INGRESS, (POD2, m.INGRESS, POD1_ID, 6, 0, 0))
    assert packets.echo(n.pod1, POD2, 1, timeout=1) == []
    isolate(n.dp, POD2, m.INGRESS, (POD2, m.INGRESS, POD1_ID, 0, 0, 0))
    assert len(packets.echo(n.pod1, POD2, 2)) == 2
    # pod2 (isolated, and allowing nothing from pod1 but what it asked for) sends UDP to a closed port of
    # pod1: the port unreachable pod1 answers is let in as part of pod2's flow.
    m.PolicyMap(n.dp.pod.map_fd("sl_policy")).discard([m.PolicyEntryTuple(POD2, m.INGRESS, POD1_ID, 0, 0, 0)])
    with netns.entered(n.pod2):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with client:
        client.settimeout(1)
        client.connect((POD1, 9))
        client.send(b"x")
        with pytest.raises(ConnectionRefusedError):
            client.recv(16)


def test_expired_entries_are_removed_and_their_flow_judged_again(one_node):
    n = one_node
    enable(n.dp)
    with tcp_server(n.pod2, POD2, PORT) as server:
        with netns.entered(n.pod1):
            client = socket.create_connection((POD2, PORT), timeout=2)
        conn, _peer = server.accept()
        with client, conn:
            ctmap = m.CtMap(n.dp.pod.map_fd("sl_ct"))
            assert ctmap.expire() == 0
            assert ctmap.expire(time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 86400 * 10**9) >= 2
            assert ctmap.entries() == []
            isolate(n.dp, POD2, m.INGRESS)              # isolated now: the flow's next packet is new, refused
            client.sendall(b"late")
            conn.settimeout(1)
            with pytest.raises((TimeoutError, socket.timeout)):
                conn.recv(16)
            assert (POD2, m.INGRESS) in policy_drops(n.dp)


def test_a_full_table_evicts_the_oldest_and_new_flows_still_pass(one_node):
    n = one_node
    enable(n.dp)
    ctmap = m.CtMap(n.dp.pod.map_fd("sl_ct"))
    far = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 3600 * 10**9
    filler = [(m.sl_ct_key(i + 1, 2, 3, 4, 17, m.EGRESS, 0), m.sl_ct_entry(far, 0, 0))
              for i in range(ctmap.max_entries)]
    for start in range(0, len(filler), 65536):
        ctmap.update_batch(filler[start:start + 65536])
    with tcp_server(n.pod2, POD2, PORT):
        assert connects(n.pod1, POD2, PORT)
    flows = {(e.saddr, e.daddr, e.direction) for e in ctmap.entries() if e.dport == PORT}
    assert flows == {(POD1, POD2, m.EGRESS), (POD1, POD2, m.INGRESS)}
    assert len(ctmap.entries()) <= ctmap.max_entries


@pytest.mark.parametrize("tunnel", [False, True], ids=["native", "vxlan"])
def test_across_nodes_the_receiving_node_knows_the_sender_by_its_ipcache(pin_root, tunnel):
    with two_nodes(pin_root, tunnel) as c:
        for dp in (c.dp1, c.dp2):
            enable(dp)
        isolate(c.dp2, POD2, m.INGRESS, (POD2, m.INGRESS, POD1_ID, 6, PORT, 16))
        with tcp_server(c.pod2, POD2, PORT), tcp_server(c.pod2, POD2, OTHER_PORT):
            assert connects(c.pod1, POD2, PORT)
            assert not connects(c.pod1, POD2, OTHER_PORT)
            # pod1 known as another identity on node2: refused
            m.IpcacheMap(c.dp2.pod.map_fd("sl_ipcache")).sync({f"{POD1}/32": 999})
            assert not connects(c.pod1, POD2, PORT)
        assert c.dp2.forwarded()[(NIC_HOOK, "SL_DROP_POLICY_INGRESS")] >= 2
        assert (POD_HOOK, "SL_DROP_POLICY_EGRESS") not in c.dp1.forwarded()
