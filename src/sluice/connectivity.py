"""Connectivity checks on a node (`playbooks/verify.yml` drives them across nodes).

    sluice connectivity pod-add NAME --ip IP [--cnitool PATH]   a test pod through the CNI plugin
    sluice connectivity pod-del NAME [--cnitool PATH]           and gone again
    sluice connectivity probe {tcp,udp,sockmap} DST PORT [--netns PATH] [--source IP] [--count N]
    sluice connectivity flow-server [--tcp-port P] [--udp-port P]   echo every byte and datagram back
    sluice connectivity flow [--tcp DST:PORT]... [--udp DST:PORT]... [--duration S] [--rate N] [--netns PATH]

A test pod is a network namespace /run/netns/NAME wired by a real CNI client
(libcni's cnitool: the installed conflist, CNI_PATH, results cached by libcni),
asking for its address through the `ips` capability, with an echo server in it:
TCP 8080 and UDP 5353 answer with the pod's name and address. A probe prints one
JSON object: what answered, from which address, or the error. Standard library
only: probes also run on the controller, inside the lab's external namespace.

A pod made with `--server flow` runs a flow server instead (TCP 8080 and UDP 5353
echo everything back). `flow` keeps sequence-numbered traffic going to such
servers, directly or through a service VIP, for a bounded time (or until SIGTERM
or SIGINT) and prints one JSON report: per flow what was sent and echoed, what
was lost (and which sequence numbers), resets and errors, the longest stall, and
who answered. It is what shows that restarts and upgrades lose nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import select
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


def _self_in(netns: str, *args: str) -> list[str]:
    """This module's command line, run inside network namespace `netns` (nsenter rather than setns:
    the module stays standard library only)."""
    return ["nsenter", f"--net={netns}", sys.executable, "-m", "sluice.connectivity", *args]


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


def pod_add(name: str, ip: str, cnitool: str, network: str, server: str = "echo") -> dict:
    """Create the pod (idempotent): namespace, CNI ADD with the requested address, echo (or flow) server."""
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
            command = ["serve", name, ip] if server == "echo" else ["flow-server"]
            proc = subprocess.Popen(_self_in(netns, *command), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        with open(os.path.join(STATE_DIR, f"{name}.pid"), "w") as f:
            f.write(f"{proc.pid} {_start_time(proc.pid)}\n")
        _wait_listening(netns, ip, server)
        changed = True
    return {"changed": changed, "pod": name, "ip": ip, "netns": netns, "result": result}


def _wait_listening(netns: str, ip: str, server: str = "echo") -> None:
    check = (["probe", "tcp", ip, str(TCP_PORT)] if server == "echo"
             else ["flow", "--tcp", f"{ip}:{TCP_PORT}", "--duration", "0.1"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(_self_in(netns, *check), capture_output=True, text=True, check=False)
        if probe.returncode == 0 and json.loads(probe.stdout).get("ok"):
            return
        time.sleep(0.1)
    raise ConnectivityError(f"the {server} server in {netns} does not answer on {ip}:{TCP_PORT}")


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

def _listeners(tcp_port: int, udp_port: int) -> tuple[socket.socket, socket.socket]:
    """A listening TCP socket and a bound UDP socket on every address of the pod."""
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", tcp_port))
    tcp.listen(128)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", udp_port))
    return tcp, udp


def serve(name: str, ip: str) -> None:
    identity = json.dumps({"pod": name, "ip": ip}).encode()
    tcp, udp = _listeners(TCP_PORT, UDP_PORT)

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


# ---- flows: sequence-numbered traffic that counts every loss ----------------------------------

FLOW_MSG = 64                # bytes per TCP message and UDP datagram: 8-byte sequence number + padding
FLOW_MAGIC = b"SLFLOW01"
FLOW_DRAIN = 2.0             # seconds to wait for the last echoes after sending stops
FLOW_CONNECT_TIMEOUT = 3.0


def flow_server(tcp_port: int = TCP_PORT, udp_port: int = UDP_PORT) -> None:
    """Echo every TCP byte and every UDP datagram back to its sender (runs inside a pod)."""
    tcp, udp = _listeners(tcp_port, udp_port)

    def echo_udp():
        while True:
            data, peer = udp.recvfrom(2048)
            udp.sendto(data, peer)

    def echo_tcp(conn: socket.socket):
        with conn:
            try:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
            except OSError:
                pass

    threading.Thread(target=echo_udp, daemon=True).start()
    while True:
        conn, _peer = tcp.accept()
        threading.Thread(target=echo_tcp, args=(conn,), daemon=True).start()


def _flow_message(seq: int) -> bytes:
    return seq.to_bytes(8, "big") + FLOW_MAGIC + bytes(FLOW_MSG - 8 - len(FLOW_MAGIC))


def _ranges(seqs: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 3], [7, 7]]"""
    out: list[list[int]] = []
    for seq in sorted(seqs):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def _wait(next_send: float, drain_until: float | None) -> float:
    """How long a flow may wait for its socket: until the next send is due, at most 50 ms."""
    return 0.05 if drain_until is not None else max(0.0, min(next_send - time.monotonic(), 0.05))


