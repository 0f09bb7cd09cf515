"""sluice-supervise: keep one process running where PID 1 is not systemd.

    sluice-supervise start  --pidfile P --log L -- CMD...   start (no-op when running)
    sluice-supervise stop   --pidfile P                     stop supervisor and child
    sluice-supervise status --pidfile P                     exit 0 when running

`start` detaches a supervisor (its own session, so it outlives the SSH session
that started it) which runs CMD, restarts it when it dies (backing off up to
10 s), and on SIGTERM stops CMD and exits. The first line of its output is
"started" or "running", so callers can report `changed` honestly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def _read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _supervise(cmd: list[str], log: str, pidfile: str) -> None:
    stopping = False
    child: subprocess.Popen | None = None

    def on_term(*_):
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = 0.5
    with open(log, "ab", buffering=0) as out:
        while not stopping:
            started = time.monotonic()
            child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            while child.poll() is None:
                try:
                    child.wait()
                except KeyboardInterrupt:
                    pass
            if stopping:
                break
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10)
            out.write(f"sluice-supervise: {cmd[0]} exited {child.returncode}, restarting in {backoff}s\n".encode())
            time.sleep(backoff)
        if child and child.poll() is None:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    if _read_pid(pidfile) == os.getpid():
        os.unlink(pidfile)


def start(pidfile: str, log: str, cmd: list[str]) -> int:
    if _read_pid(pidfile):
        print("running")
        return 0
    for d in (os.path.dirname(pidfile), os.path.dirname(log)):
        os.makedirs(d, mode=0o700, exist_ok=True)
    if os.fork():
        # wait until the supervisor has written its pid, so `status` right after start is true
        for _attempt in range(100):
            if _read_pid(pidfile):
                print("started")
                return 0
            time.sleep(0.02)
        print(f"sluice-supervise: supervisor did not start (see {log})", file=sys.stderr)
        return 1
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    tmp = f"{pidfile}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, pidfile)
    try:
        _supervise(cmd, log, pidfile)
    finally:
        os._exit(0)


def stop(pidfile: str, timeout: float = 20.0) -> int:
    pid = _read_pid(pidfile)
    if not pid:
        print("not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _read_pid(pidfile) == pid:
        time.sleep(0.05)
    if _read_pid(pidfile) == pid:
        print(f"sluice-supervise: pid {pid} did not stop within {timeout}s", file=sys.stderr)
        return 1
    print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice-supervise", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--log", default="/var/log/sluice/agent.log")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Split at `--` first: an argparse REMAINDER positional would swallow --pidfile and --log.
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(cmd) - 1] if "--" in argv else argv)
    if args.action == "start":
        if not cmd:
            parser.error("start needs a command after --")
        return start(args.pidfile, args.log, cmd)
    if args.action == "stop":
        return stop(args.pidfile)
    pid = _read_pid(args.pidfile)
    print(f"running (pid {pid})" if pid else "stopped")
    return 0 if pid else 3


if __name__ == "__main__":
    sys.exit(main())
