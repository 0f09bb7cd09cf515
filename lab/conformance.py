"""`make conformance`: the upstream Kubernetes e2e network suites against the lab's cluster, and their reports.

    conformance.py [--kubeconfig PATH] [--suite sig-network|netpol|all] [--out DIR] [--procs N]

e2e.test and ginkgo come from lab/k8s/build.sh's bin directory; KUBE_TEST_REPO_LIST points e2e.test's registries
at the images lab/images.py imports into the nodes. For each suite the run writes into DIR:

- <date>-<suite>.log  ginkgo's verbose output (the terminal gets it without the per-test timelines)
- <date>-<suite>.xml  ginkgo's JUnit report
- <date>-<suite>.md   versions, focus and skips, totals, one row per test
and rewrites DIR/latest.md, the index of the latest report of each suite.

Failing tests are results: the exit status is 0 once the reports are written, and non-zero only when the run
could not happen (no cluster, no binaries, no JUnit report, a failed suite setup). Standard library only, like
lab.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator

import images

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_KUBECONFIG = "/var/lib/sluice-lab/sllab/kube/admin.conf"
DEFAULT_OUT = os.path.join(REPO, "conformance", "results")

# A suite's run is bounded by ginkgo's --timeout (the test running then is reported interrupted, the rest "not
# run"); the runner kills the run if ginkgo has not finished GRACE_SECONDS after it.
SUITE_TIMEOUT_MINUTES = 55
GRACE_SECONDS = 300
# Ginkgo processes running tests at once. A failing e2e test mostly waits out a poll rather than using CPU (DNS
# answers up to 600 s, Service reachability 120 s, 10 s for each wrong pair of a NetworkPolicy probe matrix, run
# twice): with Services, DNS and policies not working yet, either suite takes two hours or more one test at a
# time. Four bring that to the timeout; the CPU bound on two cores is the netpol probes (a `kubectl exec`-like
# call each, three at a time per process). The reports keep every test's time to revisit this.
DEFAULT_PROCS = 4


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    focus: str
    skips: tuple[tuple[str, str], ...]  # (regular expression, why the tests it matches cannot apply to the lab)

    @property
    def skip(self) -> str:
        return "|".join(pattern for pattern, _why in self.skips)


# Nothing is skipped for failing: Service and NetworkPolicy tests that fail are results. Neither focus takes a
# [Serial], [Slow], [Flaky] or IPv6/dual-stack test in v1.34 (and ginkgo runs [Serial] ones alone anyway).
DISRUPTIVE = (r"\[Disruptive\]", "restarts or cuts off nodes and control-plane components (through a cloud "
                                 "provider or SSH, which the lab does not give e2e.test), breaking the tests that "
                                 "run beside them")
SUITES = {
    "sig-network": Suite("sig-network", r"\[sig-network\].*\[Conformance\]", (DISRUPTIVE,)),
    # test/e2e/network/netpol: every test is under `[sig-network] Netpol` ("Netpol", "Netpol [LinuxOnly]" for UDP,
    # "Netpol API", "Netpol [Feature:SCTPConnectivity] [LinuxOnly]"), the "NetworkPolicy between server and
    # client" contexts inside them; no other test names NetworkPolicy. [Feature:NetworkPolicy] is no feature
    # gate: it marks the tests that need an implementation of the NetworkPolicy API (GA since v1.7), which is
    # what Sluice is, so they run. [Feature:SCTPConnectivity] marks pod networks that carry SCTP.
    "netpol": Suite("netpol", r"\[sig-network\] Netpol", (
        DISRUPTIVE,
        (r"\[Feature:SCTPConnectivity\]", "SCTP traffic between pods, a capability upstream leaves off by default; "
                                          "the lab's kernel has no SCTP (CONFIG_IP_SCTP unset) for the servers"),
    )),
}

# JUnit results (ginkgo's testcase status; "error" for an <error> without one) that are a failure of the test.
FAILED = ("failed", "timedout", "panicked", "interrupted", "aborted", "error")
TOTALS_RE = re.compile(r"^\*\*(\d+) tests: (\d+) passed, (\d+) failed, (\d+) skipped, (\d+) not run\*\*", re.M)


@dataclasses.dataclass
class Case:
    """One JUnit testcase: `kind` is ginkgo's node type (It, SynchronizedBeforeSuite, ReportAfterSuite...)."""
    name: str
    kind: str
    result: str
    seconds: float
    message: str  # first line of the failure, or the reason a test skipped itself


