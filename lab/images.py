"""Container images for the lab's Kubernetes cluster and the upstream e2e tests, packed on this machine.

No image registry is reachable here, so each image the cluster (pause, CoreDNS) and the e2e tests (agnhost,
busybox, jessie-dnsutils, nginx, httpd) need is written by this file as an OCI image-layout archive that
containerd 1.6 imports with `ctr -n k8s.io images import FILE`. Names are under the registry `sluice.lab` and
keep upstream's repository paths and tags; REPO_LIST_YAML points e2e.test's registries there
(KUBE_TEST_REPO_LIST).

The programs come from lab/k8s/build.sh's bin directory (agnhost, coredns, pause), the userland from this
machine's Debian packages (DEBIAN_PACKAGES): each binary with its shared-library closure and the dynamic
loader, busybox for sh and the small tools. Debian's `busybox`, not `busybox-static`: the static build's sh
runs its own applets ahead of PATH, so `nc`, `ip` or `nslookup` in a test's `sh -c` would not be the real
ones. An archive is deterministic (the same inputs give the same bytes) and is rebuilt only when its inputs
change. The archives go next to the bin directory, in ../images.

    images.py build             build what changed, print the archive paths
    images.py list              image name and archive path
    images.py repo-list PATH    write the e2e repo list

Standard library only, like lab.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REGISTRY = "sluice.lab"
E2E = f"{REGISTRY}/e2e-test-images"
# The Debian packages whose files the images copy (bash and libc-bin's getent are always installed).
DEBIAN_PACKAGES = ("busybox", "bind9-dnsutils", "curl", "netcat-openbsd", "iproute2", "iperf", "nginx", "wget")
K8S_PROGRAMS = ("agnhost", "coredns", "pause")
# 1980-01-01, the date build.sh stamps into the programs and the Makefile's SOURCE_DATE_EPOCH.
EPOCH = 315532800
CREATED = "1980-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# e2e.test's registries (RegistryList in test/utils/image/manifest.go), all under sluice.lab. The ones no
# image is made for (private, authenticated, invalid) fail to pull as they do upstream without credentials.
REPO_LIST_YAML = f"""\
gcAuthenticatedRegistry: {REGISTRY}/authenticated-image-pulling
promoterE2eRegistry: {E2E}
buildImageRegistry: {REGISTRY}/build-image
invalidRegistry: {REGISTRY}/invalid
gcEtcdRegistry: {REGISTRY}
gcRegistry: {REGISTRY}
sigStorageRegistry: {REGISTRY}/sig-storage
privateRegistry: {REGISTRY}/k8s-authenticated-test
dockerLibraryRegistry: {REGISTRY}/library
cloudProviderGcpRegistry: {REGISTRY}/cloud-provider-gcp
"""

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
# glibc (getent, curl, nginx) reads it; its files and dns modules are built into libc.so.6.
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
# The runtime bind-mounts /etc/hosts and /etc/resolv.conf over these in a pod; a bare `ctr run` keeps this one.
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

NGINX_CONF = """\
user nginx;
worker_processes 1;
error_log /dev/stderr notice;
pid /run/nginx.pid;
events {
    worker_connections 1024;
}
http {
    include mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    server {
        listen 80;
        root /usr/share/nginx/html;
        index index.html;
    }
}
"""
NGINX_INDEX = "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\n" \
              "<body><h1>Welcome to nginx!</h1></body></html>\n"
# Upstream's htdocs/index.html: kubectl's e2e tests look for "It works!".
HTTPD_INDEX = "<html><body><h1>It works!</h1></body></html>\n"
# Busybox's httpd has no SIGTERM handler, and a container's PID 1 ignores signals it does not handle: run it
# as a child of a shell that stops it, so a pod stops at once instead of at the end of its grace period.
HTTPD_FOREGROUND = """\
#!/bin/sh
httpd -f -p 80 -h /usr/local/apache2/htdocs &
trap 'kill $!; exit 0' TERM INT
wait
"""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One path of a layer: a directory, a file (the bytes of `source` on this machine, or `data`), a symlink."""
    kind: str
    mode: int = 0o755
    source: str = ""
    data: bytes = b""
    target: str = ""
    owner: int = 0


Layer = dict[str, Entry]  # absolute path in the image -> what is there


@dataclasses.dataclass
class Image:
    layers: list[Layer]
    config: dict  # the OCI config's "config": Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, StopSignal


def host_file(path: str) -> Entry:
    if not os.path.exists(path):
        raise SystemExit(f"images: {path} is missing: install the Debian packages {' '.join(DEBIAN_PACKAGES)} "
                         f"and run lab/k8s/build.sh")
    real = os.path.realpath(path)
    return Entry("file", 0o755 if os.access(real, os.X_OK) else 0o644, source=real)


