"""sluice-cni: the binary a container runtime executes for every pod.

It answers VERSION itself, checks the request as far as it can without the
node, and hands everything else to the agent in one JSON line over the agent's
Unix socket. Standard library only: it starts once per pod under `python -I -S`,
so it imports as little as it can: `_socket` rather than socket (selectors,
enum) and spec's JSON helpers rather than json (re, enum); the agent sends the
result as the text to print.
"""

from __future__ import annotations

import os
import sys

try:
    import _socket as socket    # the C module alone: socket.py would import selectors and enum
except ImportError:             # pragma: no cover - an interpreter built without it
    import socket

from . import spec
from .errors import DECODING_FAILURE, INTERNAL_FAILURE, IO_FAILURE, PLUGIN_NOT_AVAILABLE, TRY_AGAIN_LATER, CniError

DEFAULT_AGENT_SOCKET = "/run/sluice/agent.sock"
# Work is serialised in the agent: with many pods starting at once the answer can take a while.
REPLY_TIMEOUT = 120.0


def ask_agent(socket_path: str, command: str, env: dict, stdin: str) -> dict | str | None:
    """Send the request to the agent; the result (as the text to print, from agents that send it that
    way), or the agent's error raised as CniError."""
    request = {"op": "cni", "command": command, "env": {k: v for k, v in env.items() if k.startswith("CNI_")},
               "stdin": stdin}
    # A runtime retries ADD/DEL/CHECK/GC on "try again later"; STATUS reports the plugin unavailable.
    unavailable = PLUGIN_NOT_AVAILABLE if command == "STATUS" else TRY_AGAIN_LATER
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Blocking connect: while the agent's listen backlog is full it waits instead of failing.
        sock.connect(socket_path)
        sock.settimeout(REPLY_TIMEOUT)
        sock.sendall(spec.dumps(request).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            line += chunk
    except TimeoutError:
        raise CniError(unavailable, f"the Sluice agent at {socket_path} did not answer within "
                                    f"{REPLY_TIMEOUT:.0f} s") from None
    except OSError as e:
        raise CniError(unavailable, f"the Sluice agent at {socket_path} is unreachable: {e.strerror or e}") from None
    finally:
        sock.close()
    if not line:
        raise CniError(unavailable, f"the Sluice agent at {socket_path} closed the connection without an answer")
    try:
        reply = spec.loads(line.decode())
        if reply["ok"]:
            # "output": the result as the text to print (json.dumps), from agents that send it
            return reply["output"] if "output" in reply else reply.get("result")
        error = reply["error"]
        raise CniError(int(error["code"]), str(error["msg"]), str(error.get("details", "")))
    except (ValueError, TypeError, KeyError) as e:
        raise CniError(IO_FAILURE, f"the Sluice agent at {socket_path} sent an unreadable reply: {e!r}") from None


def run(env: dict, stdin) -> tuple[int, str]:
    """(exit status, stdout) of one plugin invocation."""
    cni_version = spec.CNI_VERSION  # for errors found before the configuration is read
    try:
        command = spec.check_command(env.get("CNI_COMMAND"))
        if command == "VERSION":
            return 0, spec.dumps(spec.version_info())
        try:
            raw = stdin.read().decode()
        except UnicodeDecodeError as e:
            raise CniError(DECODING_FAILURE, f"the network configuration is not UTF-8: {e}") from None
        conf = spec.parse_config(raw, command)
        cni_version = conf["cniVersion"]
        spec.check_env(command, env)
        result = ask_agent(conf.get("agentSocket") or DEFAULT_AGENT_SOCKET, command, env, raw)
    except CniError as e:
        return 1, e.to_json(cni_version)
    except Exception as e:  # noqa: BLE001 - the runtime must get an error result, not a traceback
        return 1, CniError(INTERNAL_FAILURE, f"sluice-cni failed: {e!r}").to_json(cni_version)
    if isinstance(result, str):
        return 0, result
    return 0, spec.dumps(result) if result is not None else ""


def main() -> int:
    status, output = run(dict(os.environ), sys.stdin.buffer)
    if output:
        print(output)
    return status