def first_line(text: str) -> str:
    # Ginkgo colours some messages even with --no-color; Go's XML encoder turns the ESC into U+FFFD.
    text = re.sub(r"[\x1b\ufffd]\[[0-9;]*m", "", text)
    for line in text.strip().splitlines():
        # A <failure> body starts "[FAILED] <message>" (Kubernetes' own JUnit writer leaves out the attribute).
        line = re.sub(r"^\[[A-Z]+\] ", "", line.strip())
        if line:
            return line
    return ""


def without_labels(name: str) -> str:
    """A ginkgo JUnit test name without the labels ginkgo appends ("... [Conformance] [sig-network, Conformance]"):
    Kubernetes' e2e framework also writes each label into the spec text as a [tag]."""
    match = re.fullmatch(r"(.*) \[([^]]*)\]", name, re.S)
    if match and all(f"[{label}]" in match[1] for label in match[2].split(", ")):
        return match[1].rstrip()
    return name


def node_and_name(testcase: ET.Element) -> tuple[str, str]:
    """"[It] <spec text>", "[SynchronizedBeforeSuite]", "[ReportAfterSuite] <text>": ginkgo's node type first."""
    kind, name = re.fullmatch(r"(?:\[(It|[^]]*Suite[^]]*)\] ?)?(.*)", testcase.get("name", ""), re.S).groups()
    return kind or "It", name


def parse_junit(path: str) -> list[Case]:
    cases = []
    for testcase in ET.parse(path).getroot().iter("testcase"):
        kind, name = node_and_name(testcase)
        failure = testcase.find("failure")
        if failure is None:
            failure = testcase.find("error")
        skipped = testcase.find("skipped")
        if failure is not None:
            result = testcase.get("status") or ("failed" if failure.tag == "failure" else "error")
            message = first_line(failure.get("message") or failure.text or "")
        elif skipped is not None:
            result = testcase.get("status") or "skipped"
            # "skipped - <reason>" when the test called Skip(); plain "skipped" when the focus left it out, or a
            # timeout, an interrupt or a failed suite setup came first.
            message = (skipped.get("message") or "").removeprefix("skipped").removeprefix(" - ")
        else:
            result, message = testcase.get("status") or "passed", ""
        cases.append(Case(without_labels(name), kind, result, float(testcase.get("time") or 0), message))
    return cases


def trim_junit(path: str, selected: list[str]) -> None:
    """Keep in the JUnit report the suite entries and the selected tests with their results, without their
    captured output (the .log beside it has all of it): ginkgo also lists each of the ~7,000 specs the focus
    left out, and every report would be megabytes."""
    tree = ET.parse(path)
    wanted = set(selected)
    for testsuite in tree.getroot().iter("testsuite"):
        for testcase in list(testsuite.iter("testcase")):
            kind, name = node_and_name(testcase)
            if kind == "It" and without_labels(name) not in wanted:
                testsuite.remove(testcase)
                continue
            for output in testcase.findall("system-out") + testcase.findall("system-err"):
                testcase.remove(output)
        cases = testsuite.findall("testcase")
        testsuite.set("tests", str(len(cases)))
        testsuite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    tree.write(path, encoding="utf-8", xml_declaration=True)


def outcome(case: Case | None) -> str:
    """passed, failed, skipped (by the test itself) or not run."""
    if case is None or (case.result == "skipped" and not case.message):
        return "not run"
    if case.result in FAILED:
        return "failed"
    return "skipped" if case.result in ("skipped", "pending") else "passed"


def md_cell(text: str, limit: int = 200) -> str:
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|")


def suite_nodes(cases: list[Case]) -> list[tuple[str, int, Case]]:
    """The setup and teardown entries, (node, how many, the one to show): ginkgo records one per process."""
    runs: dict[str, list[Case]] = {}
    for case in cases:
        if case.kind != "It":
            runs.setdefault(" ".join(filter(None, (f"[{case.kind}]", case.name))), []).append(case)
    # The first failure is the cause; the other processes report that process #1's setup failed.
    return [(node, len(group), next((c for c in group if outcome(c) == "failed"), group[0]))
            for node, group in runs.items()]