def text(content: str, mode: int = 0o644) -> Entry:
    return Entry("file", mode, data=content.encode())


def symlink(target: str) -> Entry:
    return Entry("symlink", 0o777, target=target)


def directory(mode: int = 0o755, owner: int = 0) -> Entry:
    return Entry("dir", mode, owner=owner)


def shared_libraries(binary: str) -> list[str]:
    """The libraries `binary` loads and the dynamic loader, as the paths ldd resolves them to."""
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    paths = []
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words else words[0]
        if path.startswith("/"):
            paths.append(path)
    return paths


def debian_tools(tools: dict[str, str]) -> Layer:
    """Each host binary (image path -> host path) with its shared-library closure at the same paths."""
    layer = {}
    for image_path, host_path in tools.items():
        layer[image_path] = host_file(host_path)
        layer.update({lib: host_file(lib) for lib in shared_libraries(host_path)})
    return layer


def accounts(users: str = "", groups: str = "") -> Layer:
    return {"/etc/passwd": text(PASSWD + users), "/etc/group": text(GROUP + groups)}


def busybox() -> Layer:
    """busybox with a link per applet in /bin, as the official busybox image has them, and the files and
    directories a container expects. Debian tools in later layers sit in /usr/bin, ahead in PATH."""
    applets = subprocess.run(["/bin/busybox", "--list"], check=True, capture_output=True, text=True).stdout.split()
    layer = {f"/bin/{applet}": symlink("busybox") for applet in applets}
    layer.update({
        **debian_tools({"/bin/busybox": "/bin/busybox",
                        # Debian's busybox wget crashes (SIGSEGV) whenever given -T, which the e2e tests
                        # pass to wget in their exec pods: GNU wget, same options, ahead in PATH.
                        "/usr/bin/wget": "/usr/bin/wget"}),
        "/etc/nsswitch.conf": text(NSSWITCH),
        "/etc/hosts": text(HOSTS),
        "/root": directory(0o700),
        "/tmp": directory(0o1777),
        "/var/tmp": directory(0o1777),
        **accounts(),
    })
    return layer


def dns_tools() -> Layer:
    """What DNS tests run in agnhost and jessie-dnsutils (test/e2e/network/dns_common.go probes)."""
    return debian_tools({"/usr/bin/dig": "/usr/bin/dig", "/usr/bin/nslookup": "/usr/bin/nslookup",
                         "/usr/bin/host": "/usr/bin/host", "/usr/bin/getent": "/usr/bin/getent",
                         "/bin/bash": "/bin/bash"})


def coredns_layer(bin_dir: str) -> Layer:
    return {"/coredns": host_file(f"{bin_dir}/coredns")}


def k8s_source() -> str:
    """The Kubernetes module's source tree, at the version lab/k8s/kubernetes pins."""
    env = dict(os.environ, PATH=f"/usr/local/go/bin:{os.environ.get('PATH', '')}", GOFLAGS="-mod=readonly")
    return subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"], cwd=f"{HERE}/k8s/kubernetes",
                          env=env, check=True, capture_output=True, text=True).stdout.strip()


def pause(bin_dir: str) -> Image:
    # As build/pause/Dockerfile: the static binary alone, run as 65535.
    return Image([{"/pause": host_file(f"{bin_dir}/pause")}],
                 {"Entrypoint": ["/pause"], "User": "65535:65535", "Env": [PATH_ENV]})


def coredns(bin_dir: str) -> Image:
    # Upstream runs it as nonroot with cap_net_bind_service set on the file; without file capabilities in
    # the layer it stays root to bind port 53.
    return Image([coredns_layer(bin_dir)],
                 {"Entrypoint": ["/coredns"], "Env": [PATH_ENV], "ExposedPorts": {"53/tcp": {}, "53/udp": {}}})


def agnhost(bin_dir: str) -> Image:
    # test/images/agnhost/Dockerfile: alpine with bind-tools curl netcat-openbsd iproute2 iperf bash, coredns,
    # porter's certificate, /uploads for netexec, the agnhost-2 link and the user and group tests look for.
    net_tools = debian_tools({"/usr/bin/curl": "/usr/bin/curl", "/usr/bin/nc": "/usr/bin/nc.openbsd",
                              "/usr/bin/ip": "/usr/bin/ip", "/usr/bin/ss": "/usr/bin/ss",
                              "/usr/bin/iperf": "/usr/bin/iperf"})
    porter = f"{k8s_source()}/test/images/agnhost/porter"
    own = {
        "/agnhost": host_file(f"{bin_dir}/agnhost"),
        "/agnhost-2": symlink("agnhost"),
        "/localhost.crt": host_file(f"{porter}/localhost.crt"),
        "/localhost.key": host_file(f"{porter}/localhost.key"),
        "/uploads": directory(),
        "/usr/local/bin/iperf": symlink("/usr/bin/iperf"),
        "/home/user-defined-in-image": directory(owner=1000),
        **accounts("user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n",
                   "user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n"),
    }
    ports = {f"{port}/tcp": {} for port in (80, 8080, 8081, 9376, 5000)}
    return Image([busybox(), dns_tools(), net_tools, coredns_layer(bin_dir), own],
                 {"Entrypoint": ["/agnhost"], "Cmd": ["pause"], "Env": [PATH_ENV], "ExposedPorts": ports})


