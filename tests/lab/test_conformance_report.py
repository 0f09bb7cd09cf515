"""lab/conformance.py without a cluster: its reading of ginkgo v2 JUnit reports, the markdown report, latest.md and
the terminal's view of ginkgo's output; and, once lab/k8s/build.sh has built e2e.test, what the suites' focus and
skips select in its dry run."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import conformance  # noqa: E402
import images  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def read_data(name: str) -> str:
    with open(os.path.join(DATA, name)) as f:
        return f.read()


# What ginkgo v2.21's --junit-report writes for e2e.test (default config: "[<node type>] <spec text> [<labels>]"),
# cut down: suite nodes, a pass, a failure, a suite timeout, an interrupted test, a test that skipped itself, a
# test the focus left out and a selected one that never ran (both plain "skipped").
JUNIT = read_data("ginkgo-junit.xml")
DNS_CLUSTER = "[sig-network] DNS should provide DNS for the cluster [Conformance]"
SERVICE = "[sig-network] Services should serve a basic endpoint from pods [Conformance]"
DNS_SERVICES = "[sig-network] DNS should provide DNS for services [Conformance]"
PROXY = "[sig-network] Proxy version v1 should proxy through a service and a pod | pipes [Conformance]"
HOSTPORT = "[sig-network] HostPort validates that there is no conflict [LinuxOnly] [Conformance]"
INGRESSCLASS = "[sig-network] IngressClass API should support creating IngressClass API operations [Conformance]"
# Selected by the dry run, absent from the run's report (as when the run stopped early).
ENDPOINTSLICE = "[sig-network] EndpointSlice should have Endpoints and EndpointSlices pointing to API Server [Conformance]"
SELECTED = [DNS_CLUSTER, SERVICE, DNS_SERVICES, PROXY, HOSTPORT, INGRESSCLASS, ENDPOINTSLICE]
RESTART = "[sig-network] Services should work after restarting apiserver [Disruptive]"

# A parallel run whose suite setup failed: one setup entry per process, no test entries at all. The first has
# the cause; the others say process #1 failed, coloured despite --no-color (Go's XML writer makes ESC U+FFFD).
FAILED_SETUP_JUNIT = read_data("ginkgo-junit-failed-setup.xml")

RUN = {"date": "2026-12-02", "started": "2026-12-02 10:00 UTC", "duration": "12 min 34 s",
       "kubernetes": "v1.34.4 (API server), e2e.test v1.34.4", "commit": "`abc1234`, clean",
       "command": "ginkgo --procs=4 '--skip=a|b' e2e.test", "xml": "2026-12-02-sig-network.xml",
       "log": "2026-12-02-sig-network.log"}


def junit_file(tmp_path, text: str) -> str:
    path = tmp_path / "report.xml"
    path.write_text(text)
    return str(path)


def table(markdown: str, header: str) -> dict[str, list[str]]:
    """A table of the report as {first cell: the other cells}."""
    rows = {}
    for line in markdown.split(header + "\n")[1].split("\n\n")[0].splitlines()[1:]:
        cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def test_parse_junit_reads_node_types_results_and_messages(tmp_path):
    cases = conformance.parse_junit(junit_file(tmp_path, JUNIT))
    assert [(c.kind, c.name) for c in cases if c.kind != "It"] == [
        ("ReportBeforeSuite", ""), ("SynchronizedBeforeSuite", ""), ("SynchronizedAfterSuite", ""),
        ("ReportAfterSuite", "Kubernetes e2e suite report")]
    tests = {c.name: c for c in cases if c.kind == "It"}
    assert sorted(tests) == sorted([DNS_CLUSTER, SERVICE, DNS_SERVICES, PROXY, HOSTPORT, RESTART, INGRESSCLASS])
    assert (tests[SERVICE].result, tests[SERVICE].seconds) == ("failed", 130.5)
    assert tests[SERVICE].message == ("service is not reachable within 2m0s timeout on endpoint 10.100.3.4:80 "
                                      "over TCP protocol")
    # An empty message attribute: the first line of the body, without ginkgo's "[INTERRUPTED] ".
    assert (tests[PROXY].result, tests[PROXY].message) == ("interrupted", "Interrupted by User")
    assert (tests[HOSTPORT].result, tests[HOSTPORT].message) == ("skipped", "Requires at least 2 nodes (not 1)")
    assert (tests[INGRESSCLASS].result, tests[INGRESSCLASS].message) == ("skipped", "")


def test_trimmed_junit_keeps_suite_entries_and_selected_results_without_their_output(tmp_path):
    path = junit_file(tmp_path, JUNIT)
    full = conformance.parse_junit(path)
    conformance.trim_junit(path, SELECTED)
    trimmed = conformance.parse_junit(path)
    assert trimmed == [c for c in full if c.name != RESTART]
    text = open(path).read()
    assert "system-err" not in text and "service is not reachable within 2m0s" in text
    assert 'tests="10"' in text and 'skipped="2"' in text


def test_without_labels_drops_only_the_label_list_ginkgo_appends():
    assert conformance.without_labels("[sig-network] A b [Conformance] [sig-network, Conformance]") == \
        "[sig-network] A b [Conformance]"
    # Labels of an old-style test that has none of its own tags in the text but the SIG's.
    assert conformance.without_labels("[sig-network] Proxy should proxy logs  [sig-network]") == \
        "[sig-network] Proxy should proxy logs"
    # A spec without labels keeps its last [tag].
    assert conformance.without_labels("a test [Conformance]") == "a test [Conformance]"


def test_report_totals_and_one_row_per_selected_test(tmp_path):
    suite = conformance.SUITES["sig-network"]
    cases = conformance.parse_junit(junit_file(tmp_path, JUNIT))
    markdown = conformance.render_report(suite, SELECTED, [RESTART], cases, RUN)
    assert "**7 tests: 1 passed, 3 failed, 1 skipped, 2 not run**" in markdown
    assert conformance.TOTALS_RE.search(markdown).groups() == ("7", "1", "3", "1", "2")
    rows = table(markdown, "| Test | Result | Time | Failure or reason |")
    # The test the focus left out is no row.
    assert list(rows) == sorted(SELECTED)
    assert rows[DNS_CLUSTER] == ["passed", "12.2 s", ""]
    assert rows[SERVICE] == ["failed", "130.5 s", "service is not reachable within 2m0s timeout on endpoint "
                                                  "10.100.3.4:80 over TCP protocol"]
    assert rows[DNS_SERVICES] == ["failed (timedout)", "600.1 s", "A suite timeout occurred"]
    assert rows[PROXY] == ["failed (interrupted)", "3.0 s", "Interrupted by User"]
    assert rows[HOSTPORT] == ["skipped", "0.4 s", "Requires at least 2 nodes (not 1)"]
    assert rows[INGRESSCLASS] == ["not run", "", ""]
    assert rows[ENDPOINTSLICE] == ["not run", "", ""]
    # Suite nodes are apart from the tests.
    nodes = table(markdown, "| Node | Result | Time | Failure |")
    assert nodes == {"[ReportBeforeSuite]": ["passed", "0.0 s", ""],
                     "[SynchronizedBeforeSuite]": ["passed", "4.5 s", ""],
                     "[SynchronizedAfterSuite]": ["passed", "0.1 s", ""],
                     "[ReportAfterSuite] Kubernetes e2e suite report": ["passed", "0.2 s", ""]}
    # The header, and the runner's skips with the tests each took out.
    assert "| Kubernetes | v1.34.4 (API server), e2e.test v1.34.4 |" in markdown
    assert "| Focus | `\\[sig-network\\].*\\[Conformance\\]` |" in markdown
    assert "| Skip | `\\[Disruptive\\]` |" in markdown
    assert "| Command | `ginkgo --procs=4 '--skip=a\\|b' e2e.test` |" in markdown
    assert "[2026-12-02-sig-network.xml](2026-12-02-sig-network.xml)" in markdown
    assert f"- `\\[Disruptive\\]` (1 test): {conformance.DISRUPTIVE[1]}\n  - {RESTART}\n" in markdown


def test_failed_parallel_setup_shows_its_cause_once_and_no_test_ran(tmp_path):
    cases = conformance.parse_junit(junit_file(tmp_path, FAILED_SETUP_JUNIT))
    markdown = conformance.render_report(conformance.SUITES["netpol"], ["a", "b"], [], cases, RUN)
    assert "**2 tests: 0 passed, 0 failed, 0 skipped, 2 not run**" in markdown
    nodes = table(markdown, "| Node | Result | Time | Failure |")
    assert nodes["[SynchronizedBeforeSuite] (×4, one per process)"] == [
        "failed", "60.0 s", 'Get "https://10.0.0.1:6443/api/v1/nodes": dial tcp 10.0.0.1:6443: connect: '
                            'connection refused']
    assert nodes["[SynchronizedAfterSuite] (×4, one per process)"][0] == "passed"
    others = [c for c in cases if c.result == "failed"][1:]
    assert {c.message for c in others} == {"SynchronizedBeforeSuite failed on Ginkgo parallel process #1"}
    assert "- `\\[Feature:SCTPConnectivity\\]` (0 tests): " in markdown


def test_latest_indexes_the_newest_report_of_each_suite(tmp_path):
    cases = conformance.parse_junit(junit_file(tmp_path, JUNIT))
    for date, suite, selected in (("2026-11-30", "sig-network", [DNS_CLUSTER]),
                                  ("2026-12-02", "sig-network", SELECTED),
                                  ("2026-12-01", "netpol", [SERVICE, HOSTPORT])):
        report = conformance.render_report(conformance.SUITES[suite], selected, [], cases, RUN)
        (tmp_path / f"{date}-{suite}.md").write_text(report)
    (tmp_path / "2026-12-03-bench.md").write_text("not a conformance report")
    latest = conformance.render_latest(str(tmp_path))
    assert [line for line in latest.splitlines() if line.startswith(("| sig-network", "| netpol"))] == [
        "| sig-network | 2026-12-02 | 7 | 1 | 3 | 1 | 2 | [2026-12-02-sig-network.md](2026-12-02-sig-network.md) |",
        # The tests with a result of their own count even where the dry run did not list them.
        "| netpol | 2026-12-01 | 5 | 1 | 3 | 1 | 0 | [2026-12-01-netpol.md](2026-12-01-netpol.md) |",
    ]
    assert "bench" not in latest


def test_terminal_gets_ginkgo_output_without_timelines_and_counts_finished_tests():
    # ginkgo -v --procs=4: each finished test's header, its spec text and location, its timeline.
    output = """\