def render_report(suite: Suite, selected: list[str], left_out: list[str], cases: list[Case], run: dict) -> str:
    """The markdown report of one suite's run. `selected`, the tests the focus and skips chose in the dry run, are
    its rows: one without a result in the JUnit report did not run. `left_out` are the ones the skips took out."""
    tests = {c.name: c for c in cases if c.kind == "It"}
    # A test with a result of its own gets a row even if the dry run did not list it.
    names = sorted(set(selected) | {n for n, c in tests.items() if outcome(c) != "not run"})
    outcomes = [outcome(tests.get(n)) for n in names]
    counts = {key: outcomes.count(key) for key in ("passed", "failed", "skipped", "not run")}
    out = [
        f"# {suite.name}: upstream e2e against the Sluice lab, {run['date']}",
        "",
        "| | |",
        "|---|---|",
        f"| Kubernetes | {run['kubernetes']} |",
        f"| Sluice | {run['commit']} |",
        f"| Started | {run['started']} |",
        f"| Duration | {run['duration']} |",
        f"| Focus | `{md_cell(suite.focus)}` |",
        f"| Skip | `{md_cell(suite.skip)}` |",
        f"| Command | `{md_cell(run['command'], 2000)}` |",
        f"| Raw results | [{run['xml']}]({run['xml']}) (JUnit), `{run['log']}` (log) |",
        "",
        "Left out by the runner, as they cannot apply to the lab:",
        "",
    ]
    for pattern, reason in suite.skips:
        matching = [n for n in left_out if re.search(pattern, n)]
        out.append(f"- `{pattern}` ({len(matching)} test{'' if len(matching) == 1 else 's'}): {reason}")
        out += [f"  - {n}" for n in matching]
    out += [
        "",
        f"**{len(names)} tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
        f"{counts['not run']} not run**",
        "",
        "Skipped: the test skipped itself, for the reason given. Not run: the suite ended before the test ran "
        "(timeout, interrupt, or a failed suite setup below).",
        "",
        "| Test | Result | Time | Failure or reason |",
        "|---|---|---|---|",
    ]
    for name in names:
        case, result = tests.get(name), outcome(tests.get(name))
        if result == "failed" and case.result != "failed":
            result += f" ({case.result})"
        seconds = f"{case.seconds:.1f} s" if result != "not run" else ""
        out.append(f"| {md_cell(name, 300)} | {result} | {seconds} | {md_cell(case.message if case else '')} |")
    out += ["", "Suite setup and teardown (not tests, not in the totals):", "",
            "| Node | Result | Time | Failure |", "|---|---|---|---|"]
    for node, count, case in suite_nodes(cases):
        node += f" (×{count}, one per process)" if count > 1 else ""
        out.append(f"| {md_cell(node)} | {case.result} | {case.seconds:.1f} s | {md_cell(case.message)} |")
    return "\n".join(out) + "\n"


def render_latest(out_dir: str) -> str:
    """The index of the newest <date>-<suite>.md of each suite in out_dir, with its totals."""
    latest = {}
    for entry in sorted(os.listdir(out_dir)):
        match = re.fullmatch(r"(\d{4}-\d\d-\d\d)-(.+)\.md", entry)
        if match and match[2] in SUITES:
            latest[match[2]] = (match[1], entry)
    out = ["# Conformance: latest results", "",
           "Upstream Kubernetes e2e suites run against the lab's cluster by `make conformance` (lab/conformance.py).",
           "", "| Suite | Date | Tests | Passed | Failed | Skipped | Not run | Report |",
           "|---|---|---|---|---|---|---|---|"]
    for suite in SUITES:
        if suite in latest:
            date, entry = latest[suite]
            with open(os.path.join(out_dir, entry)) as f:
                totals = TOTALS_RE.search(f.read())
            numbers = " | ".join(totals.groups() if totals else ["?"] * 5)
            out.append(f"| {suite} | {date} | {numbers} | [{entry}]({entry}) |")
    return "\n".join(out) + "\n"


# --- running e2e.test ---------------------------------------------------------------------------------------

