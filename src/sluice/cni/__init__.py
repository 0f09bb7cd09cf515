"""Sluice's CNI plugin: a thin stdlib-only client (plugin.py) of the agent, which
does the work (ops.py), as cilium-cni talks to cilium-agent.

Nothing in this package's __init__, errors.py, spec.py or plugin.py, nor
sluice.agent_protocol, may import beyond the standard library: they run once per
pod, under `python -I -S`.
"""
