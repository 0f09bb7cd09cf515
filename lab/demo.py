"""`make demo`: the whole Sluice story on the local lab, with the real playbooks.

1. bring up the lab (three nodes reached over SSH, an external client)
2. converge it with playbooks/site.yml, then again: the second run must change nothing
3. run the connectivity suite (playbooks/verify.yml): pods made through the CNI plugin,
   every datapath feature checked by outcome and by the eBPF counters it moved
4. switch the inventory to VXLAN routing, re-converge, check pods across nodes, switch back
5. remove a service from (a copy of) the inventory, re-converge, check its VIP no longer
   answers, and converge the real inventory again
6. print a table of every check with the datapath path it took

Logs of every step are in build/demo/. The lab stays up for inspection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "build", "demo")
VENV_BIN = os.path.join(REPO, ".venv", "bin")
LAB_INVENTORY = os.path.join(REPO, "inventory", "lab")
NODES = os.environ.get("LAB_NODES", "3")
REMOVED_SERVICE = "legacy"


class DemoFailed(Exception):
    pass


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_logged(name: str, argv: list[str]) -> tuple[str, float]:
    """Run a command with its output in build/demo/<name>.log; (output, seconds)."""
    log = os.path.join(OUT, f"{name}.log")
    started = time.monotonic()
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", ANSIBLE_FORCE_COLOR="0")
    with open(log, "w") as f:
        result = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    with open(log) as f:
        output = f.read()
    if result.returncode != 0:
        raise DemoFailed(f"{' '.join(argv[:2])} failed ({result.returncode}); see {os.path.relpath(log, REPO)}:\n"
                         + "\n".join(output.splitlines()[-25:]))
    return output, seconds


def playbook(name: str, playbook_file: str, *args: str) -> tuple[dict, float]:
    """Run a playbook; ({host: changed count}, seconds)."""
    output, seconds = run_logged(name, [os.path.join(VENV_BIN, "ansible-playbook"),
                                        os.path.join("playbooks", playbook_file), *args])
    changed = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.M)}
    return changed, seconds


def converge(name: str, *args: str) -> None:
    changed, seconds = playbook(name, "site.yml", *args)
    print(f"   site.yml: {seconds:.0f} s, changed: "
          + ", ".join(f"{h}={c}" for h, c in sorted(changed.items()) if h != "localhost"), flush=True)
    return changed


def verify(name: str, *args: str) -> list[dict]:
    report = os.path.join(OUT, f"{name}.json")
    _changed, seconds = playbook(name, "verify.yml", "-e", f"sluice_verify_report={report}", *args)
    with open(report) as f:
        checks = json.load(f)["checks"]
    print(f"   verify.yml: {seconds:.0f} s, {sum(c['passed'] for c in checks)}/{len(checks)} checks passed",
          flush=True)
    return checks


def inventory_without_service(service: str) -> tuple[str, dict]:
    """A copy of the lab inventory without `service`; (its hosts.yml, the removed service)."""
    copy = os.path.join(OUT, "inventory-service-removed")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(LAB_INVENTORY, copy, symlinks=True)
    group_vars = os.path.join(copy, "group_vars", "sluice_nodes.yml")
    with open(group_vars) as f:
        data = yaml.safe_load(f)
    removed = [s for s in data["sluice_services"] if s["name"] == service]
    if not removed:
        raise DemoFailed(f"the lab inventory has no service named {service!r} to remove")
    data["sluice_services"] = [s for s in data["sluice_services"] if s["name"] != service]
    with open(group_vars, "w") as f:
        f.write("---\n# The lab inventory with the service '" + service + "' removed (lab/demo.py).\n")
        yaml.safe_dump(data, f, sort_keys=False)
    return os.path.join(copy, "hosts.yml"), removed[0]


def path_taken(check: dict) -> str:
    steps = [f"{s['node']} {s['hook']}/" + ", ".join(f"{o} +{n}" for o, n in s["by_outcome"].items())
             if s["by_outcome"] else f"{s['node']} {s['hook']}/{'|'.join(s['outcomes'])} +0" for s in check["path"]]
    return "; ".join(steps) or "(nothing may answer)"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths)), *(line.format(*r) for r in rows)])


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    results: list[tuple[str, dict]] = []
    try:
        step(f"1. Lab: {NODES} nodes, each its own network/mount namespace with sshd, plus an external client")
        run_logged("lab-up", [os.path.join(VENV_BIN, "python"), "lab/lab.py", "up", "--nodes", NODES])
        print("   lab is up (inventory/lab/hosts.yml)")

        step("2. Converge with playbooks/site.yml, then again (must change nothing)")
        converge("site-1")
        second = converge("site-2")
        if any(second.values()):
            raise DemoFailed(f"the second site.yml run changed something: {second}; see build/demo/site-2.log")
        print("   idempotent: changed=0 everywhere")

        step("3. Connectivity suite (native routing)")
        results += [("native", c) for c in verify("verify-native")]

        step("4. VXLAN routing: re-converge with sluice_routing_mode=vxlan, check pods across nodes, switch back")
        converge("site-vxlan", "-e", "sluice_routing_mode=vxlan")
        results += [("vxlan", c) for c in verify("verify-vxlan", "-e", "sluice_routing_mode=vxlan",
                                                 "-e", '{"sluice_verify_only": ["pod-to-pod-cross-node-vxlan"]}')]
        converge("site-native")

        step(f"5. Remove the service '{REMOVED_SERVICE}' from the inventory and re-converge")
        hosts, service = inventory_without_service(REMOVED_SERVICE)
        converge("site-service-removed", "-i", hosts)
        absent = [{"vip": service["vip"], "port": service["port"], "protocol": service["protocol"]}]
        name = f"removed-service-{service['vip']}-{service['port']}-{service['protocol']}"
        results += [("service removed", c) for c in verify(
            "verify-service-removed", "-i", hosts, "-e", json.dumps({"sluice_verify_absent_services": absent,
                                                                     "sluice_verify_only": [name]}))]
        converge("site-restored")
        print(f"   the real inventory is converged again ('{REMOVED_SERVICE}' is back)")
    except DemoFailed as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        return 1
    finally:
        if results:
            step("Summary")
            rows = [[phase, c["name"], "pass" if c["passed"] else "FAIL", path_taken(c)] for phase, c in results]
            print(table(rows, ["phase", "check", "result", "datapath path (node hook/outcome +packets)"]))
            for phase, c in results:
                if not c["passed"]:
                    print(f"   {phase} {c['name']}: " + "; ".join(c["reasons"]))

    failed = [c for _phase, c in results if not c["passed"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed.")
    print("Inspect a node:  .venv/bin/python lab/lab.py exec node1 -- /opt/sluice/venv/bin/sluice status")
    print("                 (also: sluice endpoints | services | routes | metrics)")
    print("Tear down:       make lab-down")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