def selection(suite: Suite) -> list[str]:
    """Ginkgo's focus and skip flags (without the "ginkgo." prefix e2e.test itself wants)."""
    return [f"--focus={suite.focus}"] + ([f"--skip={suite.skip}"] if suite.skips else [])


def dry_run(bin_path: str, suite: Suite, work: str) -> list[str]:
    """The names of the tests the suite's focus and skips select, from e2e.test's dry run (no cluster needed)."""
    report = os.path.join(work, "dry-run.xml")
    result = subprocess.run([f"{bin_path}/e2e.test", "--ginkgo.dry-run", "--ginkgo.silence-skips",
                             *[f"--ginkgo.{flag[2:]}" for flag in selection(suite)],
                             f"--ginkgo.junit-report={report}", "--provider=skeleton"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"conformance: e2e.test --ginkgo.dry-run failed:\n{result.stdout}{result.stderr}")
    return [c.name for c in parse_junit(report) if c.kind == "It" and c.result == "passed"]


def ginkgo_command(bin_path: str, suite: Suite, procs: int, junit: str, kubeconfig: str) -> list[str]:
    # e2e.test's provider "skeleton" assumes nothing of the cluster (no cloud, no SSH to the nodes); kubectl is the
    # one some tests run (kubectl exec) for their probes.
    return [f"{bin_path}/ginkgo", f"--procs={procs}", f"--timeout={SUITE_TIMEOUT_MINUTES}m", "-v", "--no-color",
            "--silence-skips", *selection(suite), f"--junit-report={junit}", f"{bin_path}/e2e.test", "--",
            f"--kubeconfig={kubeconfig}", "--provider=skeleton", f"--kubectl-path={bin_path}/kubectl"]


def for_terminal(lines: Iterable[str], selected: int) -> Iterator[str]:
    """Ginkgo's verbose output without its per-test blocks ("Timeline >>" ... "<< Timeline", captured output),
    with a count before each finished test's header ("• [12.3 seconds]", "• [FAILED] [12.3 seconds]")."""
    finished, block = 0, None
    for line in lines:
        if block:
            block = None if line.strip() == f"<< {block}" else block
        elif opened := re.fullmatch(r"\s*(\w[\w/ ]*) >>\s*", line):
            block = opened[1]
        elif re.match(r"[•↺] \[", line):
            finished += 1
            yield f"[{finished}/{selected}] {line}"
        else:
            yield line


def run_streaming(cmd: list[str], env: dict, log_path: str, selected: int) -> int:
    """Runs cmd with all its output into log_path and for_terminal() of it on stdout."""
    def logged(lines):
        for line in lines:
            log.write(line)
            yield line

    with open(log_path, "w") as log:
        # A session of its own, so that a hung run is killed whole; Ctrl-C is passed on as an interrupt, after
        # which ginkgo still cleans up and writes its reports.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        watchdog = threading.Timer(SUITE_TIMEOUT_MINUTES * 60 + GRACE_SECONDS, os.killpg, (proc.pid, signal.SIGKILL))
        previous = signal.signal(signal.SIGINT, lambda *_: os.killpg(proc.pid, signal.SIGINT))
        watchdog.start()
        try:
            for line in for_terminal(logged(proc.stdout), selected):
                sys.stdout.write(line)
                sys.stdout.flush()
            return proc.wait()
        finally:
            watchdog.cancel()
            signal.signal(signal.SIGINT, previous)


def versions(bin_path: str, kubeconfig: str) -> dict:
    server = subprocess.run([f"{bin_path}/kubectl", f"--kubeconfig={kubeconfig}", "version", "-o", "json"],
                            capture_output=True, text=True, check=False)
    try:
        server_version = json.loads(server.stdout)["serverVersion"]["gitVersion"]
    except (ValueError, KeyError):
        server_version = "unknown"
    e2e_version = subprocess.run([f"{bin_path}/e2e.test", "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # Changes under the results directory are this run's own.
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!conformance/results"], capture_output=True, text=True, check=True).stdout.strip()
    return {"kubernetes": f"{server_version} (API server), e2e.test {e2e_version}",
            "commit": f"`{commit}`" + (", dirty (uncommitted changes)" if dirty else ", clean")}


def run_suite(suite: Suite, bin_path: str, kubeconfig: str, procs: int, out_dir: str, work: str, env: dict,
              about: dict) -> None:
    started = datetime.datetime.now(datetime.timezone.utc)
    base = os.path.join(out_dir, f"{started:%Y-%m-%d}-{suite.name}")
    xml, log = base + ".xml", base + ".log"
    selected = dry_run(bin_path, suite, work)
    if not selected:
        raise SystemExit(f"conformance: {suite.name}: the focus selects no test in {bin_path}/e2e.test")
    left_out = sorted(set(dry_run(bin_path, dataclasses.replace(suite, skips=()), work)) - set(selected))
    # An earlier report of the same day must not pass for this run's.
    if os.path.exists(xml):
        os.remove(xml)
    cmd = ginkgo_command(bin_path, suite, procs, xml, kubeconfig)
    print(f"conformance: {suite.name}: {len(selected)} tests on {procs} processes, log in {log}", flush=True)
    status = run_streaming(cmd, env, log, len(selected))
    if not os.path.exists(xml):
        raise SystemExit(f"conformance: {suite.name}: ginkgo exited with status {status} and no JUnit report, "
                         f"see {log}")
    trim_junit(xml, selected)
    cases = parse_junit(xml)
    finished = datetime.datetime.now(datetime.timezone.utc)
    seconds = int((finished - started).total_seconds())
    run = {**about, "date": f"{started:%Y-%m-%d}", "started": f"{started:%Y-%m-%d %H:%M} UTC",
           "duration": f"{seconds // 60} min {seconds % 60} s",
           "command": "KUBE_TEST_REPO_LIST=<lab/images.py repo-list> " + shlex.join(cmd),
           "xml": os.path.basename(xml), "log": os.path.basename(log)}
    report = render_report(suite, selected, left_out, cases, run)
    with open(base + ".md", "w") as f:
        f.write(report)
    print(f"conformance: {suite.name}: {TOTALS_RE.search(report)[0].strip('*')}; report in {base}.md", flush=True)
    setup_failures = [c for _node, _count, c in suite_nodes(cases) if c.kind.endswith("BeforeSuite") and c.result in FAILED]
    if setup_failures:
        raise SystemExit(f"conformance: {suite.name}: the suite setup failed, no test ran: {setup_failures[0].message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--kubeconfig", default=DEFAULT_KUBECONFIG)
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--procs", type=int, default=DEFAULT_PROCS, help="ginkgo processes running tests at once")
    args = parser.parse_args()

    bin_path = images.k8s_bin_dir()
    for program in ("e2e.test", "ginkgo", "kubectl"):
        if not os.access(os.path.join(bin_path, program), os.X_OK):
            raise SystemExit(f"conformance: {bin_path}/{program} is missing: run `make kubernetes` (lab/k8s/build.sh)")
    if not os.path.exists(args.kubeconfig):
        raise SystemExit(f"conformance: no kubeconfig at {args.kubeconfig}: bring the lab's cluster up "
                         "(`make demo`) or pass --kubeconfig")
    ready = subprocess.run([f"{bin_path}/kubectl", f"--kubeconfig={args.kubeconfig}", "--request-timeout=10s",
                            "get", "--raw=/readyz"], capture_output=True, text=True, check=False)
    if ready.returncode != 0 or ready.stdout.strip() != "ok":
        raise SystemExit(f"conformance: the API server of {args.kubeconfig} is not ready: "
                         f"{(ready.stderr or ready.stdout).strip()}")

    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    about = versions(bin_path, args.kubeconfig)
    with tempfile.TemporaryDirectory(prefix="sluice-conformance-") as work:
        repo_list = os.path.join(work, "repo-list.yaml")
        with open(repo_list, "w") as f:
            f.write(images.REPO_LIST_YAML)
        env = {**os.environ, "KUBE_TEST_REPO_LIST": repo_list}
        try:
            for name in SUITES if args.suite == "all" else [args.suite]:
                run_suite(SUITES[name], bin_path, args.kubeconfig, args.procs, out_dir, work, env, about)
        finally:
            with open(os.path.join(out_dir, "latest.md"), "w") as f:
                f.write(render_latest(out_dir))


if __name__ == "__main__":
    main()