Will run 45 of 7144 specs
Running in parallel across 4 processes
------------------------------
[SynchronizedBeforeSuite] PASSED [4.512 seconds]
[SynchronizedBeforeSuite]\x20
k8s.io/kubernetes@v1.34.4/test/e2e/e2e.go:69

  Timeline >>
  I1202 02:34:45.984630 19772 util.go:454] >>> kubeConfig: /var/lib/sluice-lab/sllab/kube/admin.conf
  << Timeline
------------------------------
• [12.250 seconds]
[sig-network] DNS should provide DNS for the cluster [Conformance] [sig-network, Conformance]
k8s.io/kubernetes@v1.34.4/test/e2e/network/dns.go:54

  Captured StdOut/StdErr Output >>
  << not the end of the block
  << Captured StdOut/StdErr Output

  Timeline >>
  STEP: Creating a kubernetes client
  << Timeline
------------------------------
• [FAILED] [130.500 seconds]
[sig-network] Services [It] should serve a basic endpoint from pods [Conformance] [sig-network, Conformance]
k8s.io/kubernetes@v1.34.4/test/e2e/network/service.go:740

  Timeline >>
  STEP: creating service
  << Timeline

  [FAILED] service is not reachable within 2m0s timeout on endpoint 10.100.3.4:80 over TCP protocol
  In [It] at: k8s.io/kubernetes@v1.34.4/test/e2e/network/service.go:760 @ 12/02/26 10:02:10.5
