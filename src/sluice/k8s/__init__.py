"""The Kubernetes API as a source of desired state.

    client     Kubeconfig, ApiClient: paged LIST and WATCH over HTTPS (standard library, PyYAML)
    reflector  Reflector: one collection kept in a store by LIST then WATCH (resourceVersion,
               bookmarks, 410 Gone -> list again, backoff)
    services   what the agent keeps of Services, EndpointSlices and Nodes, and the frontends a
               Service gives on one node (ClusterIP, NodePort, external IPs; traffic policies)
    source     KubernetesSource: the three watches, the frontends recomputed per changed Service,
               and the cache file the agent serves from while the API server is unreachable
"""
