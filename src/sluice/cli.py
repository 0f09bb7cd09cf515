"""sluice: inspect a node's datapath and its policies, and preview state changes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import maps as m
from . import package_fingerprint
from .agent_protocol import DEFAULT_SOCKET, request
from .datapath import DEFAULT_OBJ_DIR, DEFAULT_ROOT, TC_MODES, Datapath, DatapathError
from .state import DEFAULT_STATE_FILE, DesiredState, Reconciler, Snapshot, StateError, confirm


def _agent_health(socket_path: str) -> dict:
    try:
        return request(socket_path, {"op": "health"}, timeout=5)["result"]
    except (OSError, ValueError, KeyError) as e:
        return {"ready": False, "reachable": False, "error": f"agent socket {socket_path}: {e}"}


def _table(rows: list[list], header: list[str]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows)])


def cmd_status(dp: Datapath, args) -> tuple[dict, str]:
    agent = _agent_health(args.socket)
    source = "--tc-mode" if getattr(args, "tc_mode", None) else "default"
    if source == "default" and agent.get("tc_mode") in TC_MODES:
        dp.tc_mode, source = agent["tc_mode"], "agent"  # the running agent's is the one in force
    status = dp.status()
    status["tc_mode"]["source"] = source
    status["agent"] = agent
    status["package"] = package_fingerprint()
    nic_modes = {}
    for link in status["links"]:
        if link["kind"] == "xdp":
            nic_modes[link["target"]] = dp.xdp_mode(link["target"])
    status["xdp_modes"] = nic_modes
    out = [f"datapath root {status['root']}: {'loaded' if status['loaded'] else 'NOT loaded'}"]
    tc_mode = status["tc_mode"]
    out.append(f"tc mode: {tc_mode['in_force'] or 'unknown'} ({tc_mode['setting']} from {source}; "
               + (f"kernel has tcx: {'yes' if tc_mode['tcx_available'] else 'no'})" if tc_mode["in_force"]
                  else f"{tc_mode.get('error')})")
               + (f"; pod veths: {tc_mode['pods']}" if tc_mode["in_force"] and tc_mode["pods"] != tc_mode["in_force"]
                  else ""))
    out.append(_table([[p, t] for p, t in sorted(status["programs"].items())], ["program", "tag"]))
    out.append("")
    out.append(_table([[l["target"], l["kind"], l["program"], "yes" if l["attached"] else "NO (stale)",
                        nic_modes.get(l["target"], "") if l["kind"] == "xdp" else ""]
                       for l in status["links"]], ["device/target", "hook", "program", "attached", "xdp mode"]))
    out.append("")
    out.append(_table([[n, v["entries"], v["max_entries"]] for n, v in sorted(status["maps"].items())],
                      ["map", "entries", "max"]))
    out.append("")
    out.append(f"agent: {'ready' if agent.get('ready') else 'NOT ready'}"
               + (f" (pid {agent['pid']})" if agent.get("pid") else "")
               + (f", tc mode {agent['tc_mode']}" if agent.get("tc_mode") else "")
               + (f": {agent.get('last_error') or agent.get('error')}" if agent.get("last_error") or agent.get("error")
                  else ""))
    return status, "\n".join(out)


def cmd_endpoints(dp: Datapath, args):
    with dp.open_map(m.EndpointsMap) as mp:
        items = {ip: vars(ep) for ip, ep in sorted(mp.items().items())}
    return items, _table([[ip, e["ifindex"], e["pod_mac"], e["host_mac"]] for ip, e in items.items()],
                         ["pod ip", "host ifindex", "pod mac", "host mac"])


def cmd_routes(dp: Datapath, args):
    with dp.open_map(m.RoutesMap) as mp:
        items = {c: vars(r) for c, r in sorted(mp.items().items())}
    return items, _table([[c, r["nexthop"], "vxlan" if r["tunnel"] else "native", r["ifindex"]]
                          for c, r in items.items()], ["pod cidr", "nexthop", "mode", "ifindex"])


def cmd_services(dp: Datapath, args):
    snap = Snapshot.read(dp)
    items = [{"frontend": f"{v}:{p}/{pr}", "kind": kind, "backends": [f"{b.ip}:{b.port}" for b in bs]}
             for kind, frontends in (("socket-lb", snap.services), ("xdp-lb", snap.lb_vips))
             for (v, p, pr), bs in sorted(frontends.items())]
    return items, _table([[i["frontend"], i["kind"], ", ".join(i["backends"]) or "(none)"] for i in items],
                         ["frontend", "kind", "backends"])


def cmd_metrics(dp: Datapath, args):
    items = [{"hook": h, "outcome": o, "packets": p, "bytes": b} for (h, o), (p, b) in sorted(dp.metrics().items())]
    return items, _table([[i["hook"], i["outcome"], i["packets"], i["bytes"]] for i in items],
                         ["hook", "outcome", "packets", "bytes"])


def cmd_apply(dp: Datapath, args):
    state = DesiredState.from_file(args.file)
    reconciler = Reconciler(dp)
    plan = reconciler.plan(state) if args.plan else reconciler.apply(state)
    return {"changed": plan.changed, "plan": plan.to_dict(), "applied": not args.plan}, plan.render()


def cmd_confirm(_dp: Datapath, args) -> tuple[dict, str]:
    """Confirm a change of the state file (commit-confirm): it stands. Fails when it came too late."""
    result = confirm.confirm(args.state_file, args.deadline)
    if result.get("reverted"):
        raise StateError(f"too late: the agent reverted {args.state_file} to the state before the change at "
                         f"{time.strftime('%H:%M:%S', time.localtime(result['reverted']['time']))} (the change was "
                         f"not confirmed in time)")
    return result, "confirmed" if result["confirmed"] else "no change of the state file waits for a confirmation"


def cmd_policy(_dp: Datapath, args) -> tuple[dict, str]:
    """What the agent resolved for a pod: its identity, isolation, and per policy rule the peers and ports as
    written and as resolved (identities, the pods behind them, port blocks); its policy drops."""
    import yaml

    reply = request(args.socket, {"op": "policy", "pod": args.pod}, timeout=10)
    if not reply.get("ok"):
        raise StateError(reply.get("error") or "the agent refused the request")
    return reply["result"], yaml.safe_dump(reply["result"], sort_keys=False, default_flow_style=None, width=110)


COMMANDS = {"status": cmd_status, "endpoints": cmd_endpoints, "routes": cmd_routes, "services": cmd_services,
            "metrics": cmd_metrics, "apply": cmd_apply, "confirm": cmd_confirm, "policy": cmd_policy}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["connectivity"]:
        from . import connectivity

        return connectivity.main(argv[1:])
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__,
                                     epilog="sluice connectivity --help: test pods and probes (verify.yml)")
    parser.add_argument("--root", default=os.environ.get("SLUICE_PIN_ROOT", DEFAULT_ROOT), help="bpffs pin root")
    parser.add_argument("--obj-dir", default=os.environ.get("SLUICE_OBJ_DIR", DEFAULT_OBJ_DIR))
    parser.add_argument("--socket", default=os.environ.get("SLUICE_AGENT_SOCKET", DEFAULT_SOCKET))
    parser.add_argument("--tc-mode", default=os.environ.get("SLUICE_TC_MODE"), choices=TC_MODES,
                        help="how tc programs are attached: auto (tcx where the kernel has it), tcx, legacy "
                             "(clsact + cls_bpf); default: the running agent's, else auto")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("status", "endpoints", "routes", "services", "metrics"):
        sub.add_parser(name)
    apply = sub.add_parser("apply", help="apply a state file, or with --plan show what it would change")
    apply.add_argument("--plan", action="store_true", help="only show the plan")
    apply.add_argument("file")
    confirm_cmd = sub.add_parser("confirm", help="confirm the last change of the state file, which the agent "
                                                 "reverts otherwise (commit-confirm)")
    confirm_cmd.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    confirm_cmd.add_argument("--deadline", type=float, help="the change's (the state module's confirm_deadline): "
                                                            "fail if that change was reverted")
    policy = sub.add_parser("policy", help="what the agent resolved of the NetworkPolicies for a pod of this node")
    policy.add_argument("pod", help="NAMESPACE/NAME")
    args = parser.parse_args(argv)
    dp = Datapath(args.root, args.obj_dir, tc_mode=args.tc_mode or "auto")
    try:
        data, text = COMMANDS[args.command](dp, args)
    except (DatapathError, StateError, OSError) as e:
        print(f"sluice {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
