"""Sluice's CNI plugin: a small C client (cni/sluice.c at the top of the repository) of the agent,
which does the work (ops.py) and checks the requests (spec.py), as cilium-cni talks to cilium-agent.
"""
