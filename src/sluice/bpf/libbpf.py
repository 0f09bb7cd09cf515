"""A small ctypes binding to the system's libbpf (Debian's libbpf1).

Why ctypes over libbpf rather than a compiled extension or a pure-Python bpf(2)
implementation: libbpf does the hard parts (ELF/BTF, CO-RE relocations, map
pinning and reuse, verifier log retries), Debian ships it, and ctypes needs no
build step on the node. `dlopen` costs well under a millisecond, which matters
for the CNI plugin that runs once per pod. Only the handful of calls Sluice uses
are declared here.
"""

from __future__ import annotations

import ctypes
import errno
import os
from ctypes import (
    POINTER,
    Structure,
    Union,
    byref,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
    sizeof,
)

# enum bpf_attach_type values (kernel ABI, stable; checked against the running
# kernel's BTF in tests/bpf/test_btf_layout.py).
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_XDP = 37
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

# enum bpf_link_type
BPF_LINK_TYPE_CGROUP = 3
BPF_LINK_TYPE_XDP = 6
BPF_LINK_TYPE_TCX = 11
BPF_LINK_TYPE_SOCKMAP = 14

# XDP attach flags (linux/if_link.h)
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class BpfError(OSError):
    """A libbpf call failed; errno and a message naming the operation."""


class VerifierError(BpfError):
    """The kernel refused to load a program; `log` holds the verifier's words."""

    def __init__(self, err: int, message: str, log: str):
        super().__init__(err, message)
        self.log = log

    def excerpt(self, lines: int = 25) -> str:
        """The end of the verifier log, where the reason for a rejection is."""
        return "\n".join(self.log.strip().splitlines()[-lines:])


class BpfObjectOpenOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_removed_attach_prog_fd", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_void_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class BpfTestRunOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class BpfLinkCreateOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("flags", c_uint32),
        ("iter_info", c_void_p),
        ("iter_info_len", c_uint32),
        ("target_btf_id", c_uint32),
        ("_union", c_uint8 * 40),
    ]


class BpfLinkUpdateOpts(Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("old_prog_fd", c_uint32)]


class BpfMapBatchOpts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BpfProgQueryOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("query_flags", c_uint32),
        ("attach_flags", c_uint32),
        ("prog_ids", POINTER(c_uint32)),
        ("prog_cnt", c_uint32),
        ("prog_attach_flags", POINTER(c_uint32)),
    ]


