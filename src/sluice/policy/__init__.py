"""Kubernetes NetworkPolicy, resolved for the datapath (pure Python: no BPF, no I/O but the identity file).

    model    what the agent keeps of Pods, Namespaces and NetworkPolicies (the reflectors' transforms);
             PolicyError for a policy the API server would refuse, with its fail-closed reading
    resolve  identities (pods by namespace and labels, ipBlock prefixes), the ipcache, the CIDR map,
             per-endpoint isolation and allow entries (identity, protocol, port prefix), and what
             `sluice policy POD` explains
"""
