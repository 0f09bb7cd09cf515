"""The lab's Kubernetes cluster (lab.py up --kubernetes): upstream programs built by lab/k8s/build.sh.

- A control plane in its own network namespace on the underlay (`<lab>-cp`, the underlay's .2): etcd, kube-apiserver,
  kube-controller-manager (allocating node pod CIDRs), kube-scheduler. No kube-proxy anywhere.
- Every node runs containerd (CRI, cgroupfs) and kubelet inside the node's namespaces and cgroups, with the images
  of lab/images.py imported: nothing is pulled.
- Certificates and kubeconfigs are made here with openssl; the admin's kubeconfig is `<state dir>/kube/admin.conf`.
- Node objects are registered before the kubelets start, with the pod CIDRs the inventory gives each node
  (`sluice_node_index` N -> the Nth /24 of the cluster CIDR, as sluice.network.cluster_plan derives them); the
  controller-manager allocates from the same cluster CIDR to any node registered without one. Sluice is not
  installed here: playbooks/site.yml does that, as on any cluster, and refuses a node whose pod CIDR disagrees.

Standard library only, like lab.py.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time

import images

CLUSTER_CIDR = "10.244.0.0/16"  # inventory/lab/group_vars: sluice_cluster_cidr
NODE_CIDR_PREFIX = 24           # sluice_node_cidr_prefix
SERVICE_CIDR = "10.100.0.0/16"  # apart from the inventory's static VIPs (10.96-10.97)
DNS_SERVICE_IP = "10.100.0.10"
CLUSTER_DOMAIN = "cluster.local"
APISERVER_PORT = 6443
# What kubelet sets on the host kernel it runs on; the lab puts the host's values back when the last lab goes.
KUBELET_SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "vm/panic_on_oom",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
# The agent's read access to the API, as the collection ships it for every cluster.
AGENT_RBAC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "roles", "agent", "files", "kubernetes-rbac.yml")
REFERENCE_PLUGIN_DIR = "/usr/lib/cni"
REFERENCE_PLUGINS = ("loopback", "portmap")


def node_pod_cidr(index: int) -> str:
    cluster = ipaddress.ip_network(CLUSTER_CIDR)
    return str(ipaddress.ip_network((int(cluster.network_address) + index * (1 << (32 - NODE_CIDR_PREFIX)),
                                     NODE_CIDR_PREFIX)))


class Cluster:
    """The Kubernetes side of one lab; `lab` is its lab.Lab."""

    def __init__(self, lab):
        self.lab = lab
        self.dir = os.path.join(lab.state_dir, "kube")
        self.pki = os.path.join(self.dir, "pki")
        self.admin_conf = os.path.join(self.dir, "admin.conf")
        self.bin = images.k8s_bin_dir()

    @property
    def apiserver_ip(self) -> str:
        return self.lab.cp_ip

    @property
    def server(self) -> str:
        return f"https://{self.apiserver_ip}:{APISERVER_PORT}"

    # --- up ----------------------------------------------------------------------------

    def up(self, nodes: int) -> None:
        for program in ("kube-apiserver", "kubelet", "kubectl", "pause", "agnhost"):
            if not os.access(os.path.join(self.bin, program), os.X_OK):
                raise SystemExit(f"lab: {self.bin}/{program} is missing: run `make kubernetes` (lab/k8s/build.sh)")
        os.makedirs(self.pki, mode=0o700, exist_ok=True)
        self.make_pki(nodes)
        self.start_control_plane()
        archives = images.build_all()
        self.register_nodes(nodes)
        for i in range(1, nodes + 1):
            self.start_node(i, archives)
        self.wait_nodes_registered(nodes)
        self.route_pod_cidrs()
        self.apply_addons()

    # --- certificates and kubeconfigs ----------------------------------------------------

    def openssl(self, *argv: str) -> None:
        run_checked(["openssl", *argv], cwd=self.pki)

    def make_pki(self, nodes: int) -> None:
        if not os.path.exists(os.path.join(self.pki, "ca.crt")):
            self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                         "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/CN=sluice-lab-ca")
            # Service account tokens are signed with a key of their own.
            self.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key")
            self.openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        service_ip = str(ipaddress.ip_network(SERVICE_CIDR).network_address + 1)
        self.certificate("apiserver", "/CN=kube-apiserver", "serverAuth",
                         [f"IP:{self.apiserver_ip}", f"IP:{service_ip}", "IP:127.0.0.1", "DNS:kubernetes",
                          "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                          f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}"])
        self.certificate("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
                         "clientAuth")
        clients = {"admin": "/O=system:masters/CN=kubernetes-admin",
                   "controller-manager": "/CN=system:kube-controller-manager",
                   "scheduler": "/CN=system:kube-scheduler",
                   "sluice-agent": "/CN=sluice-agent",     # the RBAC of roles/agent/files/kubernetes-rbac.yml
                   **{f"node{i}": f"/O=system:nodes/CN=system:node:node{i}" for i in range(1, nodes + 1)}}
        for name, subject in clients.items():
            self.certificate(name, subject, "clientAuth")
            self.kubeconfig(name)

    def certificate(self, name: str, subject: str, usage: str, alt_names: list[str] | None = None) -> None:
        if os.path.exists(os.path.join(self.pki, f"{name}.crt")):
            return
        ext = os.path.join(self.pki, f"{name}.ext")
        with open(ext, "w") as f:
            f.write("keyUsage = critical, digitalSignature, keyEncipherment\n"
                    f"extendedKeyUsage = {usage}\n"
                    + (f"subjectAltName = {', '.join(alt_names)}\n" if alt_names else ""))
        self.openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                     "-days", "3650", "-extfile", ext, "-out", f"{name}.crt")

    def kubeconfig(self, name: str) -> str:
        """A kubeconfig for `name`'s certificate, with everything inline (nodes read it from their own view)."""
        path = os.path.join(self.dir, f"{name}.conf")

        def b64(file: str) -> str:
            with open(os.path.join(self.pki, file), "rb") as f:
                return base64.b64encode(f.read()).decode()

        text = (f"apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {self.server}\n"
                f"    certificate-authority-data: {b64('ca.crt')}\n"
                f"users:\n- name: {name}\n  user:\n    client-certificate-data: {b64(name + '.crt')}\n"
                f"    client-key-data: {b64(name + '.key')}\n"
                f"contexts:\n- name: {name}@lab\n  context: {{cluster: lab, user: {name}}}\n"
                f"current-context: {name}@lab\n")
        write_file(path, text, 0o600)
        return path

    # --- control plane -------------------------------------------------------------------

    def start_control_plane(self) -> None:
        p = self.pki
        etcd_dir = os.path.join(self.dir, "etcd")
        self.lab.start_daemon("cp", "etcd", [
            "etcd", "--name", "lab", f"--data-dir={etcd_dir}",
            "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=lab=http://127.0.0.1:2380", "--listen-metrics-urls=http://127.0.0.1:2381"])
        self.lab.start_daemon("cp", "kube-apiserver", [
            f"{self.bin}/kube-apiserver", f"--advertise-address={self.apiserver_ip}",
            f"--secure-port={APISERVER_PORT}", "--etcd-servers=http://127.0.0.1:2379",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--client-ca-file={p}/ca.crt", f"--tls-cert-file={p}/apiserver.crt",
            f"--tls-private-key-file={p}/apiserver.key",
            f"--kubelet-client-certificate={p}/apiserver-kubelet-client.crt",
            f"--kubelet-client-key={p}/apiserver-kubelet-client.key",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            f"--service-account-key-file={p}/sa.pub", f"--service-account-signing-key-file={p}/sa.key",
            "--profiling=false", "--v=1"])
        # The controllers read what the API server bootstraps (RBAC roles, kube-system's config maps).
        self.wait("the API server", lambda: self.kubectl("get", "--raw=/readyz", check=False).returncode == 0, 90)
        self.lab.start_daemon("cp", "kube-controller-manager", [
            f"{self.bin}/kube-controller-manager", f"--kubeconfig={self.dir}/controller-manager.conf",
            f"--authentication-kubeconfig={self.dir}/controller-manager.conf",
            f"--authorization-kubeconfig={self.dir}/controller-manager.conf",
            "--bind-address=127.0.0.1", "--allocate-node-cidrs=true", f"--cluster-cidr={CLUSTER_CIDR}",
            f"--node-cidr-mask-size={NODE_CIDR_PREFIX}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cluster-signing-cert-file={p}/ca.crt", f"--cluster-signing-key-file={p}/ca.key",
            f"--root-ca-file={p}/ca.crt", f"--service-account-private-key-file={p}/sa.key",
            "--use-service-account-credentials=true", "--controllers=*,bootstrapsigner,tokencleaner",
            "--profiling=false", "--v=1"])
        self.lab.start_daemon("cp", "kube-scheduler", [
            f"{self.bin}/kube-scheduler", f"--kubeconfig={self.dir}/scheduler.conf",
            f"--authentication-kubeconfig={self.dir}/scheduler.conf",
            f"--authorization-kubeconfig={self.dir}/scheduler.conf",
            "--bind-address=127.0.0.1", "--profiling=false", "--v=1"])

    def kubectl(self, *argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        cmd = [f"{self.bin}/kubectl", f"--kubeconfig={self.admin_conf}", *argv]
        result = subprocess.run(cmd, input=stdin, text=True, capture_output=True, check=False, timeout=120)
        if check and result.returncode != 0:
            raise SystemExit(f"lab: kubectl {' '.join(argv)} failed: {result.stderr.strip()}")
        return result

    def apply(self, manifest: dict | list) -> None:
        items = manifest if isinstance(manifest, list) else [manifest]
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    # --- nodes ---------------------------------------------------------------------------

    def register_nodes(self, nodes: int) -> None:
        """Node objects with the inventory's pod CIDRs, before any kubelet registers on its own."""
        missing = [i for i in range(1, nodes + 1) if self.kubectl("get", "node", f"node{i}", check=False).returncode]
        if missing:
            self.apply([{"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": f"node{i}", "labels": {"kubernetes.io/hostname": f"node{i}"}},
                         "spec": {"podCIDR": node_pod_cidr(i), "podCIDRs": [node_pod_cidr(i)]}} for i in missing])

    def start_node(self, i: int, archives: dict[str, str]) -> None:
        node = f"node{i}"
        conf = os.path.join(self.lab.node_dir(i), "root")  # the node's own /etc, /var/lib...
        write_file(conf + "/etc/containerd/config.toml", containerd_config())
        write_file(conf + "/etc/kubernetes/kubelet.conf", read(os.path.join(self.dir, f"{node}.conf")), 0o600)
        write_file(conf + "/etc/kubernetes/pki/ca.crt", read(os.path.join(self.pki, "ca.crt")))
        write_file(conf + "/etc/kubernetes/kubelet-config.yaml", kubelet_config())
        # The reference CNI plugins a node's Kubernetes packages install (kubernetes-cni), from Debian's
        # containernetworking-plugins: containerd's CRI brings every sandbox's lo up with `loopback`, and the
        # lab's inventory chains `portmap` after Sluice for hostPort.
        for plugin in REFERENCE_PLUGINS:
            shutil.copy2(os.path.join(REFERENCE_PLUGIN_DIR, plugin), conf + "/opt/cni/bin/" + plugin)
        self.lab.start_daemon(node, "containerd", ["containerd", "--config", "/etc/containerd/config.toml"])
        sock = "/run/containerd/containerd.sock"
        self.wait(f"{node}'s containerd",
                  lambda: self.lab.node_run(i, "ctr", "--address", sock, "version", check=False).returncode == 0, 30)
        present = self.lab.node_run(i, "ctr", "--address", sock, "-n", "k8s.io", "images", "list", "-q").stdout
        for name, archive in sorted(archives.items()):
            if name not in present.split():
                self.lab.node_run(i, "ctr", "--address", sock, "-n", "k8s.io", "images", "import", archive)
        self.lab.start_daemon(node, "kubelet", [
            f"{self.bin}/kubelet", "--config=/etc/kubernetes/kubelet-config.yaml",
            "--kubeconfig=/etc/kubernetes/kubelet.conf", f"--hostname-override={node}",
            f"--node-ip={self.lab.node_ip(i)}", "--v=1"])

    def nodes(self) -> dict[str, dict]:
        """The cluster's Node objects by name."""
        items = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        return {n["metadata"]["name"]: n for n in items}

    def wait_nodes_registered(self, nodes: int) -> None:
        def registered() -> bool:
            have = {name for name, n in self.nodes().items()
                    if n.get("status", {}).get("nodeInfo", {}).get("kubeletVersion")}
            return all(f"node{i}" in have for i in range(1, nodes + 1))
        self.wait("every kubelet to register", registered, 120)

    def route_pod_cidrs(self) -> None:
        """The underlay router's part (the control plane's namespace): each node's pod CIDR via that node, so the
        API server reaches pods (exec, proxy, webhooks) and pods reach it without NAT."""
        for node in self.nodes().values():
            address = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
            for cidr in node["spec"].get("podCIDRs", []):
                self.lab.ns_run(self.lab.cp_ns, "ip", "route", "replace", cidr, "via", address)

    def pods(self, namespace: str, selector: str) -> list[dict]:
        """Running pods matching `selector`: name, node, ip."""
        items = json.loads(self.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]
        return [{"name": p["metadata"]["name"], "node": p["spec"].get("nodeName"), "ip": p["status"].get("podIP")}
                for p in items if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]

    def exec_in(self, namespace: str, pod: str, *argv: str) -> subprocess.CompletedProcess:
        return self.kubectl("exec", "-n", namespace, pod, "--", *argv, check=False)

    # --- add-ons -------------------------------------------------------------------------

    def apply_addons(self) -> None:
        self.kubectl("apply", "-f", AGENT_RBAC)
        self.apply(coredns_manifests(self.server))

    # --- helpers -------------------------------------------------------------------------

    @staticmethod
    def wait(what: str, ready, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if time.monotonic() > deadline:
                raise SystemExit(f"lab: timed out after {seconds:.0f} s waiting for {what}")
            time.sleep(0.5)


def containerd_config() -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""# Generated by lab/kube.py.
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[{cri}]
  sandbox_image = "{images.PAUSE}"
  # No CAP_SYS_RESOURCE here: runc cannot lower a child's oom_score_adj below its own.
  restrict_oom_score_adj = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "/opt/cni/bin"
  conf_dir = "/etc/cni/net.d"
"""


def kubelet_config() -> str:
    return json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": "/etc/kubernetes/pki/ca.crt"}},
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs", "failCgroupV1": False,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "clusterDomain": CLUSTER_DOMAIN, "clusterDNS": [DNS_SERVICE_IP],
        # No upstream resolver: pods must not send DNS to this machine's network.
        "resolvConf": "",
        "failSwapOn": False, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1",
        # The nodes share one disk with the host and each other: never evict for its fill, never collect images
        # (none could be pulled again).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
    }, indent=2) + "\n"


def coredns_manifests(server: str) -> list[dict]:
    """CoreDNS as the cluster's DNS (kube-dns Service at DNS_SERVICE_IP). It reaches the API server at its
    underlay address: until Sluice serves the `kubernetes` Service, its ClusterIP goes nowhere."""
    labels = {"k8s-app": "kube-dns"}
    corefile = (f".:53 {{\n    errors\n    health :8080\n    ready :8181\n"
                f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
                "        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n        ttl 30\n    }\n"
                "    cache 30\n    loop\n    reload\n    loadbalance\n}\n")
    host, port = server.removeprefix("https://").rsplit(":", 1)
    meta = {"name": "coredns", "namespace": "kube-system"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": labels},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "serviceAccountName": "coredns", "dnsPolicy": "Default",
                      "priorityClassName": "system-cluster-critical",
                      "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                     "whenUnsatisfiable": "ScheduleAnyway",
                                                     "labelSelector": {"matchLabels": labels}}],
                      "containers": [{
                          "name": "coredns", "image": images.COREDNS, "imagePullPolicy": "Never",
                          "args": ["-conf", "/etc/coredns/Corefile"],
                          "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": host},
                                  {"name": "KUBERNETES_SERVICE_PORT", "value": port}],
                          "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                    {"name": "metrics", "containerPort": 9153, "protocol": "TCP"}],
                          "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                          "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                            "initialDelaySeconds": 30},
                          "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                                              "readOnlyRootFilesystem": True}}],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {**labels, "kubernetes.io/name": "CoreDNS"}},
         "spec": {"clusterIP": DNS_SERVICE_IP, "selector": labels,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                            {"name": "metrics", "port": 9153, "protocol": "TCP"}]}},
    ]


# --- host sysctls kubelet changes ---------------------------------------------------------

def save_host_sysctls(saved: str) -> None:
    """Record the host's values once, before the first kubelet of any lab changes them."""
    if not os.path.exists(saved):
        write_file(saved, json.dumps({key: read(f"/proc/sys/{key}").strip() for key in KUBELET_SYSCTLS}))


def restore_host_sysctls(saved: str) -> None:
    if os.path.exists(saved):
        for key, value in json.loads(read(saved)).items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)
        os.unlink(saved)


# --- small helpers --------------------------------------------------------------------------

def run_checked(argv: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, check=False, text=True, capture_output=True, **kw)
    if result.returncode != 0:
        raise SystemExit(f"lab: `{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_file(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.chmod(path + ".tmp", mode)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit("lab/kube.py is used by lab/lab.py: lab.py up --kubernetes")