class BpfProgInfo(Structure):
    """The leading part of struct bpf_prog_info (the kernel fills what fits)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * 16),
        ("ifindex", c_uint32),
    ]


class BpfMapInfo(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * 16),
    ]


class _LinkInfoUnion(Union):
    _fields_ = [
        ("raw", c_uint8 * 32),
        ("cgroup", type("cg", (Structure,), {"_fields_": [("cgroup_id", c_uint64), ("attach_type", c_uint32)]})),
        ("xdp", type("xdp", (Structure,), {"_fields_": [("ifindex", c_uint32)]})),
        ("tcx", type("tcx", (Structure,), {"_fields_": [("ifindex", c_uint32), ("attach_type", c_uint32)]})),
        ("sockmap", type("sm", (Structure,), {"_fields_": [("map_id", c_uint32), ("attach_type", c_uint32)]})),
    ]


class BpfLinkInfo(Structure):
    _fields_ = [("type", c_uint32), ("id", c_uint32), ("prog_id", c_uint32), ("_pad", c_uint32), ("u", _LinkInfoUnion)]


_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)


def _declare(name, restype, *argtypes):
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


# object API
bpf_object__open_file = _declare("bpf_object__open_file", c_void_p, c_char_p, POINTER(BpfObjectOpenOpts))
bpf_object__load = _declare("bpf_object__load", c_int, c_void_p)
bpf_object__close = _declare("bpf_object__close", None, c_void_p)
bpf_object__next_program = _declare("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
bpf_object__next_map = _declare("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
bpf_object__btf = _declare("bpf_object__btf", c_void_p, c_void_p)
bpf_program__name = _declare("bpf_program__name", c_char_p, c_void_p)
bpf_program__section_name = _declare("bpf_program__section_name", c_char_p, c_void_p)
bpf_program__fd = _declare("bpf_program__fd", c_int, c_void_p)
bpf_map__name = _declare("bpf_map__name", c_char_p, c_void_p)
bpf_map__fd = _declare("bpf_map__fd", c_int, c_void_p)
bpf_map__pin_path = _declare("bpf_map__pin_path", c_char_p, c_void_p)
bpf_map__set_pin_path = _declare("bpf_map__set_pin_path", c_int, c_void_p, c_char_p)
bpf_map__is_internal = _declare("bpf_map__is_internal", c_bool, c_void_p)
libbpf_set_print = _declare("libbpf_set_print", c_void_p, c_void_p)

# BTF API (layouts and enums are read from objects, never restated)
btf__parse = _declare("btf__parse", c_void_p, c_char_p, c_void_p)
btf__free = _declare("btf__free", None, c_void_p)
btf__type_cnt = _declare("btf__type_cnt", c_uint32, c_void_p)
btf__type_by_id = _declare("btf__type_by_id", c_void_p, c_void_p, c_uint32)
btf__name_by_offset = _declare("btf__name_by_offset", c_char_p, c_void_p, c_uint32)
btf__resolve_size = _declare("btf__resolve_size", ctypes.c_longlong, c_void_p, c_uint32)

# syscall wrappers
bpf_obj_get = _declare("bpf_obj_get", c_int, c_char_p)
bpf_obj_pin = _declare("bpf_obj_pin", c_int, c_int, c_char_p)
bpf_map_lookup_elem = _declare("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
bpf_map_update_elem = _declare("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
bpf_map_delete_elem = _declare("bpf_map_delete_elem", c_int, c_int, c_void_p)
bpf_map_get_next_key = _declare("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
bpf_map_update_batch = _declare(
    "bpf_map_update_batch", c_int, c_int, c_void_p, c_void_p, POINTER(c_uint32), POINTER(BpfMapBatchOpts)
)
bpf_map_delete_batch = _declare(
    "bpf_map_delete_batch", c_int, c_int, c_void_p, POINTER(c_uint32), POINTER(BpfMapBatchOpts)
)
# (fd, in_batch, out_batch, keys, values, count, opts): in_batch NULL starts from the beginning
bpf_map_lookup_batch = _declare(
    "bpf_map_lookup_batch", c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p, POINTER(c_uint32),
    POINTER(BpfMapBatchOpts)
)
# (type, name, license, insns, insn_cnt, opts)
bpf_prog_load = _declare("bpf_prog_load", c_int, c_int, c_char_p, c_char_p, c_void_p, ctypes.c_size_t, c_void_p)
bpf_prog_test_run_opts = _declare("bpf_prog_test_run_opts", c_int, c_int, POINTER(BpfTestRunOpts))
bpf_link_create = _declare("bpf_link_create", c_int, c_int, c_int, c_int, POINTER(BpfLinkCreateOpts))
bpf_link_update = _declare("bpf_link_update", c_int, c_int, c_int, POINTER(BpfLinkUpdateOpts))
bpf_link_detach = _declare("bpf_link_detach", c_int, c_int)
bpf_prog_attach = _declare("bpf_prog_attach", c_int, c_int, c_int, c_int, c_uint32)
bpf_prog_detach2 = _declare("bpf_prog_detach2", c_int, c_int, c_int, c_int)
bpf_prog_query_opts = _declare("bpf_prog_query_opts", c_int, c_int, c_int, POINTER(BpfProgQueryOpts))
bpf_obj_get_info_by_fd = _declare("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(c_uint32))
bpf_prog_get_fd_by_id = _declare("bpf_prog_get_fd_by_id", c_int, c_uint32)
bpf_link_get_fd_by_id = _declare("bpf_link_get_fd_by_id", c_int, c_uint32)

# libbpf would print every warning to stderr, which is the CNI result channel's
# neighbour and the Ansible module's output: silence it, errors are raised.
libbpf_set_print(None)


def check(ret: int, what: str) -> int:
    """Raise BpfError for a negative libbpf return, else pass the value on."""
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno() or errno.EINVAL
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns (and closes) the fd."""
    return check(bpf_obj_get(path.encode()), f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    check(bpf_obj_pin(fd, path.encode()), f"pin {path}")


def _info(fd: int, info_type):
    info = info_type()
    size = c_uint32(sizeof(info))
    check(bpf_obj_get_info_by_fd(fd, byref(info), byref(size)), "get object info")
    return info


def prog_info(fd: int) -> BpfProgInfo:
    return _info(fd, BpfProgInfo)


def map_info(fd: int) -> BpfMapInfo:
    return _info(fd, BpfMapInfo)


def link_info(fd: int) -> BpfLinkInfo:
    return _info(fd, BpfLinkInfo)


def prog_tag(fd: int) -> str:
    return bytes(prog_info(fd).tag).hex()


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    opts = BpfLinkCreateOpts(sz=sizeof(BpfLinkCreateOpts), flags=flags)
    return check(bpf_link_create(prog_fd, target_fd, attach_type, byref(opts)), "create bpf_link")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Atomically replace the program behind a link (BPF_LINK_UPDATE)."""
    opts = BpfLinkUpdateOpts(sz=sizeof(BpfLinkUpdateOpts))
    check(bpf_link_update(link_fd, prog_fd, byref(opts)), "update bpf_link")


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Ids of the programs attached at (target, attach type), in run order."""
    ids = (c_uint32 * max_progs)()
    opts = BpfProgQueryOpts(sz=sizeof(BpfProgQueryOpts), prog_ids=ids, prog_cnt=max_progs)
    check(bpf_prog_query_opts(target_fd, attach_type, byref(opts)), "query attached programs")
    return list(ids[: opts.prog_cnt])


def map_lookup_batch(fd: int, key_size: int, value_size: int, chunk: int) -> tuple[bytes, bytes, int]:
    """Every entry of a map through BPF_MAP_LOOKUP_BATCH, `chunk` entries per call: (keys, values, count),
    keys and values packed back to back. Map types without batch operations (LPM tries; kernels before
    5.6) raise BpfError with EINVAL, EOPNOTSUPP or ENOTSUPP on the first call."""
    token = max(key_size, 8)    # hash maps page by a u32 bucket index, array-like maps by the last key
    prev, nxt = ctypes.create_string_buffer(token), ctypes.create_string_buffer(token)
    keys, values = [], []
    total, first = 0, True
    kbuf, vbuf = ctypes.create_string_buffer(chunk * key_size), ctypes.create_string_buffer(chunk * value_size)
    opts = BpfMapBatchOpts(sz=sizeof(BpfMapBatchOpts))
    while True:
        count = c_uint32(chunk)
        ret = bpf_map_lookup_batch(fd, None if first else prev, nxt, kbuf, vbuf, byref(count), byref(opts))
        err = 0 if ret >= 0 else (-ret if ret != -1 else ctypes.get_errno() or errno.EINVAL)
        n = count.value if err in (0, errno.ENOENT) else 0
        if err == errno.ENOSPC and chunk < 1 << 20:
            # one hash bucket holds more entries than fit: retry the same position with room for more
            chunk *= 2
            kbuf, vbuf = ctypes.create_string_buffer(chunk * key_size), ctypes.create_string_buffer(chunk * value_size)
            continue
        if err not in (0, errno.ENOENT):
            raise BpfError(err, f"batch lookup: {os.strerror(err)}")
        if n:
            keys.append(kbuf.raw[:n * key_size])
            values.append(vbuf.raw[:n * value_size])
            total += n
        if err == errno.ENOENT:     # the end of the map (this call may still have returned entries)
            return b"".join(keys), b"".join(values), total
        ctypes.memmove(prev, nxt, token)
        first = False


def test_run(prog_fd: int, data: bytes, ctx: bytes | None = None, repeat: int = 1,
             out_size: int | None = None) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: (return value, output packet, mean duration in ns)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(out_size or len(data) + 256)
    opts = BpfTestRunOpts(sz=sizeof(BpfTestRunOpts), data_in=ctypes.cast(data_in, c_void_p),
                          data_size_in=len(data), data_out=ctypes.cast(out, c_void_p),
                          data_size_out=len(out), repeat=repeat)
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, c_void_p)
        opts.ctx_size_in = len(ctx)
    check(bpf_prog_test_run_opts(prog_fd, byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, out.raw[: opts.data_size_out], opts.duration
