# -*- coding: utf-8 -*-
# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Glue shared by the sluice.network modules: the node package import guard and common options."""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import missing_required_lib

try:
    import sluice  # noqa: F401 pylint: disable=unused-import
    from sluice.datapath import Datapath  # noqa: F401 pylint: disable=unused-import
except ImportError:
    HAS_SLUICE = False
    SLUICE_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_SLUICE = True
    SLUICE_IMPORT_ERROR = None

SLUICE_LIB = "sluice (the Sluice node package, installed by the sluice.network.node role)"

DEFAULT_PIN_ROOT = "/sys/fs/bpf/sluice"
DEFAULT_OBJ_DIR = "/opt/sluice/bpf"


def datapath_argument_spec():
    """pin_root, obj_dir and tc_mode, shared by every module that touches the datapath."""
    return dict(
        pin_root=dict(type="path", default=DEFAULT_PIN_ROOT),
        obj_dir=dict(type="path", default=DEFAULT_OBJ_DIR),
        tc_mode=dict(type="str", default="auto", choices=["auto", "tcx", "legacy"]),
    )


def ensure_sluice(module):
    """Fail with the standard message when the node package is missing."""
    if not HAS_SLUICE:
        module.fail_json(msg=missing_required_lib(SLUICE_LIB), exception=SLUICE_IMPORT_ERROR)


def datapath(module):
    """A sluice.datapath.Datapath for the module's pin_root/obj_dir."""
    return Datapath(module.params["pin_root"], module.params["obj_dir"], tc_mode=module.params["tc_mode"])
