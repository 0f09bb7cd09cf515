"""lab/images.py: its archives import into a private containerd (Debian's 1.6, as the lab nodes run) under their
full names, the same inputs give the same bytes, and a container of every image runs a real command."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import images  # noqa: E402

pytestmark = pytest.mark.kernel

# image -> (command, what its output must contain)
COMMANDS = {
    f"{images.REGISTRY}/pause:3.10.1": (["/pause", "-v"], ["pause.c v1.34.4"]),
    f"{images.REGISTRY}/coredns:v1.12.3": (["/coredns", "-version"], ["CoreDNS-1.12.3"]),
    f"{images.E2E}/busybox:1.37.0-1": (["sh", "-c", "echo ok"], ["ok"]),
    f"{images.E2E}/jessie-dnsutils:1.7": (
        # dns_common.go's probe loop: dig, getent, seq, test, echo into /results.
        ["sh", "-c", "dig -v 2>&1; getent hosts localhost; mkdir /results; "
                     "for i in $(seq 1 2); do test -n x && echo OK > /results/$i; done; cat /results/2; ls /coredns"],
        ["DiG 9.", "localhost", "OK", "/coredns"]),
    f"{images.E2E}/agnhost:2.56": (["/agnhost", "--help"], ["netexec", "porter"]),
}
# What network e2e tests run in agnhost containers with `sh -c`, each the real program rather than busybox's.
AGNHOST_TOOLS = ("dig -v 2>&1; curl --version; nc -h 2>&1; ip -V; ss -V; iperf -v 2>&1; nslookup -version 2>&1; "
                 "getent hosts localhost; bash -c 'echo bash $BASH_VERSION'; id user-defined-in-image; "
                 "echo hostName | timeout 2 nc -w 1 -u 127.0.0.1 9; wget --help 2>&1 | head -1; "
                 # The e2e exec pods' `wget -T`: a refused connection is a failure (exit 4), not a crash.
                 "wget -q -T 1 -O- http://127.0.0.1:9/; echo wget exit $?; "
                 "ls /agnhost-2 /coredns /localhost.crt /localhost.key /uploads /usr/local/bin/iperf")
AGNHOST_TOOLS_OUTPUT = ["DiG 9.", "curl 7.", "OpenBSD netcat", "iproute2", "ss utility", "iperf version 2",
                        "nslookup 9.", "localhost", "bash 5.", "groups=1000(user-defined-in-image),50000(",
                        "GNU Wget", "wget exit 4", "/agnhost-2", "/localhost.key"]
# Web servers: image -> what the page at / says.
WEB = {f"{images.E2E}/nginx:1.14-4": "Welcome to nginx!", f"{images.E2E}/httpd:2.4.38-4": "It works!"}


def container_id() -> str:
    return f"sltest-{uuid.uuid4().hex[:8]}"


def get_page(netns: str) -> tuple[str, str]:
    """(status, body) of http://127.0.0.1:80/ from inside `netns`."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "curl", "-s", "-w", "\n%{http_code}",
                          "http://127.0.0.1:80/"], check=False, capture_output=True, text=True).stdout
    body, _newline, status = out.rpartition("\n")
    return status, body


def manifest_digest(archive: str) -> str:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("index.json"))["manifests"][0]["digest"]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def archives() -> dict[str, str]:
    bin_dir = images.k8s_bin_dir()
    missing = [p for p in images.K8S_PROGRAMS if not os.access(os.path.join(bin_dir, p), os.X_OK)]
    if missing:
        pytest.skip(f"{bin_dir} lacks {', '.join(missing)}: lab/k8s/build.sh has not run")
    return images.build_all()


class Containerd:
    """`ctr` against a private containerd; containers run in k8s.io, where the images are imported."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.address = os.path.join(tmp, "containerd.sock")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["ctr", "--address", self.address, "-n", "k8s.io", *args], check=False,
                                capture_output=True, text=True, timeout=120)
        if check:
            assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def run(self, cid: str, image: str, *argv: str, netns: str = "") -> subprocess.CompletedProcess:
        """`ctr run` container `cid` of `image`: to its end on the host's network, or detached in `netns`. A
        cgroup of its own (no namespace-named parent left behind), runc's state and the FIFOs in self.tmp."""
        where = ["--detach", "--with-ns", f"network:/run/netns/{netns}"] if netns else ["--rm", "--net-host"]
        return self.ctr("run", *where, "--cgroup", f"/{cid}", "--runc-root", os.path.join(self.tmp, "runc"),
                        "--fifo-dir", os.path.join(self.tmp, "fifo"), image, cid, *argv, check=False)

    def remove_containers(self) -> None:
        for cid in self.ctr("containers", "list", "--quiet").stdout.split():
            self.ctr("tasks", "delete", "--force", cid, check=False)
            self.ctr("containers", "delete", cid, check=False)


