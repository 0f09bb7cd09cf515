# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""nth_address: an address of a CIDR by offset (the connectivity suite's test pods)."""

from __future__ import annotations

import ipaddress

from ansible.errors import AnsibleFilterError

DOCUMENTATION = r"""
name: nth_address
short_description: The n-th address of an IPv4 CIDR
description:
  - The address C(n) after the network address of the CIDR; fails, naming the values, when it is outside.
options:
  _input:
    description: An IPv4 CIDR.
    type: str
    required: true
  n:
    description: Offset from the network address.
    type: int
    required: true
"""

EXAMPLES = r"""
- name: The test pod address of a node
  ansible.builtin.debug:
    msg: "{{ '10.244.1.0/24' | sluice.network.nth_address(10) }}"   # 10.244.1.10
"""

RETURN = r"""
_value:
  description: The address.
  type: str
"""


def nth_address(cidr, n):
    try:
        network = ipaddress.IPv4Network(str(cidr), strict=False)
    except ValueError as e:
        raise AnsibleFilterError(f"nth_address: {cidr!r} is not an IPv4 CIDR ({e})") from None
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < network.num_addresses:
        raise AnsibleFilterError(f"nth_address: {n!r} is not an offset inside {network}")
    return str(network.network_address + n)


class FilterModule:
    def filters(self):
        return {"nth_address": nth_address}
