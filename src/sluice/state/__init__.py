"""The node's desired state, and reconciling the datapath to it.

    schema     DesiredState, the one form of desired state, and the validation of a state
               document into it (StateError names the bad value)
    snapshot   Snapshot: what the live maps hold, in the terms of a DesiredState
    plan       Plan: what applying a state changes (add / change / remove), and its text
    reconcile  Reconciler: plan and full apply against a Snapshot; update() for the agent
    delta      the agent's path: only what differs from the state applied last
    confirm    commit-confirm: a change of the state file is reverted unless confirmed in time

The Ansible roles write the state file (JSON, default /etc/sluice/state.json); the agent
reconciles the datapath to it; `sluice apply --plan FILE` shows the plan without applying.

A second source of desired state (the Kubernetes API: Services and their EndpointSlices,
the other nodes' pod CIDRs) plugs in at schema.DesiredState: it builds the same document
and passes it to DesiredState.parse, so its values are validated as the file's are. The
Reconciler takes a DesiredState and does not know where it came from.
"""

from .plan import Plan
from .reconcile import ROUTE_PROTO, Reconciler
from .schema import (DEFAULT_FAILSAFE, DEFAULT_STATE_FILE, DEFAULT_VXLAN_DEVICE, DEFAULT_VXLAN_PORT, PROTOCOLS, ROUTING_MODES, Backend,
                     DesiredState, Frontend, StateError)
from .snapshot import Snapshot

__all__ = ["DEFAULT_FAILSAFE", "DEFAULT_STATE_FILE", "DEFAULT_VXLAN_DEVICE", "DEFAULT_VXLAN_PORT", "PROTOCOLS", "ROUTE_PROTO", "ROUTING_MODES", "Backend",
           "DesiredState", "Frontend", "Plan", "Reconciler", "Snapshot", "StateError"]
