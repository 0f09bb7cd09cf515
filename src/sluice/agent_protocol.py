"""The agent's wire protocol: the one definition the agent serves and its clients (the CNI plugin, the
CLI, the Ansible modules, the tests) call.

One request per connection on the agent's Unix socket: a JSON object on one line, answered with a JSON
object on one line.

- requests: {"op": "health"}, {"op": "reconcile", "full": bool}, {"op": "cni", "command", "env", "stdin"}
- replies: {"ok": true, "result": ...}; a "cni" reply with a result adds "output", the result as the
  text the plugin prints (so that it need not import json); {"ok": false, "error": {"code", "msg"
  [, "details"]}} with a code from cni/errors.py; a refused reconcile is {"ok": false, "result": health}.

Standard library only, and cheap to import: the plugin imports it once per pod under `python -I -S`,
so it uses `_socket` (socket.py imports selectors and enum) and spec's JSON helpers (json imports re
and enum).
"""

from __future__ import annotations

try:
    import _socket as socket    # the C module alone: socket.py would import selectors and enum
except ImportError:             # pragma: no cover - an interpreter built without it
    import socket

from .cni import spec
from .cni.errors import DECODING_FAILURE, IO_FAILURE, PLUGIN_NOT_AVAILABLE, TRY_AGAIN_LATER, CniError

DEFAULT_SOCKET = "/run/sluice/agent.sock"
# The agent does CNI work one request at a time: with many pods starting at once the answer can take a while.
CNI_TIMEOUT = 120.0


class NoAnswer(ConnectionError):
    """The agent closed the connection without answering."""


# ---- client ----------------------------------------------------------------------------------

def request(socket_path: str, payload: dict, timeout: float, wait_in_backlog: bool = False) -> dict:
    """The agent's reply to one request. OSError when the agent cannot be reached, TimeoutError when it
    does not answer within `timeout` seconds, NoAnswer when it closes the connection without a reply,
    ValueError when the reply is not a JSON object. With `wait_in_backlog` the connect waits (without
    limit) while the agent's listen backlog is full, as in a burst of pod starts, instead of failing."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not wait_in_backlog:
            sock.settimeout(timeout)    # non-blocking: a full backlog fails the connect at once
        sock.connect(socket_path)
        sock.settimeout(timeout)
        sock.sendall(spec.dumps(payload).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            line += chunk
    finally:
        sock.close()
    if not line:
        raise NoAnswer(f"the Sluice agent at {socket_path} closed the connection without an answer")
    reply = spec.loads(line.decode())
    if not isinstance(reply, dict):
        raise ValueError(f"the reply is not a JSON object: {line[:200]!r}")
    return reply


def cni(socket_path: str, command: str, env: dict, stdin: str) -> str | None:
    """The agent's answer to a CNI command: the result as the text to print (None: no result), or the
    agent's error raised as CniError. Not getting an answer is a CniError too: "try again later" (a
    runtime retries ADD, DEL, CHECK and GC on it; for STATUS "plugin not available") when the agent is
    unreachable, silent for CNI_TIMEOUT or closes the connection; an I/O failure when the answer is
    unreadable."""
    payload = {"op": "cni", "command": command, "env": {k: v for k, v in env.items() if k.startswith("CNI_")},
               "stdin": stdin}
    unavailable = PLUGIN_NOT_AVAILABLE if command == "STATUS" else TRY_AGAIN_LATER
    try:
        reply = request(socket_path, payload, CNI_TIMEOUT, wait_in_backlog=True)
        if reply["ok"]:
            return reply.get("output")
        error = reply["error"]
        raise CniError(int(error["code"]), str(error["msg"]), str(error.get("details", "")))
    except TimeoutError:
        raise CniError(unavailable, f"the Sluice agent at {socket_path} did not answer within "
                                    f"{CNI_TIMEOUT:.0f} s") from None
    except NoAnswer as e:
        raise CniError(unavailable, str(e)) from None
    except OSError as e:
        raise CniError(unavailable, f"the Sluice agent at {socket_path} is unreachable: {e.strerror or e}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise CniError(IO_FAILURE, f"the Sluice agent at {socket_path} sent an unreadable reply: {e!r}") from None


# ---- server ----------------------------------------------------------------------------------

def answer(line: bytes, handle) -> bytes:
    """The reply line to one request line: handle(request) -> reply for a JSON object, an error otherwise."""
    try:
        received = spec.loads(line.decode())
    except ValueError as e:     # (UnicodeDecodeError is one)
        reply = error_reply(CniError(DECODING_FAILURE, f"request is not JSON: {e}"))
    else:
        if isinstance(received, dict):
            reply = handle(received)
        else:
            reply = error_reply(CniError(DECODING_FAILURE, "request is not a JSON object"))
    return spec.dumps(reply).encode() + b"\n"


def error_reply(error: CniError) -> dict:
    return {"ok": False, "error": error.to_dict()}


def cni_reply(result: dict | None) -> dict:
    """The reply to a "cni" request that succeeded."""
    if result is None:
        return {"ok": True, "result": None}
    return {"ok": True, "result": result, "output": spec.dumps(result)}
