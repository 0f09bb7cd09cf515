# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The cluster's Node objects, read on the controller with a kubeconfig, so that the plan can check the pod
CIDRs Kubernetes gave the nodes against the ones Sluice routes before any node is touched."""

from __future__ import annotations

DOCUMENTATION = r"""
name: kubernetes_nodes
short_description: The Node objects of a Kubernetes cluster (names, pod CIDRs, addresses)
description:
  - Reads C(/api/v1/nodes) from the API server named by a kubeconfig's current context, on the controller.
  - Use it with C(query), which returns the list of nodes.
  - Client certificates and bearer tokens, inline or in files, are supported; the server's certificate is
    verified against the kubeconfig's certificate authority.
  - Fails, naming the kubeconfig and the server, when the file cannot be read or the API server does not answer.
options:
  kubeconfig:
    description: Path of the kubeconfig on the controller.
    type: path
    required: true
  timeout:
    description: Seconds to wait for the API server.
    type: float
    default: 10
"""

EXAMPLES = r"""
- name: Pod CIDRs the cluster gave its nodes
  ansible.builtin.debug:
    msg: "{{ query('sluice.network.kubernetes_nodes', kubeconfig='/etc/kubernetes/admin.conf') }}"
"""

RETURN = r"""
_raw:
  description: One entry per Node.
  type: list
  elements: dict
  contains:
    name:
      description: The Node's name.
      type: str
    pod_cidrs:
      description: C(spec.podCIDRs) (empty while the controller-manager has not allocated one).
      type: list
      elements: str
    addresses:
      description: C(status.addresses) as a mapping of address type to address.
      type: dict
"""

import base64
import json
import os
import tempfile
import urllib.error

import yaml
from ansible.errors import AnsibleLookupError
from ansible.module_utils.urls import ConnectionError as UrlConnectionError
from ansible.module_utils.urls import open_url
from ansible.plugins.lookup import LookupBase


def _entry(config, kind, name):
    for item in config.get(kind + "s") or []:
        if item.get("name") == name:
            return item.get(kind) or {}
    raise AnsibleLookupError(f"kubeconfig: no {kind} named {name!r}")


def _material(section, key, base_dir, tmp):
    """A file path for `key` of a kubeconfig section: `key` itself, or `key-data` written to a private file."""
    data = section.get(key + "-data")
    if data:
        path = os.path.join(tmp, key)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path
    path = section.get(key)
    return os.path.join(base_dir, path) if path else None


def read_nodes(kubeconfig, timeout=10.0):
    try:
        with open(kubeconfig) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AnsibleLookupError(f"kubeconfig {kubeconfig}: {e}") from None
    context = _entry(config, "context", config.get("current-context"))
    cluster = _entry(config, "cluster", context.get("cluster"))
    user = _entry(config, "user", context.get("user"))
    server = str(cluster.get("server", "")).rstrip("/")
    if not server.startswith("https://"):
        raise AnsibleLookupError(f"kubeconfig {kubeconfig}: server {server!r} is not an https:// URL")
    base_dir = os.path.dirname(os.path.abspath(kubeconfig))
    headers = {"Accept": "application/json"}
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            response = open_url(server + "/api/v1/nodes", headers=headers, timeout=timeout, validate_certs=True,
                                ca_path=_material(cluster, "certificate-authority", base_dir, tmp),
                                client_cert=_material(user, "client-certificate", base_dir, tmp),
                                client_key=_material(user, "client-key", base_dir, tmp))
            items = json.load(response)["items"]
        except urllib.error.HTTPError as e:
            raise AnsibleLookupError(f"{server} (kubeconfig {kubeconfig}): listing nodes: {e.code} {e.reason}") from None
        except (urllib.error.URLError, UrlConnectionError, OSError, ValueError) as e:
            raise AnsibleLookupError(f"{server} (kubeconfig {kubeconfig}) does not answer: {e}") from None
    return [{"name": node["metadata"]["name"],
             "pod_cidrs": node.get("spec", {}).get("podCIDRs") or [],
             "addresses": {a["type"]: a["address"] for a in node.get("status", {}).get("addresses") or []}}
            for node in items]


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        return read_nodes(self.get_option("kubeconfig"), self.get_option("timeout"))
