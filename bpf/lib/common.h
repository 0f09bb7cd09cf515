/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types and constants every Sluice program needs. vmlinux.h is generated from
 * the running kernel's BTF at build time (CO-RE); uapi #defines are not in BTF,
 * so the few we use are spelled out here. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ETH_ALEN        6
#define ETH_HLEN        14
#define ETH_P_IP        0x0800
#define AF_INET         2
#define IP_MF           0x2000
#define IP_OFFSET       0x1fff
#define ICMP_DEST_UNREACH  3
#define ICMP_PORT_UNREACH  3

/* tc verdicts (linux/pkt_cls.h). SL_TC_PASS is TC_ACT_UNSPEC == TCX_NEXT: under
 * tcx it lets later programs on the hook run, under cls_bpf direct-action it
 * continues into the stack. */
#define TC_ACT_OK        0
#define TC_ACT_SHOT      2
#define TC_ACT_REDIRECT  7
#define SL_TC_PASS       (-1)

#define SL_DEFAULT_TTL   64

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* The datapath version (`make SL_DATAPATH_VERSION=N`). An upgrade must swap
 * programs whose tag (the kernel's hash of their instructions) changed, so the
 * version is stamped into every program's code: sl_count(), which every program
 * calls, loads it into a register. It is also a read-only global that libbpf
 * binds to each program: `bpftool prog show` lists it under "metadata". */
#ifndef SL_DATAPATH_VERSION
#define SL_DATAPATH_VERSION 1
#endif
#define SL_DATAPATH_STAMP() asm volatile("" : : "r"(SL_DATAPATH_VERSION))
const volatile __u32 bpf_metadata_sluice_datapath_version SEC(".rodata") = SL_DATAPATH_VERSION;