------------------------------
"""
    shown = "".join(conformance.for_terminal(output.splitlines(keepends=True), 45))
    assert "STEP" not in shown and "kubeConfig" not in shown and "not the end" not in shown
    assert "[1/45] • [12.250 seconds]\n[sig-network] DNS should provide DNS for the cluster" in shown
    assert "[2/45] • [FAILED] [130.500 seconds]\n[sig-network] Services [It] should serve" in shown
    assert "  [FAILED] service is not reachable within 2m0s" in shown
    assert shown.startswith("Will run 45 of 7144 specs\nRunning in parallel across 4 processes\n")


# --- the real e2e.test, dry run ------------------------------------------------------------------------------

E2E_BIN = images.k8s_bin_dir()
needs_e2e = pytest.mark.skipif(not os.access(os.path.join(E2E_BIN, "e2e.test"), os.X_OK),
                               reason=f"{E2E_BIN}/e2e.test is not built (make kubernetes)")


@needs_e2e
def test_sig_network_focus_selects_conformance_and_skips_disruptive(tmp_path):
    suite = conformance.SUITES["sig-network"]
    selected = conformance.dry_run(E2E_BIN, suite, str(tmp_path))
    assert SERVICE in selected
    assert all(n.startswith("[sig-network] ") and "[Conformance]" in n for n in selected)
    # No [Disruptive] test is [Conformance]: widen the focus to all Services tests for one that the skip must drop.
    services = dataclasses.replace(suite, focus=r"\[sig-network\] Services")
    assert RESTART in conformance.dry_run(E2E_BIN, dataclasses.replace(services, skips=()), str(tmp_path))
    with_skips = conformance.dry_run(E2E_BIN, services, str(tmp_path))
    assert SERVICE in with_skips and RESTART not in with_skips


@needs_e2e
def test_netpol_focus_selects_tcp_udp_and_api_tests_but_not_sctp(tmp_path):
    selected = conformance.dry_run(E2E_BIN, conformance.SUITES["netpol"], str(tmp_path))
    assert ("[sig-network] Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' "
            "policy [Feature:NetworkPolicy]") in selected
    assert ("[sig-network] Netpol [LinuxOnly] NetworkPolicy between server and client using UDP should support a "
            "'default-deny-ingress' policy [Feature:NetworkPolicy]") in selected
    assert "[sig-network] Netpol API should support creating NetworkPolicy API operations" in selected
    assert not any("[Feature:SCTPConnectivity]" in n for n in selected)
    # Nothing that names network policies is outside the focus.
    everything = conformance.Suite("any", "Netpol|NetworkPolicy", ())
    unskipped = dataclasses.replace(conformance.SUITES["netpol"], skips=())
    assert set(conformance.dry_run(E2E_BIN, everything, str(tmp_path))) == \
        set(conformance.dry_run(E2E_BIN, unskipped, str(tmp_path)))