@pytest.fixture(scope="module")
def containerd():
    tmp = tempfile.mkdtemp(prefix="sltest-containerd-")
    config = os.path.join(tmp, "config.toml")
    with open(config, "w") as f:
        # No CRI: `ctr run` needs none of it (the lab's nodes keep it, with restrict_oom_score_adj).
        f.write(f'version = 2\nroot = "{tmp}/root"\nstate = "{tmp}/state"\n'
                f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{tmp}/containerd.sock"\n'
                f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{tmp}/opt"\n')
    log_path = os.path.join(tmp, "containerd.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["containerd", "--config", config], stdout=log, stderr=subprocess.STDOUT)
    client = Containerd(tmp)
    try:
        deadline = time.monotonic() + 20
        while client.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                with open(log_path) as f:
                    pytest.fail(f"containerd did not start:\n{f.read()[-3000:]}")
            time.sleep(0.2)
        yield client
    finally:
        if proc.poll() is None:
            client.remove_containers()
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # A container's rootfs stays mounted if containerd died under it.
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f if line.split()[4].startswith(tmp + "/")]
        for mountpoint in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False)
        shutil.rmtree(tmp)
        # containerd 1.6 puts its shims' sockets in /run/containerd/s whatever its config says.
        for directory in ("/run/containerd/s", "/run/containerd"):
            try:
                os.rmdir(directory)
            except OSError:
                pass


@pytest.fixture(scope="module")
def imported(archives, containerd) -> Containerd:
    for archive in archives.values():
        containerd.ctr("images", "import", archive)
    return containerd


@pytest.fixture
def netns():
    """A fresh network namespace with lo up, always deleted."""
    name = f"sltest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_repo_list_maps_every_registry_e2e_knows():
    with open(f"{images.k8s_source()}/test/utils/image/manifest.go") as f:
        registry_list = f.read().split("type RegistryList struct {")[1].split("}")[0]
    with tempfile.TemporaryDirectory(prefix="sltest-") as tmp:
        path = os.path.join(tmp, "repo-list.yaml")
        subprocess.run([sys.executable, os.path.join(ROOT, "lab", "images.py"), "repo-list", path], check=True)
        with open(path) as f:
            mapped = dict(line.split(": ") for line in f.read().splitlines())
    assert set(mapped) == set(re.findall(r'yaml:"(\w+)"', registry_list))
    assert all(registry.startswith(images.REGISTRY) for registry in mapped.values())


def test_every_image_is_listed_under_its_full_name(archives, imported):
    listed = {}
    for line in imported.ctr("images", "list").stdout.splitlines()[1:]:
        ref, _type, digest = line.split()[:3]
        listed[ref] = digest
    assert set(archives) == set(images.IMAGES)
    for name, archive in archives.items():
        assert listed.get(name) == manifest_digest(archive), name


def test_same_inputs_give_the_same_archives(archives):
    with tempfile.TemporaryDirectory(prefix="sltest-images-") as again:
        rebuilt = images.build_all(again)
        for name, archive in archives.items():
            assert manifest_digest(rebuilt[name]) == manifest_digest(archive), name
            assert file_digest(rebuilt[name]) == file_digest(archive), name


def test_cached_archives_are_not_rebuilt(archives):
    mtimes = {path: os.stat(path).st_mtime_ns for path in archives.values()}
    assert images.build_all() == archives
    assert {path: os.stat(path).st_mtime_ns for path in archives.values()} == mtimes


@pytest.mark.parametrize("image", COMMANDS)
def test_image_runs_its_command(imported, image):
    argv, expected = COMMANDS[image]
    result = imported.run(container_id(), image, *argv)
    assert result.returncode == 0, result.stdout + result.stderr
    for text in expected:
        assert text in result.stdout, result.stdout + result.stderr


def test_agnhost_has_the_tools_e2e_tests_run(imported):
    result = imported.run(container_id(), f"{images.E2E}/agnhost:2.56", "sh", "-c", AGNHOST_TOOLS)
    assert result.returncode == 0, result.stdout + result.stderr
    for text in AGNHOST_TOOLS_OUTPUT:
        assert text in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("image", WEB)
def test_web_server_serves_port_80_and_stops_on_its_stop_signal(imported, netns, image):
    cid = container_id()
    try:
        started = imported.run(cid, image, netns=netns)
        assert started.returncode == 0, started.stdout + started.stderr
        for _attempt in range(100):
            status, body = get_page(netns)
            if status == "200":
                break
            time.sleep(0.2)
        assert status == "200" and WEB[image] in body, (status, body)
        # The image's stop signal (what deleting a pod sends) ends it at once, not after a grace period.
        imported.ctr("tasks", "kill", cid)
        for _attempt in range(50):
            if "STOPPED" in imported.ctr("tasks", "list").stdout:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"{image} ignored its stop signal")
    finally:
        imported.remove_containers()
