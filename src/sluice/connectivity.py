"""Connectivity checks on a node (`playbooks/verify.yml` drives them across nodes).

    sluice connectivity pod-add NAME --ip IP [--cnitool PATH]   a test pod through the CNI plugin
    sluice connectivity pod-del NAME [--cnitool PATH]           and gone again
    sluice connectivity probe {tcp,udp,sockmap} DST PORT [--netns PATH] [--source IP] [--count N]

A test pod is a network namespace /run/netns/NAME wired by a real CNI client
(libcni's cnitool: the installed conflist, CNI_PATH, results cached by libcni),
asking for its address through the `ips` capability, with an echo server in it:
TCP 8080 and UDP 5353 answer with the pod's name and address. A probe prints one
JSON object: what answered, from which address, or the error. Standard library
only: probes also run on the controller, inside the lab's external namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

TCP_PORT = 8080
UDP_PORT = 5353
STATE_DIR = "/run/sluice/connectivity"
DEFAULT_CNITOOL = "/opt/sluice/verify/cnitool"
CNI_ENV = {"NETCONFPATH": "/etc/cni/net.d", "CNI_PATH": "/opt/cni/bin", "CNI_IFNAME": "eth0"}
PROBE_TIMEOUT = 3.0
SOCKMAP_BYTES = 1 << 20


class ConnectivityError(Exception):
    """A pod or probe could not be set up; the message says which and why."""


# ---- test pods -------------------------------------------------------------------------------

def _netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ConnectivityError(f"pod name {name!r} is not a valid network namespace name")
    return f"/run/netns/{name}"


def _run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConnectivityError(f"{argv[0]}: {e}") from None
    if result.returncode != 0:
        raise ConnectivityError(f"{' '.join(argv)} failed ({result.returncode}): "
                                f"{(result.stderr or result.stdout).strip()}")
    return result


def _cni(cnitool: str, command: str, network: str, netns: str, ip: str | None = None) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **CNI_ENV}
    if ip:
        env["CAP_ARGS"] = json.dumps({"ips": [f"{ip}/32"]})
    return _run([cnitool, command, network, netns], env).stdout


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _server_pid(name: str) -> int | None:
    """The pod's echo server, if the recorded PID is still that process."""
    try:
        with open(os.path.join(STATE_DIR, f"{name}.pid")) as f:
            pid, start = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return None
    return pid if _start_time(pid) == start else None


def pod_add(name: str, ip: str, cnitool: str, network: str) -> dict:
    """Create the pod (idempotent): namespace, CNI ADD with the requested address, echo server."""
    netns = _netns_path(name)
    changed = False
    if not os.path.exists(netns):
        _run(["ip", "netns", "add", name])
        changed = True
    try:
        result = json.loads(_cni(cnitool, "add", network, netns, ip))
    except (ConnectivityError, ValueError):
        if changed:
            _cni_del_quietly(cnitool, network, netns)
            _run(["ip", "netns", "del", name])
        raise
    addresses = [i["address"].split("/")[0] for i in result.get("ips", [])]
    if ip not in addresses:
        raise ConnectivityError(f"CNI ADD of pod {name} returned {addresses}, not the requested {ip}")
    if _server_pid(name) is None:
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        with open(os.path.join(STATE_DIR, f"{name}.log"), "ab") as log:
            proc = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-m", "sluice.connectivity",
                                     "serve", name, ip], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        with open(os.path.join(STATE_DIR, f"{name}.pid"), "w") as f:
            f.write(f"{proc.pid} {_start_time(proc.pid)}\n")
        _wait_listening(netns, ip)
        changed = True
    return {"changed": changed, "pod": name, "ip": ip, "netns": netns, "result": result}


def _wait_listening(netns: str, ip: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-m", "sluice.connectivity", "probe",
                                "tcp", ip, str(TCP_PORT)], capture_output=True, text=True, check=False)
        if probe.returncode == 0 and json.loads(probe.stdout).get("ok"):
            return
        time.sleep(0.1)
    raise ConnectivityError(f"the echo server in {netns} does not answer on {ip}:{TCP_PORT}")


def _cni_del_quietly(cnitool: str, network: str, netns: str) -> None:
    try:
        _cni(cnitool, "del", network, netns)
    except ConnectivityError:
        pass


def pod_del(name: str, cnitool: str, network: str) -> dict:
    """Stop the echo server, CNI DEL, delete the namespace (idempotent)."""
    netns = _netns_path(name)
    changed = False
    pid = _server_pid(name)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        changed = True
    for suffix in ("pid", "log"):
        path = os.path.join(STATE_DIR, f"{name}.{suffix}")
        if os.path.exists(path):
            os.unlink(path)
    if os.path.exists(netns):
        _cni(cnitool, "del", network, netns)
        _run(["ip", "netns", "del", name])
        changed = True
    return {"changed": changed, "pod": name}


# ---- echo server (runs inside the pod) -------------------------------------------------------