def busybox_image(bin_dir: str) -> Image:
    # Upstream mirrors docker.io's busybox (1.37.0); this is Debian's (1.35.0).
    return Image([busybox()], {"Cmd": ["sh"], "Env": [PATH_ENV]})


def jessie_dnsutils(bin_dir: str) -> Image:
    # test/images/jessie-dnsutils/Dockerfile: debian with dnsutils, and coredns.
    return Image([busybox(), dns_tools(), coredns_layer(bin_dir)], {"Cmd": ["/bin/bash"], "Env": [PATH_ENV]})


def nginx(bin_dir: str) -> Image:
    # nginx:1.27-alpine's layout: /usr/share/nginx/html, logs linked to the container's output, workers as
    # user nginx (101). Debian's build keeps its temporary files under /var/lib/nginx, which it creates.
    own = {
        **debian_tools({"/usr/sbin/nginx": "/usr/sbin/nginx"}),
        "/etc/nginx/nginx.conf": text(NGINX_CONF),
        "/etc/nginx/mime.types": host_file("/etc/nginx/mime.types"),
        "/usr/share/nginx/html/index.html": text(NGINX_INDEX),
        "/var/lib/nginx": directory(),
        "/var/log/nginx/access.log": symlink("/dev/stdout"),
        "/var/log/nginx/error.log": symlink("/dev/stderr"),
        "/run": directory(),
        **accounts("nginx:x:101:101:nginx:/nonexistent:/bin/false\n", "nginx:x:101:\n"),
    }
    return Image([busybox(), own], {"Cmd": ["nginx", "-g", "daemon off;"], "Env": [PATH_ENV],
                                    "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGQUIT"})


def httpd(bin_dir: str) -> Image:
    # Busybox's httpd stands in for Apache (whose Debian build needs its module tree and a config of its own):
    # it serves upstream's htdocs directory on port 80, where the statefulset tests move index.html away and
    # back to flip readiness.
    own = {
        "/usr/local/apache2/htdocs/index.html": text(HTTPD_INDEX),
        "/usr/local/bin/httpd-foreground": text(HTTPD_FOREGROUND, 0o755),
    }
    return Image([busybox(), own], {"Cmd": ["httpd-foreground"], "WorkingDir": "/usr/local/apache2",
                                    "Env": [PATH_ENV, "HTTPD_PREFIX=/usr/local/apache2"],
                                    "ExposedPorts": {"80/tcp": {}}})


PAUSE = f"{REGISTRY}/pause:3.10.1"
COREDNS = f"{REGISTRY}/coredns:v1.12.3"
AGNHOST = f"{E2E}/agnhost:2.56"
IMAGES = {
    PAUSE: pause,
    COREDNS: coredns,
    AGNHOST: agnhost,
    f"{E2E}/busybox:1.37.0-1": busybox_image,
    f"{E2E}/jessie-dnsutils:1.7": jessie_dnsutils,
    f"{E2E}/nginx:1.14-4": nginx,
    f"{E2E}/httpd:2.4.38-4": httpd,
}


class Hashing:
    """A write-only file that passes bytes on to `out` and hashes them."""

    def __init__(self, out):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def with_parents(layer: Layer) -> Layer:
    full = dict(layer)
    for path in layer:
        parent = os.path.dirname(path)
        while parent != "/":
            full.setdefault(parent, directory())
            parent = os.path.dirname(parent)
    return full


