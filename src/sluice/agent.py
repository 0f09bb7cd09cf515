"""sluice-agent: keeps the node's datapath in line with its desired state.

It never detaches or empties anything when it stops or restarts: the datapath
lives in pinned bpf_links and maps, independent of this process. On start it
loads the datapath only if nothing is loaded, makes sure the node's hooks are
attached, reconciles the maps to the state file, then serves the CNI plugin and
the CLI on a root-only Unix socket and Prometheus metrics over HTTP, and
re-reconciles whenever the state file changes. A state file that does not
parse or validate is refused: the last good state stays in force and the
reason is reported in health and logs. A change of the state file armed for
commit-confirm (sluice.state.confirm) that is not confirmed in time is undone:
the agent restores the state before it and applies that. A change the state
module did not write (a hand edit) is armed by the agent itself before it is
applied, for `hand_edit_confirm_timeout` seconds.

Two kinds of reconcile (sluice.state.Reconciler):
- full: every map read back (batch lookups), planned against and repaired; the
  hooks re-attached where missing. At start, every `full_reconcile_interval`
  seconds (drift repair: whatever changed the maps behind the agent's back is
  put right, also while the state file stays the same), when the node or routing
  sections change, and on request ({"op": "reconcile", "full": true}).
- delta: a changed state file applied as its difference from the state applied
  last, each entry it changes checked first (a mismatch turns it into a full
  reconcile). One changed service among 10,000 costs milliseconds, not a read of
  every map.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import logging
import os
import signal
import socketserver
import sys
import threading
import time
from dataclasses import dataclass

from . import agent_protocol, package_fingerprint
from .cni.errors import INTERNAL_FAILURE, INVALID_ENVIRONMENT_VARIABLES, TRY_AGAIN_LATER, CniError
from .datapath import DEFAULT_OBJ_DIR, DEFAULT_ROOT, NIC_PROG, TC_MODES, Datapath, DatapathError
from .state import DEFAULT_STATE_FILE, DesiredState, Reconciler, StateError, confirm
from .state.schema import json_document, read_text
from .state.sources import DEFAULT_KUBERNETES_CACHE, ApiFrontends, merge, prune_cache, save_routes, save_service

log = logging.getLogger("sluice.agent")

CNI_STOP_WAIT_S = 10

DEFAULT_CONFIG = "/etc/sluice/agent.json"


@dataclass
class AgentConfig:
    state_file: str = DEFAULT_STATE_FILE
    pin_root: str = DEFAULT_ROOT
    obj_dir: str = DEFAULT_OBJ_DIR
    socket: str = agent_protocol.DEFAULT_SOCKET
    metrics_address: str = "127.0.0.1:9962"   # empty: no metrics endpoint
    ipam_dir: str = "/var/lib/sluice/ipam"
    mtu: int = 1500
    xdp_mode: str = "best-effort"
    tc_mode: str = "auto"                       # auto (NIC: tcx where the kernel has it; pods: cls_bpf), tcx, legacy
    cgroup: str = ""                            # empty: the cgroup2 root
    poll_interval: float = 1.0
    full_reconcile_interval: float = 60.0       # seconds between full reconciles (drift repair); 0: always full
    kubeconfig: str = ""                        # empty: no Kubernetes API (services from the state file only)
    kubernetes_cache: str = DEFAULT_KUBERNETES_CACHE
    policy_identities: str = "/var/lib/sluice/policy-identities.json"   # NetworkPolicy identity numbers
    hand_edit_confirm_timeout: float = 120.0    # seconds a hand edit waits for `sluice confirm`; 0: not armed

    @classmethod
    def load(cls, path: str | None) -> "AgentConfig":
        if not path or not os.path.exists(path):
            return cls()
        with open(path) as f:
            raw = json.load(f)
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"agent config {path}: unknown setting(s) {', '.join(sorted(unknown))}")
        if raw.get("tc_mode", "auto") not in TC_MODES:
            raise ValueError(f"agent config {path}: tc_mode {raw['tc_mode']!r} is not one of {', '.join(TC_MODES)}")
        for key, zero in (("full_reconcile_interval", "every reconcile is a full one"),
                          ("hand_edit_confirm_timeout", "hand edits are not armed")):
            seconds = raw.get(key, 0)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
                raise ValueError(f"agent config {path}: {key} {seconds!r} is not a number of seconds (0: {zero})")
        return cls(**raw)


class CniLocks:
    """CNI commands run concurrently, one at a time per attachment (container ID, ifname); GC runs alone.

    Nothing else needs them in sequence: each attachment has its own veth, node route, endpoint entry
    and tc filter, and IPAM takes its own lock. One at a time, as they ran before, concurrent ADDs and
    DELs queued behind each other's kernel waits (a veth's deletion waits ~16-20 ms for RCU callbacks)
    and each other's Python. GC reads every attachment and removes what it finds unlisted, which an
    ADD in progress would be.

    A command may leave work to run after its answer (a DEL, the veth's deletion): its attachment stays
    held, and GC and stop() wait, until that work is done too."""

    def __init__(self):
        self._cond = threading.Condition()
        self._running = 0           # commands in progress, with work left after their answer
        self._gc = False            # a GC running or waiting for the commands to end: new commands wait
        self._busy: set = set()     # attachments with a command in progress

    @contextlib.contextmanager
    def command(self, attachment: tuple[str, str] | None, subject: str = "CNI command"):
        """Around a command other than GC; `attachment` None for one about no attachment (STATUS). Yields
        after_answer(work): `work` starts on a thread of its own and the command counts as running until
        it ends (a failure is logged with `subject`)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._gc and (attachment is None or attachment not in self._busy))
            self._running += 1
            if attachment is not None:
                self._busy.add(attachment)
        holding = 1     # the command itself, and each piece of work it left

        def done() -> None:
            nonlocal holding
            with self._cond:
                holding -= 1
                if not holding:
                    self._running -= 1
                    self._busy.discard(attachment)
                    self._cond.notify_all()

        def finish(work) -> None:
            try:
                work()
            except Exception:  # noqa: BLE001 - nobody waits for it: the log says what stayed behind
                log.exception("%s: the work left after its answer failed", subject)
            finally:
                done()

        def after_answer(work) -> None:
            nonlocal holding
            with self._cond:
                holding += 1
            threading.Thread(target=finish, args=(work,), name="cni-after-answer", daemon=True).start()

        try:
            yield after_answer
        finally:
            done()

    @contextlib.contextmanager
    def gc(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._gc)
            self._gc = True
            self._cond.wait_for(lambda: self._running == 0)
        try:
            yield
        finally:
            with self._cond:
                self._gc = False
                self._cond.notify_all()

    def in_progress(self) -> int:
        """Commands under way, counting those with work left after their answer."""
        with self._cond:
            return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no command runs and none has work left; False when `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0, timeout)


def _attachment(env) -> tuple[str, str] | None:
    """The attachment a CNI request's environment names, if it names one (ops.handle checks the rest)."""
    if not isinstance(env, dict):
        return None
    container_id, ifname = env.get("CNI_CONTAINERID"), env.get("CNI_IFNAME")
    if isinstance(container_id, str) and isinstance(ifname, str) and container_id and ifname:
        return container_id, ifname
    return None


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.dp = Datapath(config.pin_root, config.obj_dir, tc_mode=config.tc_mode)
        self.state: DesiredState | None = None          # in force: the state file's, with the API's frontends
        self.file_state: DesiredState | None = None     # the state file's, as last accepted
        self.api: ApiFrontends | None = None            # the Kubernetes API's frontends, as last learnt
        self.kubernetes = None                          # sluice.k8s.source.KubernetesSource, once started
        self.policy = None                              # sluice.policy.engine.PolicyEngine, when enforced
        self.reconciler = Reconciler(self.dp)   # keeps what it applied last, for delta reconciles
        self.health = {"ready": False, "pid": os.getpid(), "package": package_fingerprint(),
                       "state_file": config.state_file,
                       "last_reconcile": None, "last_error": None, "last_plan": None,
                       "last_reconcile_kind": None, "last_full_reconcile": None, "last_drift_repair": None,
                       "pending_confirm": None, "last_revert": None}
        self._state_stamp = None
        self._last_full: float | None = None    # time.monotonic() of the last full reconcile
        self._repair_failed = False             # last_error comes from a failed drift repair, not the file
        self._lock = threading.RLock()          # reconciles run one at a time
        self._cni = CniLocks()
        self._ipam = None                       # sluice.ipam.Ipam of the pod CIDR in force
        self._stop = threading.Event()
        self._servers: list = []

    # ---- datapath and state ------------------------------------------------------

    def ensure_datapath(self, state: DesiredState) -> None:
        if not self.dp.is_loaded():
            log.info("no datapath loaded under %s: loading %s", self.dp.root, self.dp.obj_dir)
            self.dp.load()
        self.health["tc_mode"] = self.dp.tc_mode_in_force()
        if not self.dp.tc_attached(state.nic, NIC_PROG):
            self.dp.attach_nic(state.nic, self.config.xdp_mode)
        self.dp.attach_cgroup(self.config.cgroup or None)
        self.dp.attach_sockmap()

    def _stamp(self):
        try:
            st = os.stat(self.config.state_file)
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return None

    def _full_due(self) -> bool:
        """Whether the periodic full reconcile is due (never with full_reconcile_interval 0, where every
        reconcile of a changed file is a full one anyway)."""
        interval = self.config.full_reconcile_interval
        return interval > 0 and (self._last_full is None or time.monotonic() - self._last_full >= interval)

    def reconcile(self, force: bool = False, full: bool = False) -> bool:
        """Re-read the state file if it changed (or when forced) and apply it: as a delta from the state
        applied last, or in full (`full`, due, or the node/routing sections changed). With the file
        unchanged, a due full reconcile re-applies the last good state (drift repair). False when refused."""
        with self._lock:
            stamp = self._stamp()
            if not force and stamp == self._state_stamp:
                return self._repair() if self.state is not None and self._full_due() else True
            full = full or self._full_due() or self.config.full_reconcile_interval <= 0
            self._state_stamp = stamp
            try:
                text = read_text(self.config.state_file, "state file ")
                file_state = DesiredState.parse(json_document(text, self.config.state_file, "state file "))
                state = self._with_api(file_state)
                Reconciler.check_node(state)  # before ensure_datapath touches the NIC
                self._arm_hand_edit(text)
                if full or self.reconciler.needs_full(state):
                    self.ensure_datapath(state)
                    plan = self.reconciler.apply(state)
                else:
                    plan = self.reconciler.update(state)
            except Exception as e:  # noqa: BLE001 - whatever failed, the agent keeps running and says why
                self._refused(e)
                return False
            self.file_state, self.state = file_state, state
            self._repair_failed = False
            self._reconciled()
            self.health.update(ready=True, last_error=None, last_reconcile=time.time(), last_plan=plan.to_dict())
            if plan.changed:
                log.info("reconciled (%s):\n%s", self.reconciler.last_kind, plan.render())
            return True

    def _arm_hand_edit(self, text: str) -> None:
        """Commit-confirm for a state file changed past the state module, armed before it is applied: a hand
        edit that cuts the node off is reverted like a playbook's change. Not armable, it is not applied."""
        armed = confirm.arm_hand_edit(self.config.state_file, text, self.config.hand_edit_confirm_timeout)
        if armed:
            self.health["pending_confirm"] = armed
            log.warning("%s was changed by hand: applying it; unless `sluice confirm` confirms it within %g s, the "
                        "state before it is restored", self.config.state_file, self.config.hand_edit_confirm_timeout)

    def _repair(self) -> bool:
        """A full reconcile of the last good state: puts right what changed the maps or hooks since."""
        try:
            Reconciler.check_node(self.state)
            self.ensure_datapath(self.state)
            plan = self.reconciler.apply(self.state)
        except Exception as e:  # noqa: BLE001 - as in reconcile()
            self._refused(e)
            self._repair_failed = True
            self._last_full = time.monotonic()     # the next attempt one interval later, not at every poll
            return False
        self._reconciled()
        if self._repair_failed:
            self._repair_failed = False
            self.health["last_error"] = None
        if plan.changed:
            self.health["last_drift_repair"] = {"time": time.time(), "plan": plan.to_dict()}
            log.warning("the datapath had drifted from the state applied last; repaired:\n%s", plan.render())
        return True

    def _reconciled(self) -> None:
        kind = self.reconciler.last_kind
        self.health["last_reconcile_kind"] = kind
        if kind == "full":
            self._last_full = time.monotonic()
            self.health["last_full_reconcile"] = time.time()

    def _refused(self, e: Exception) -> None:
        if not isinstance(e, (StateError, DatapathError, OSError)):
            log.exception("applying %s failed unexpectedly", self.config.state_file)
        kept = "keeping the last good state" if self.state else "nothing applied yet"
        self.health["last_error"] = f"{e} ({kept})"
        log.error("state %s refused: %s; %s", self.config.state_file, e, kept)

    # ---- the Kubernetes API ------------------------------------------------------------

    def _with_api(self, file_state: DesiredState) -> DesiredState:
        """The state file's state with the API's frontends and routes; conflicts go to health and the log."""
        state, conflicts = merge(file_state, self.api, Reconciler.route_check(file_state))
        if self.config.kubeconfig:
            if conflicts and conflicts != self.health["kubernetes"].get("conflicts"):
                for c in conflicts:
                    log.warning("%s", c)
            self.health["kubernetes"]["conflicts"] = conflicts
        return state

    def load_kubernetes_cache(self) -> None:
        """The API's frontends as last learnt: served from the first reconcile on, API server reachable or not."""
        self.health["kubernetes"] = {"kubeconfig": self.config.kubeconfig, "synced": False, "conflicts": [],
                                     "last_apply": None, "last_error": None}
        try:
            self.api = ApiFrontends.load(self.config.kubernetes_cache)
        except StateError as e:
            log.error("ignoring the Kubernetes cache: %s", e)

    def start_kubernetes(self) -> None:
        """Watch the API from threads; needs the node's name and address from a valid state file."""
        from .k8s.source import KubernetesSource
        from .policy.engine import PolicyEngine

        health = self.health["kubernetes"]
        network_policy = self.file_state.network_policy
        try:
            self.kubernetes = KubernetesSource.from_kubeconfig(self.config.kubeconfig, self.file_state.node_name,
                                                               self.file_state.node_ip, network_policy)
        except (ValueError, OSError) as e:
            health["last_error"] = str(e)
            log.error("not watching the Kubernetes API: %s", e)
            return
        self.kubernetes.start(self._stop)
        threading.Thread(target=self._follow_api, name="kubernetes", daemon=True).start()
        if network_policy:
            self.policy = PolicyEngine(self.dp, self.file_state.node_name, self.config.policy_identities)
            threading.Thread(target=self._follow_policy, name="network-policy", daemon=True).start()

    def _follow_api(self) -> None:
        """Apply the API's frontends whenever they change (after every watch has listed once). A changed
        Service's cache file is written first: an agent restarted while the API server is away never serves
        older frontends than the maps held."""
        source, cache = self.kubernetes, self.config.kubernetes_cache
        first = True
        while not self._stop.is_set():
            if not source.wait_changed(1.0):
                continue
            if not source.synced:
                self._stop.wait(0.1)
                continue
            with self._lock:
                changed = source.frontends()
                try:
                    for service, part in changed.items():
                        save_service(cache, service, part)
                    if source.routes_changed:
                        save_routes(cache, source.api.routes)
                    if first:
                        prune_cache(cache, source.service_keys())
                        first = False
                except OSError as e:
                    log.error("cannot write the Kubernetes cache %s: %s", cache, e)
                self.api = source.api
                self._apply_api()

    def _follow_policy(self) -> None:
        """Resolve and apply NetworkPolicy whenever a Pod, Namespace, NetworkPolicy or Node changes (once all
        of them are listed); bursts of changes are taken together. Expired conntrack entries go meanwhile."""
        source, engine = self.kubernetes, self.policy
        while not self._stop.is_set():
            if source.wait_policy_changed(1.0):
                self._stop.wait(0.02)
                engine.update(source.policy_inputs())
            try:
                engine.gc_conntrack()
            except OSError as e:
                log.error("removing expired conntrack entries failed: %s", e)

    def _apply_api(self) -> None:
        """With the lock held: the state file's state and the API's frontends, as a delta."""
        health = self.health["kubernetes"]
        if self.file_state is None:
            return
        self.kubernetes.set_node(self.file_state.node_name, self.file_state.node_ip)
        try:
            state = self._with_api(self.file_state)
            plan = self.reconciler.update(state)
        except Exception as e:  # noqa: BLE001 - the agent keeps serving the last state and says why
            log.exception("applying the Kubernetes API's services failed")
            health["last_error"] = str(e)
            return
        self.state = state
        self._reconciled()
        health.update(last_apply=time.time(), last_error=None)
        if plan.changed:
            log.info("Kubernetes services applied (%s):\n%s", self.reconciler.last_kind, plan.render())

    def kubernetes_health(self) -> dict:
        health = dict(self.health.get("kubernetes") or {})
        if self.kubernetes is not None:
            health.update(self.kubernetes.health())
        if self.policy is not None:
            health["network_policy"] = dict(self.policy.health)
        return health

    # ---- serving -----------------------------------------------------------------

    def handle(self, request: dict) -> dict:
        """The reply to one request (sluice.agent_protocol)."""
        op = request.get("op")
        if op == "health":
            health = {**self.health, "cni_in_progress": self._cni.in_progress()}
            if self.config.kubeconfig:
                health["kubernetes"] = self.kubernetes_health()
            return {"ok": True, "result": health}
        if op == "reconcile":
            ok = self.reconcile(force=True, full=bool(request.get("full")))
            return {"ok": ok, "result": self.health}
        if op == "cni":
            return self._handle_cni(request)
        if op == "policy":
            if self.policy is None:
                return {"ok": False, "error": "NetworkPolicy is not enforced on this node (network_policy in the "
                                              "state file, and a kubeconfig for the agent)"}
            return {"ok": True, "result": self.policy.explain(str(request.get("pod", "")))}
        return agent_protocol.error_reply(CniError(INVALID_ENVIRONMENT_VARIABLES, f"unknown request op {op!r}"))

    def _handle_cni(self, request: dict) -> dict:
        from .cni import ops

        command, env, stdin = request.get("command", ""), request.get("env") or {}, request.get("stdin", "")
        attachment = _attachment(env)
        subject = f"CNI {command}" + (f" of {attachment[1]} for container {attachment[0]}" if attachment else "")
        with self._cni.gc() if command == "GC" else self._cni.command(attachment, subject) as after_answer:
            try:
                state = self.state
                if state is None:
                    raise CniError(TRY_AGAIN_LATER, "sluice-agent has no valid state yet",
                                   self.health["last_error"] or "")
                node = ops.NodeContext(datapath=self.dp, ipam=self._ipam_of(state.pod_cidr), mtu=self.config.mtu,
                                       ready=lambda: bool(self.health["ready"]), after_answer=after_answer)
                result = ops.handle(command, env, stdin, node)
                self._policy_endpoint(command, env, result)
                return agent_protocol.cni_reply(result)
            except CniError as e:
                return agent_protocol.cni_error_reply(e, command, stdin)
            except Exception as e:  # noqa: BLE001 - a CNI caller must always get an answer
                log.exception("CNI %s failed", command)
                return agent_protocol.cni_error_reply(CniError(INTERNAL_FAILURE, f"sluice-agent internal error: {e}"),
                                                      command, stdin)

    def _policy_endpoint(self, command: str, env: dict, result) -> None:
        """Tell NetworkPolicy which pod the CNI just gave an address, or took one from."""
        if self.policy is None or command not in ("ADD", "DEL"):
            return
        args = dict(a.split("=", 1) for a in str(env.get("CNI_ARGS") or "").split(";") if "=" in a)
        pod = f"{args.get('K8S_POD_NAMESPACE', '')}/{args.get('K8S_POD_NAME', '')}"
        if pod == "/":
            return
        if command == "DEL":
            self.policy.endpoint_deleted(pod)
            return
        for ip in (result or {}).get("ips") or ():
            address = str(ip.get("address", "")).partition("/")[0]
            if address:
                self.policy.endpoint_added(address, pod)

    def _ipam_of(self, pod_cidr: str):
        """The node's Ipam for `pod_cidr`, made once per CIDR (it holds no state of its own: the records
        are on disk, under its flock)."""
        from .ipam import Ipam

        ipam = self._ipam
        if ipam is None or str(ipam.network) != pod_cidr:
            ipam = self._ipam = Ipam(self.config.ipam_dir, pod_cidr)
        return ipam

    def serve_socket(self) -> None:
        path = self.config.socket
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.exists(path):
            os.unlink(path)
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                self.wfile.write(agent_protocol.answer(self.rfile.readline(), agent.handle))

        old_umask = os.umask(0o177)  # the socket is created 0600: root only
        try:
            server = socketserver.ThreadingUnixStreamServer(path, Handler)
        finally:
            os.umask(old_umask)
        server.daemon_threads = True
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, name="socket", daemon=True).start()

    def metrics_text(self) -> str:
        lines = [
            "# HELP sluice_datapath_packets_total Packets per BPF hook and outcome, summed over CPUs.",
            "# TYPE sluice_datapath_packets_total counter",
        ]
        drops = ["# HELP sluice_drops_total Packets dropped per BPF hook and drop reason.",
                 "# TYPE sluice_drops_total counter"]
        nbytes = ["# HELP sluice_datapath_bytes_total Bytes per BPF hook and outcome.",
                  "# TYPE sluice_datapath_bytes_total counter"]
        for (hook, outcome), (packets, size) in sorted(self.dp.metrics().items()):
            if outcome.startswith("drop_"):
                drops.append(f'sluice_drops_total{{hook="{hook}",reason="{outcome[5:]}"}} {packets}')
            else:
                lines.append(f'sluice_datapath_packets_total{{hook="{hook}",outcome="{outcome}"}} {packets}')
            nbytes.append(f'sluice_datapath_bytes_total{{hook="{hook}",outcome="{outcome}"}} {size}')
        fill = ["# HELP sluice_map_entries Entries in each datapath map.", "# TYPE sluice_map_entries gauge"]
        fill += [f'sluice_map_entries{{map="{name}"}} {v["entries"]}'
                 for name, v in self.dp.map_fill().items() if v["entries"] is not None]
        if self.policy is not None:
            fill += ["# HELP sluice_policy_drops_total Packets NetworkPolicy dropped, per pod and direction.",
                     "# TYPE sluice_policy_drops_total counter"]
            fill += [f'sluice_policy_drops_total{{pod="{pod}",direction="{direction}"}} {packets}'
                     for (pod, direction), packets in sorted(self.policy.drops().items())]
            health = self.policy.health
            fill += ["# HELP sluice_policy_isolated_endpoints Local pods a NetworkPolicy isolates.",
                     "# TYPE sluice_policy_isolated_endpoints gauge",
                     f"sluice_policy_isolated_endpoints {health['isolated_endpoints']}",
                     "# HELP sluice_policy_apply_seconds Time the last NetworkPolicy change took to reach the maps.",
                     "# TYPE sluice_policy_apply_seconds gauge",
                     f"sluice_policy_apply_seconds {health['last_apply_seconds'] or 0}"]
        ready = ["# HELP sluice_agent_ready 1 when the last state file was applied.",
                 "# TYPE sluice_agent_ready gauge", f"sluice_agent_ready {int(bool(self.health['ready']))}"]
        return "\n".join(lines + drops + nbytes + fill + ready) + "\n"

    def serve_metrics(self) -> None:
        if not self.config.metrics_address:
            return
        host, _colon, port = self.config.metrics_address.rpartition(":")
        agent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body = agent.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
        server.daemon_threads = True
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    def revert_if_due(self) -> None:
        """Commit-confirm: restore and apply the state before an unconfirmed change whose time ran out."""
        try:
            done = confirm.revert_if_due(self.config.state_file)
            self.health["pending_confirm"] = confirm.pending(self.config.state_file)
        except OSError as e:
            log.error("cannot check the pending confirmation of %s: %s", self.config.state_file, e)
            return
        if done is None:
            return
        log.warning("the %s of %s was not confirmed in time: %s%s", "hand edit" if done["hand_edit"] else "change",
                    self.config.state_file,
                    "the state before it is restored" if done["restored"] else "no earlier state to restore",
                    f"; its plan was {done['plan']}" if done["plan"] else "")
        self.reconcile(force=True, full=True)
        self.health["last_revert"] = done     # once the restored state is applied: health never runs ahead

    def run(self) -> None:
        if self.config.kubeconfig:
            self.load_kubernetes_cache()
        self.revert_if_due()        # a deadline that passed while the agent was away
        self.reconcile(force=True)
        self.serve_socket()
        self.serve_metrics()
        log.info("sluice-agent ready=%s, socket %s, metrics %s", self.health["ready"], self.config.socket,
                 self.config.metrics_address or "off")
        while not self._stop.wait(self.config.poll_interval):
            if self.config.kubeconfig and self.kubernetes is None and self.file_state is not None:
                self.start_kubernetes()
            self.revert_if_due()
            self.reconcile()
        self.close()

    def stop(self, *_):
        self._stop.set()

    def close(self) -> None:
        """Stop serving the socket and metrics, and let the CNI commands under way end (a DEL's veth goes)."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        if not self._cni.wait_idle(CNI_STOP_WAIT_S):
            log.warning("stopping with CNI commands still under way after %s s", CNI_STOP_WAIT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="agent settings (JSON)")
    parser.add_argument("--state-file", help="override the desired state file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = AgentConfig.load(args.config)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        log.error("%s", e)
        return 2
    if args.state_file:
        config.state_file = args.state_file
    agent = Agent(config)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
    return 0