def serve(name: str, ip: str) -> None:
    identity = json.dumps({"pod": name, "ip": ip}).encode()
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", TCP_PORT))
    tcp.listen(128)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", UDP_PORT))

    def answer_udp():
        while True:
            _data, peer = udp.recvfrom(2048)
            udp.sendto(identity, peer)

    threading.Thread(target=answer_udp, daemon=True).start()
    while True:
        conn, _peer = tcp.accept()
        with conn:
            conn.sendall(identity)


# ---- probes ----------------------------------------------------------------------------------

def _client(kind: int, source: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.settimeout(PROBE_TIMEOUT)
    if source:
        sock.bind((source, 0))
    return sock


def probe_tcp(dst: str, port: int, source: str | None = None) -> dict:
    with _client(socket.SOCK_STREAM, source) as sock:
        sock.connect((dst, port))
        peer = "%s:%d" % sock.getpeername()
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return {"ok": True, "reply": json.loads(reply), "peer": peer}


def probe_udp(dst: str, port: int, source: str | None = None) -> dict:
    with _client(socket.SOCK_DGRAM, source) as sock:
        sock.sendto(b"ping", (dst, port))
        reply, sender = sock.recvfrom(2048)
    return {"ok": True, "reply": json.loads(reply), "from": "%s:%d" % sender}


def probe_sockmap(dst: str, port: int, source: str | None = None) -> dict:
    """Two processes of one pod ("containers") stream SOCKMAP_BYTES to each other over TCP and back."""
    server = subprocess.Popen([sys.executable, "-m", "sluice.connectivity", "_echo-once", dst, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "listening":
            raise ConnectivityError("the second container's echo server did not start")
        payload = os.urandom(SOCKMAP_BYTES)
        with _client(socket.SOCK_STREAM, source) as sock:
            sock.connect((dst, port))
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = bytearray()
            while len(echoed) < len(payload) and (chunk := sock.recv(65536)):
                echoed += chunk
            sender.join()
        return {"ok": bytes(echoed) == payload, "bytes": len(echoed)}
    finally:
        server.kill()
        server.wait()


def echo_once(address: str, port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(1)
    print("listening", flush=True)
    conn, _peer = listener.accept()
    with conn:
        while chunk := conn.recv(65536):
            conn.sendall(chunk)


PROBES = {"tcp": probe_tcp, "udp": probe_udp, "sockmap": probe_sockmap}


def probe(kind: str, dst: str, port: int, source: str | None = None, count: int = 1) -> dict:
    """One probe, or `count` of them (new connections, so new source ports and flow hashes):
    ok when all answered, `answered` how many did, `answered_by` every replying address."""
    results = []
    for _attempt in range(count):
        try:
            results.append(PROBES[kind](dst, port, source))
        except (OSError, ValueError, ConnectivityError) as e:
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
    answered = [r for r in results if r["ok"]]
    summary = dict(answered[0] if answered else results[0])
    summary.update(ok=len(answered) == count, answered=len(answered),
                   answered_by=sorted({r["reply"]["ip"] for r in answered if "reply" in r}))
    if len(answered) < count:
        summary["error"] = next(r["error"] for r in results if not r["ok"])
    return summary


# ---- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice connectivity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("pod-add", help="create a test pod through the CNI plugin")
    add.add_argument("name")
    add.add_argument("--ip", required=True, help="the address the pod asks for")
    delete = sub.add_parser("pod-del", help="delete a test pod")
    delete.add_argument("name")
    for p in (add, delete):
        p.add_argument("--cnitool", default=DEFAULT_CNITOOL, help="the CNI client")
        p.add_argument("--network", default="sluice", help="CNI network name")
    pr = sub.add_parser("probe", help="connect and report what answered (JSON)")
    pr.add_argument("kind", choices=sorted(PROBES))
    pr.add_argument("dst")
    pr.add_argument("port", type=int)
    pr.add_argument("--netns", help="run the probe inside this network namespace (path)")
    pr.add_argument("--source", help="source address to bind")
    pr.add_argument("--count", type=int, default=1, help="how many connections (or datagrams)")
    srv = sub.add_parser("serve")
    srv.add_argument("name")
    srv.add_argument("ip")
    once = sub.add_parser("_echo-once")
    once.add_argument("address")
    once.add_argument("port", type=int)
    args = parser.parse_args(argv)

    if args.command == "probe":
        if args.netns:
            # nsenter rather than setns here: this module stays standard library only.
            source = ["--source", args.source] if args.source else []
            os.execvp("nsenter", ["nsenter", f"--net={args.netns}", sys.executable, "-m", "sluice.connectivity",
                                  "probe", args.kind, args.dst, str(args.port), "--count", str(args.count), *source])
        result = probe(args.kind, args.dst, args.port, args.source, args.count)
        print(json.dumps(result, sort_keys=True))
        return 0
    if args.command == "serve":
        serve(args.name, args.ip)
        return 0
    if args.command == "_echo-once":
        echo_once(args.address, args.port)
        return 0
    try:
        if args.command == "pod-add":
            result = pod_add(args.name, args.ip, args.cnitool, args.network)
        else:
            result = pod_del(args.name, args.cnitool, args.network)
    except ConnectivityError as e:
        print(f"sluice connectivity {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
