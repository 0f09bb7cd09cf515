"""The standard Ansible module unit-test pattern: module args in, AnsibleExitJson/AnsibleFailJson out."""

from __future__ import annotations

from unittest import mock

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args


class AnsibleExitJson(Exception):
    """exit_json was called; .result holds its arguments."""

    def __init__(self, result):
        super().__init__(result)
        self.result = result


class AnsibleFailJson(Exception):
    """fail_json was called; .result holds its arguments."""

    def __init__(self, result):
        super().__init__(result)
        self.result = result


def _exit_json(self, **kwargs):  # pylint: disable=unused-argument
    kwargs.setdefault("changed", False)
    if getattr(self, "_sluice_warnings", None) is not None:
        kwargs["warnings"] = list(self._sluice_warnings)
    raise AnsibleExitJson(kwargs)


def _fail_json(self, msg, **kwargs):  # pylint: disable=unused-argument
    kwargs["failed"] = True
    kwargs["msg"] = msg
    raise AnsibleFailJson(kwargs)


def _warn(self, warning):
    if getattr(self, "_sluice_warnings", None) is None:
        self._sluice_warnings = []
    self._sluice_warnings.append(warning)


def run_module(module, args, check_mode=False, diff=False):
    """Run module.main() with `args`; the exit_json result (raises AnsibleFailJson on failure)."""
    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    with patch_module_args(args), \
            mock.patch.multiple(basic.AnsibleModule, exit_json=_exit_json, fail_json=_fail_json, warn=_warn):
        with pytest.raises(AnsibleExitJson) as exc:
            module.main()
    return exc.value.result


def fail_module(module, args, check_mode=False, diff=False):
    """Run module.main() expecting fail_json; its result."""
    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    with patch_module_args(args), \
            mock.patch.multiple(basic.AnsibleModule, exit_json=_exit_json, fail_json=_fail_json, warn=_warn):
        with pytest.raises(AnsibleFailJson) as exc:
            module.main()
    return exc.value.result
