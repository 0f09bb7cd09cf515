"""The Python mirrors of the map layouts and the ABI constants match the C side."""

import ctypes

import pytest

from conftest import bpf_object_path
from sluice import maps
from sluice.policy import resolve
from sluice.bpf import libbpf as lb
from sluice.bpf.btf import Btf
from sluice.bpf.object import BpfObject
from sluice.datapath import OBJECTS


@pytest.mark.parametrize("obj", sorted(OBJECTS))
@pytest.mark.parametrize("struct", maps.LAYOUTS, ids=lambda s: s.__name__)
def test_struct_layout_matches_object_btf(obj, struct):
    with Btf(bpf_object_path(obj)) as btf:
        size, members = btf.struct_layout(struct.__name__)
    assert (ctypes.sizeof(struct), maps.members(struct)) == (size, members)


def test_map_key_and_value_sizes_match_loaded_maps(load_object):
    obj = load_object("tc_pod")
    fds = obj.maps
    for cls in maps.ALL_MAPS:
        info = lb.map_info(fds[cls.name])
        assert info.key_size == ctypes.sizeof(cls.key_type), cls.name
        if not cls.percpu:
            assert info.value_size == ctypes.sizeof(cls.value_type), cls.name


def test_every_object_declares_every_map():
    """All objects share the pinned maps, so each must carry the same definitions."""
    names = {cls.name for cls in maps.ALL_MAPS}
    for obj in OBJECTS:
        with BpfObject(bpf_object_path(obj)) as loaded:
            assert names <= set(loaded.maps), obj


def test_attach_type_constants_match_kernel():
    with Btf("/sys/kernel/btf/vmlinux") as btf:
        attach = btf.enum("bpf_attach_type")
        link_types = btf.enum("bpf_link_type")
    for name in ("BPF_CGROUP_SOCK_OPS", "BPF_SK_MSG_VERDICT", "BPF_CGROUP_INET4_CONNECT", "BPF_CGROUP_UDP4_SENDMSG",
                 "BPF_CGROUP_UDP4_RECVMSG", "BPF_CGROUP_INET4_GETPEERNAME", "BPF_XDP", "BPF_TCX_INGRESS"):
        assert attach[name] == getattr(lb, name), name
    for name in ("BPF_LINK_TYPE_CGROUP", "BPF_LINK_TYPE_XDP", "BPF_LINK_TYPE_TCX", "BPF_LINK_TYPE_SOCKMAP"):
        assert link_types[name] == getattr(lb, name), name


def test_maglev_size_matches_c():
    with Btf(bpf_object_path("xdp_nic")) as btf:
        size, members = btf.struct_layout("sl_lb_vip")
    assert members["table"][1] == 4 * maps.MAGLEV_SIZE


# The C enums whose values maps.py types again, each in full: an enumerator added in C fails here until Python
# knows it too.
MIRRORED_ENUMS = {
    "sl_config_flags": {"SL_CFG_CPUMAP": maps.ConfigMap.CPUMAP, "SL_CFG_POLICY": maps.ConfigMap.POLICY},
    "sl_policy_direction": {"SL_POLICY_INGRESS": maps.INGRESS, "SL_POLICY_EGRESS": maps.EGRESS},
    "sl_policy_prefix": {"SL_POLICY_PREFIX_PEER": maps.PolicyMap.PREFIX_PEER,
                         "SL_POLICY_PREFIX_PROTO": maps.PolicyMap.PREFIX_PROTO,
                         "SL_POLICY_PREFIX_FULL": maps.PolicyMap.PREFIX_FULL},
    "sl_identity_reserved": {"SL_ID_ANY": resolve.ID_ANY, "SL_ID_HOST": resolve.ID_HOST, "SL_ID_WORLD": resolve.ID_WORLD,
                             "SL_ID_REMOTE_NODE": resolve.ID_REMOTE_NODE, "SL_ID_FIRST_POD": resolve.FIRST_POD_IDENTITY,
                             "SL_ID_FIRST_CIDR": resolve.FIRST_CIDR_IDENTITY},
    "sl_ct_flags": {"SL_CT_REPLIED": maps.CtMap.REPLIED, "SL_CT_CLOSING": maps.CtMap.CLOSING},
    "sl_route_flags": {"SL_ROUTE_TUNNEL": maps.RoutesMap.TUNNEL},
    "sl_service_flags": {"SL_SVC_AFFINITY": maps.ServicesMap.AFFINITY},
    "sl_lb_vip_flags": {"SL_LB_KEEP_SOURCE": maps.LbVipsMap.KEEP_SOURCE, "SL_LB_AFFINITY": maps.LbVipsMap.AFFINITY,
                        "SL_LB_FLAGS_BITS": maps.LbVipsMap.FLAGS_BITS},
    "sl_metrics_layout": {"SL_METRICS_PER_HOOK": maps.MetricsMap.PER_HOOK},
}


@pytest.mark.parametrize("obj", sorted(OBJECTS))
def test_python_constants_match_object_btf(obj):
    with Btf(bpf_object_path(obj)) as btf:
        assert {name: btf.enum(name) for name in MIRRORED_ENUMS} == MIRRORED_ENUMS


@pytest.mark.parametrize("struct", sorted(maps.PACKED, key=lambda s: s.__name__), ids=lambda s: s.__name__)
def test_packed_formats_decode_as_the_ctypes_mirrors(struct):
    """The struct formats bulk reads decode with (maps.PACKED) cover the ctypes mirror byte for byte and
    give its fields; the backend format reads address and port in network order, as be32/be16 write them."""
    fmt = maps.PACKED[struct]
    assert fmt.size == ctypes.sizeof(struct)
    raw = bytes(range(17, 17 + fmt.size))
    value = struct.from_buffer_copy(raw)
    fields = fmt.unpack(raw)
    if struct is maps.sl_backend:
        ip, port, proto, flags = fields
        assert (maps.ip_str(value.ip), maps.port_int(value.port), value.proto, value.flags) == \
            (".".join(str(b) for b in ip), port, proto, flags)
        b = maps.BackendsMap._value(maps.Backend("10.1.2.3", 8080, "udp"))  # pylint: disable=protected-access
        assert fmt.unpack(bytes(b)) == (bytes([10, 1, 2, 3]), 8080, 17, 0)
    elif struct is ctypes.c_uint32:
        assert fields == (value.value,)
    else:
        firsts = {}     # a union's first member stands for it
        for name, (offset, _size) in maps.members(struct).items():
            firsts.setdefault(offset, name)
        assert fields == tuple(getattr(value, name) for name in firsts.values())
