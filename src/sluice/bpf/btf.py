"""Reading struct layouts and enums out of BTF (an object's or the kernel's).

The datapath's C headers are the only definition of map layouts and of the
hook/outcome enums; Python reads enums from here at run time and tests compare
its ctypes mirrors and the few constants it keeps (sluice.maps) with the
structs and enums found here. bpf/lib/maps.h puts every such enum into each
object's BTF."""

from __future__ import annotations

import ctypes
import errno
import os
from ctypes import Structure, c_int32, c_uint32

from . import libbpf as lb

KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_TYPEDEF, KIND_ENUM64 = 4, 5, 6, 8, 19


class _BtfType(Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class _BtfMember(Structure):
    _fields_ = [("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32)]


class _BtfEnum(Structure):
    _fields_ = [("name_off", c_uint32), ("val", c_int32)]


class Btf:
    def __init__(self, path: str):
        self._btf = lb.btf__parse(path.encode(), None)
        if not self._btf:
            err = ctypes.get_errno() or errno.EINVAL
            raise lb.BpfError(err, f"parse BTF of {path}: {os.strerror(err)}")
        self._by_name: dict[tuple[int, str], int] = {}
        for type_id in range(1, lb.btf__type_cnt(self._btf)):
            t = self._type(type_id)
            name = self._name(t.name_off)
            if name:
                self._by_name.setdefault((self._kind(t), name), type_id)

    def close(self):
        if self._btf:
            lb.btf__free(self._btf)
            self._btf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _type(self, type_id: int) -> _BtfType:
        return _BtfType.from_address(lb.btf__type_by_id(self._btf, type_id))

    def _name(self, off: int) -> str:
        return (lb.btf__name_by_offset(self._btf, off) or b"").decode()

    @staticmethod
    def _kind(t: _BtfType) -> int:
        return (t.info >> 24) & 0x1F

    def _find(self, kind: int, name: str) -> int:
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise KeyError(f"BTF has no {'enum' if kind == KIND_ENUM else 'struct'} {name}") from None

    def struct_layout(self, name: str) -> tuple[int, dict[str, tuple[int, int]]]:
        """(size, {member: (byte offset, byte size)}) of `struct name`. The members of an anonymous union
        or struct member are listed as members of `name`, as C names them."""
        type_id = self._find(KIND_STRUCT, name)
        return self._type(type_id).size_or_type, self._members(type_id, 0)

    def _members(self, type_id: int, base: int) -> dict[str, tuple[int, int]]:
        t = self._type(type_id)
        addr = lb.btf__type_by_id(self._btf, type_id) + ctypes.sizeof(_BtfType)
        members = {}
        for i in range(t.info & 0xFFFF):
            m = _BtfMember.from_address(addr + i * ctypes.sizeof(_BtfMember))
            offset = base + (m.offset & 0xFFFFFF if t.info >> 31 else m.offset) // 8
            name = self._name(m.name_off)
            if not name and self._kind(self._type(m.type)) in (KIND_STRUCT, KIND_UNION):
                members.update(self._members(m.type, offset))
            else:
                members[name] = (offset, lb.btf__resolve_size(self._btf, m.type))
        return members

    def enum(self, name: str) -> dict[str, int]:
        type_id = self._find(KIND_ENUM, name)
        t = self._type(type_id)
        base = lb.btf__type_by_id(self._btf, type_id) + ctypes.sizeof(_BtfType)
        return {
            self._name(e.name_off): e.val
            for e in (_BtfEnum.from_address(base + i * ctypes.sizeof(_BtfEnum)) for i in range(t.info & 0xFFFF))
        }