def _draining(drain_until: float | None, now: float, deadline: float, stop: threading.Event) -> float | None:
    """Until when a flow waits for its last echoes, once its time is up or it is stopped (None before)."""
    if drain_until is None and (now >= deadline or stop.is_set()):
        return now + FLOW_DRAIN
    return drain_until


class _Flow:
    """One flow: a paced sender and a check of every echo. Subclasses speak TCP or UDP."""

    kind = ""

    def __init__(self, dst: str, port: int, rate: float):
        self.dst, self.port, self.interval = dst, port, 1.0 / rate
        self.sent = 0
        self.echoed: set[int] = set()
        self.resets = 0
        self.errors: list[str] = []
        self.peers: set[str] = set()
        self.last_progress = time.monotonic()
        self.max_stall = 0.0
        self.first_echo = threading.Event()

    def _error(self, what: str, err: Exception) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {what}: {type(err).__name__}: {err}")

    def _got(self, seq: int) -> None:
        now = time.monotonic()
        self.max_stall = max(self.max_stall, now - self.last_progress)
        self.last_progress = now
        self.echoed.add(seq)
        self.first_echo.set()

    def run(self, deadline: float, stop: threading.Event) -> None:
        raise NotImplementedError

    def report(self) -> dict:
        missing = sorted(set(range(self.sent)) - self.echoed)
        return {"kind": self.kind, "dst": f"{self.dst}:{self.port}", "sent": self.sent, "received": len(self.echoed),
                "lost": len(missing), "gaps": _ranges(missing)[:50], "resets": self.resets, "errors": self.errors,
                "max_stall_ms": round(self.max_stall * 1000, 1), "peers": sorted(self.peers)}


class _UdpFlow(_Flow):
    """Datagrams to DST:PORT from one unconnected socket; each echo must come back from DST:PORT
    (through a service VIP: recvmsg4 translates the backend's address back to the VIP)."""

    kind = "udp"

    def run(self, deadline: float, stop: threading.Event) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            next_send = time.monotonic()
            drain_until = None
            while True:
                now = time.monotonic()
                drain_until = _draining(drain_until, now, deadline, stop)
                if drain_until is not None and (len(self.echoed) >= self.sent or now > drain_until):
                    return
                if drain_until is None and now >= next_send:
                    try:
                        sock.sendto(_flow_message(self.sent), (self.dst, self.port))
                    except OSError as e:
                        self._error("sendto", e)
                    self.sent += 1  # a datagram the kernel refused is lost all the same
                    next_send += self.interval
                self._receive(sock)
                select.select([sock], [], [], _wait(next_send, drain_until))

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data, sender = sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError as e:  # e.g. ECONNREFUSED from an ICMP error
                self._error("recvfrom", e)
                return
            self.peers.add("%s:%d" % sender)
            if sender != (self.dst, self.port):
                self._error("reply", ValueError(f"from {sender[0]}:{sender[1]}, not {self.dst}:{self.port}"))
            elif len(data) == FLOW_MSG and data[8:8 + len(FLOW_MAGIC)] == FLOW_MAGIC:
                self._got(int.from_bytes(data[:8], "big"))


class _TcpFlow(_Flow):
    """A paced stream of messages over one connection, each echoed back in order. A reset or error
    is counted, the connection re-made, and what was in flight on the broken one is lost."""

    kind = "tcp"

    def run(self, deadline: float, stop: threading.Event) -> None:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                sock = socket.create_connection((self.dst, self.port), timeout=FLOW_CONNECT_TIMEOUT)
            except OSError as e:
                self._error("connect", e)
                self.resets += 1
                time.sleep(0.1)
                continue
            with sock:
                self.peers.add("%s:%d" % sock.getpeername())
                try:
                    self._stream(sock, deadline, stop)
                    return
                except OSError as e:
                    self._error("stream", e)
                    self.resets += 1

    def _stream(self, sock: socket.socket, deadline: float, stop: threading.Event) -> None:
        sock.setblocking(False)
        inbuf, outbuf = bytearray(), bytearray()
        expect = self.sent  # echoes come back in order, starting with this connection's first message
        next_send = time.monotonic()
        drain_until = None
        while True:
            now = time.monotonic()
            drain_until = _draining(drain_until, now, deadline, stop)
            if drain_until is not None and ((expect == self.sent and not outbuf) or now > drain_until):
                return
            if drain_until is None and now >= next_send:
                outbuf += _flow_message(self.sent)
                self.sent += 1
                next_send += self.interval
            if outbuf:
                try:
                    del outbuf[:sock.send(outbuf)]
                except BlockingIOError:
                    pass
            while True:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    raise ConnectionResetError("the server closed the connection")
                inbuf += chunk
            while len(inbuf) >= FLOW_MSG:
                msg = bytes(inbuf[:FLOW_MSG])
                del inbuf[:FLOW_MSG]
                seq = int.from_bytes(msg[:8], "big")
                if msg[8:8 + len(FLOW_MAGIC)] != FLOW_MAGIC or seq != expect:
                    raise ConnectionError(f"stream corrupted: got sequence {seq}, expected {expect}")
                self._got(seq)
                expect += 1
            select.select([sock], [sock] if outbuf else [], [], _wait(next_send, drain_until))


