# -*- coding: utf-8 -*-
# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    """What the sluice.network modules that work with the datapath share: author, full check mode, options."""

    DOCUMENTATION = r"""
author:
  - Sluice developers (@sluice-network)
attributes:
  check_mode:
    support: full
options:
  pin_root:
    description:
      - Directory on the BPF filesystem under which the Sluice datapath pins its programs, maps and links.
    type: path
    default: /sys/fs/bpf/sluice
  obj_dir:
    description:
      - Directory holding the compiled datapath objects (C(tc_pod.o), C(tc_nic.o), C(xdp_nic.o), C(sock_lb.o), C(sockmap.o)).
    type: path
    default: /opt/sluice/bpf
  tc_mode:
    description:
      - How tc programs are attached. V(tcx) uses tcx bpf_links (an upgrade swaps them atomically), V(legacy) a
        clsact qdisc with a cls_bpf filter (replaced atomically), V(auto) tcx where the kernel has it, else legacy.
      - Use the same mode as the agent (C(agent_tc_mode)); the roles take it from C(sluice_tc_mode).
    type: str
    choices: [auto, tcx, legacy]
    default: auto
requirements:
  - sluice (the Sluice node package, installed by the sluice.network.node role)
  - Linux with BPF, run as root
"""

    # The inventory the cluster-wide planning filters (cluster_plan, lockout_check) read.
    CLUSTER = r"""
options:
  hostvars:
    description: C(hostvars).
    type: dict
    required: true
  cluster_cidr:
    description: The cluster CIDR all pod CIDRs come from.
    type: str
    required: true
"""