def write_layer(layer: Layer, out) -> tuple[str, str, int]:
    """The layer as a gzipped tar into `out`: (diff_id, digest, size). Sorted entries, fixed times and owners."""
    blob = Hashing(out)
    # Level 6 (gzip's own default): as small as 9 here (Go binaries, shared libraries) in less than half the time.
    with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=blob, mtime=0) as gz:
        diff = Hashing(gz)
        with tarfile.open(fileobj=diff, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path, entry in sorted(with_parents(layer).items()):
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mode, info.mtime, info.uid, info.gid = entry.mode, EPOCH, entry.owner, entry.owner
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, entry.target
                    tar.addfile(info)
                elif entry.source:
                    with open(entry.source, "rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)
                else:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
    return diff.digest(), blob.digest(), blob.size


def json_bytes(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


def write_archive(name: str, image: Image, path: str) -> None:
    """The OCI image layout of `image` as one tar at `path`, its manifest annotated with `name`."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".build-") as tmp:
        blobs: dict[str, str | bytes] = {}  # digest -> a file holding it, or its bytes
        layers, diff_ids = [], []
        for i, layer in enumerate(image.layers):
            layer_path = os.path.join(tmp, f"layer{i}")
            with open(layer_path, "wb") as f:
                diff_id, digest, size = write_layer(layer, f)
            blobs[digest] = layer_path
            diff_ids.append(diff_id)
            layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest,
                           "size": size})
        config = json_bytes({"architecture": "amd64", "os": "linux", "created": CREATED, "config": image.config,
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}})
        config_desc = descriptor("application/vnd.oci.image.config.v1+json", config)
        manifest = json_bytes({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": config_desc, "layers": layers})
        manifest_desc = descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
        blobs[config_desc["digest"]], blobs[manifest_desc["digest"]] = config, manifest
        # containerd names the imported image after io.containerd.image.name; ref.name is the tag, as
        # containerd's own exporter writes it.
        manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
        manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
        files = {"oci-layout": json_bytes({"imageLayoutVersion": "1.0.0"}),
                 "index.json": json_bytes({"schemaVersion": 2, "manifests": [manifest_desc],
                                           "mediaType": "application/vnd.oci.image.index.v1+json"})}
        files.update({f"blobs/sha256/{digest.split(':')[1]}": blob for digest, blob in blobs.items()})
        partial = os.path.join(tmp, "archive.tar")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for member, content in sorted(files.items()):
                info = tarfile.TarInfo(member)
                info.mode, info.mtime = 0o644, EPOCH
                if isinstance(content, bytes):
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
                else:
                    info.size = os.path.getsize(content)
                    with open(content, "rb") as f:
                        tar.addfile(info, f)
        os.replace(partial, path)


def inputs_key(name: str, image: Image) -> str:
    """What the archive is made of: this file, the image's config and every entry, a host file by its size and
    modification time."""
    h = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    h.update(json_bytes([name, image.config]))
    for layer in image.layers:
        for path, entry in sorted(layer.items()):
            stat = os.stat(entry.source) if entry.source else None
            h.update(repr((path, entry, stat and (stat.st_size, stat.st_mtime_ns))).encode())
    return h.hexdigest()


def k8s_bin_dir() -> str:
    return subprocess.run([f"{HERE}/k8s/build.sh", "--print"], check=True, capture_output=True,
                          text=True).stdout.strip()


def default_images_dir() -> str:
    return os.path.join(os.path.dirname(k8s_bin_dir()), "images")


def archive_path(images_dir: str, name: str) -> str:
    return os.path.join(images_dir, name.removeprefix(f"{REGISTRY}/").replace("/", "_").replace(":", "_") + ".tar")


def build_all(images_dir: str | None = None) -> dict[str, str]:
    """Every image's archive (full image name -> path), built where its inputs changed."""
    bin_dir = k8s_bin_dir()
    images_dir = images_dir or default_images_dir()
    os.makedirs(images_dir, exist_ok=True)
    archives = {}
    # One builder at a time: the lab's nodes and a test run may ask for the same archives at once.
    with open(os.path.join(images_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, make in IMAGES.items():
            path = archive_path(images_dir, name)
            image = make(bin_dir)
            key = inputs_key(name, image)
            key_path = os.path.join(images_dir, f".{os.path.basename(path)}.key")
            if not os.path.exists(path) or read_text(key_path) != key:
                write_archive(name, image, path)
                with open(key_path, "w") as f:
                    f.write(key)
            archives[name] = path
    return archives


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the archives whose inputs changed, print their paths")
    sub.add_parser("list", help="image name and archive path")
    repo_list = sub.add_parser("repo-list", help="write e2e.test's repo list (KUBE_TEST_REPO_LIST)")
    repo_list.add_argument("path")
    args = parser.parse_args()
    if args.command == "build":
        for path in build_all().values():
            print(path)
    elif args.command == "list":
        images_dir = default_images_dir()
        for name in IMAGES:
            path = archive_path(images_dir, name)
            print(name, path if os.path.exists(path) else f"{path} (not built)")
    else:
        with open(args.path, "w") as f:
            f.write(REPO_LIST_YAML)


if __name__ == "__main__":
    main()