def _endpoint(text: str) -> tuple[str, int]:
    host, _sep, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS:PORT")
    return host, int(port)


def flow(tcp: list[tuple[str, int]], udp: list[tuple[str, int]], duration: float, rate: float,
         stop: threading.Event | None = None) -> dict:
    """Run every flow at once for `duration` seconds (or until `stop` is set), then report them all.
    ok: every flow had something echoed and nothing lost, reset or refused."""
    stop = stop or threading.Event()
    flows: list[_Flow] = [_TcpFlow(d, p, rate) for d, p in tcp] + [_UdpFlow(d, p, rate) for d, p in udp]
    started = time.monotonic()
    deadline = started + duration
    threads = [threading.Thread(target=f.run, args=(deadline, stop), daemon=True) for f in flows]
    for t in threads:
        t.start()

    def announce():
        if all(f.first_echo.wait(max(0.0, deadline - time.monotonic())) for f in flows):
            print(f"flow: all {len(flows)} flows answered", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    reports = [f.report() for f in flows]
    ok = bool(reports) and all(r["received"] > 0 and r["lost"] == 0 and r["resets"] == 0 and not r["errors"]
                               for r in reports)
    return {"ok": ok, "seconds": round(time.monotonic() - started, 2), "rate": rate, "flows": reports}


# ---- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice connectivity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("pod-add", help="create a test pod through the CNI plugin")
    add.add_argument("name")
    add.add_argument("--ip", required=True, help="the address the pod asks for")
    delete = sub.add_parser("pod-del", help="delete a test pod")
    delete.add_argument("name")
    add.add_argument("--server", choices=("echo", "flow"), default="echo",
                     help="what the pod serves on TCP 8080 and UDP 5353: its identity, or an echo for flows")
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
    fsrv = sub.add_parser("flow-server", help="echo every TCP byte and UDP datagram back (inside a pod)")
    fsrv.add_argument("--tcp-port", type=int, default=TCP_PORT)
    fsrv.add_argument("--udp-port", type=int, default=UDP_PORT)
    fl = sub.add_parser("flow", help="sequence-numbered TCP and UDP flows for a bounded time; JSON report")
    fl.add_argument("--tcp", type=_endpoint, action="append", default=[], metavar="DST:PORT", help="a TCP stream")
    fl.add_argument("--udp", type=_endpoint, action="append", default=[], metavar="DST:PORT", help="a UDP flow")
    fl.add_argument("--duration", type=float, default=10.0, help="seconds (SIGTERM or SIGINT stops it earlier)")
    fl.add_argument("--rate", type=float, default=100.0, help="messages (datagrams) per second and flow")
    fl.add_argument("--netns", help="run the flows inside this network namespace (path)")
    srv = sub.add_parser("serve")
    srv.add_argument("name")
    srv.add_argument("ip")
    once = sub.add_parser("_echo-once")
    once.add_argument("address")
    once.add_argument("port", type=int)
    args = parser.parse_args(argv)

    if args.command == "probe":
        if args.netns:
            source = ["--source", args.source] if args.source else []
            os.execvp("nsenter", _self_in(args.netns, "probe", args.kind, args.dst, str(args.port),
                                          "--count", str(args.count), *source))
        result = probe(args.kind, args.dst, args.port, args.source, args.count)
        print(json.dumps(result, sort_keys=True))
        return 0
    if args.command == "flow":
        if args.netns:
            os.execvp("nsenter", _self_in(args.netns, "flow",
                                          *[a for d, p in args.tcp for a in ("--tcp", f"{d}:{p}")],
                                          *[a for d, p in args.udp for a in ("--udp", f"{d}:{p}")],
                                          "--duration", str(args.duration), "--rate", str(args.rate)))
        if not args.tcp and not args.udp:
            parser.error("flow needs at least one --tcp or --udp")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_args: stop.set())
        result = flow(args.tcp, args.udp, args.duration, args.rate, stop)
        print(json.dumps(result, sort_keys=True))
        return 0
    if args.command == "flow-server":
        flow_server(args.tcp_port, args.udp_port)
        return 0
    if args.command == "serve":
        serve(args.name, args.ip)
        return 0
    if args.command == "_echo-once":
        echo_once(args.address, args.port)
        return 0
    try:
        if args.command == "pod-add":
            result = pod_add(args.name, args.ip, args.cnitool, args.network, args.server)
        else:
            result = pod_del(args.name, args.cnitool, args.network)
    except ConnectivityError as e:
        print(f"sluice connectivity {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
