"""Opening and loading a compiled Sluice object with libbpf."""

from __future__ import annotations

import ctypes
import errno
import os
from ctypes import byref, sizeof

from . import libbpf as lb

VERIFIER_LOG_SIZE = 1 << 22


class BpfObject:
    """One loaded ELF object. Maps declared with LIBBPF_PIN_BY_NAME are reused
    from (or pinned into) `pin_root` by libbpf itself, so every object of a node
    shares one instance of each map and reloads keep their contents. Without a
    pin root the maps are private to this object and nothing is pinned."""

    def __init__(self, path: str, pin_root: str | None = None):
        self.path = path
        self._log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
        opts = lb.BpfObjectOpenOpts(sz=sizeof(lb.BpfObjectOpenOpts))
        opts.pin_root_path = pin_root.encode() if pin_root else None
        # Log level 0 with a buffer: libbpf retries a failed load at level 1
        # into this buffer, so a rejection carries the verifier's reasons.
        opts.kernel_log_buf = ctypes.cast(self._log, ctypes.c_void_p)
        opts.kernel_log_size = VERIFIER_LOG_SIZE
        if not os.path.exists(path):
            raise lb.BpfError(errno.ENOENT, f"BPF object {path} does not exist")
        self._obj = lb.bpf_object__open_file(path.encode(), byref(opts))
        if not self._obj:
            err = ctypes.get_errno() or errno.EINVAL
            raise lb.BpfError(err, f"open BPF object {path}: {os.strerror(err)}")
        self._opts = opts  # libbpf keeps pointers into it until load
        if pin_root is None:
            # libbpf would otherwise pin LIBBPF_PIN_BY_NAME maps under /sys/fs/bpf
            for _map_name, bpf_map in self._iter(lb.bpf_object__next_map, lb.bpf_map__name):
                lb.bpf_map__set_pin_path(bpf_map, None)
        ret = lb.bpf_object__load(self._obj)
        if ret < 0:
            log = self._log.value.decode(errors="replace")
            lb.bpf_object__close(self._obj)
            self._obj = None
            raise lb.VerifierError(-ret, f"load {os.path.basename(path)}: {os.strerror(-ret)}", log)

    def _iter(self, next_fn, name_fn):
        item = next_fn(self._obj, None)
        while item:
            yield name_fn(item).decode(), item
            item = next_fn(self._obj, item)

    @property
    def programs(self) -> dict[str, int]:
        """Program name -> fd (owned by this object)."""
        return {name: lb.bpf_program__fd(p) for name, p in self._iter(lb.bpf_object__next_program, lb.bpf_program__name)}

    @property
    def maps(self) -> dict[str, int]:
        """Map name -> fd, for the maps of maps.h (not .rodata/.bss internals)."""
        return {
            name: lb.bpf_map__fd(m)
            for name, m in self._iter(lb.bpf_object__next_map, lb.bpf_map__name)
            if not lb.bpf_map__is_internal(m)
        }

    def prog_fd(self, name: str) -> int:
        try:
            return self.programs[name]
        except KeyError:
            raise lb.BpfError(errno.ENOENT, f"{self.path} has no program {name!r}") from None

    def map_fd(self, name: str) -> int:
        try:
            return self.maps[name]
        except KeyError:
            raise lb.BpfError(errno.ENOENT, f"{self.path} has no map {name!r}") from None

    def close(self) -> None:
        if self._obj:
            lb.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
