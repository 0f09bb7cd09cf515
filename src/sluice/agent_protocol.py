"""The agent's wire protocol: the one definition the agent serves and its clients (the CNI plugin, the
CLI, the Ansible modules, the tests) call.

One request per connection on the agent's Unix socket: a JSON object on one line, answered with a JSON
object on one line.

- requests: {"op": "health"}, {"op": "reconcile", "full": bool}, {"op": "cni", "command", "env", "stdin"}
- replies: {"ok": true, "result": ...}; {"ok": false, "error": {"code", "msg" [, "details"]}} with a
  code from cni/errors.py; a refused reconcile is {"ok": false, "result": health}. A "cni" reply with
  a result or an error adds "output": the text the plugin prints (the result, or the error result in
  the configuration's cniVersion), so that the plugin, a small C program (cni/sluice.c), reads two
  fields of the reply and parses nothing else.

The plugin is C, and what it must agree on with this module comes from here: `c_header()` renders
the constants below as the C header it is compiled with (`python -m sluice.agent_protocol`, run by
the Makefile), so the socket, the timeout and the error texts of an agent that cannot answer are
defined once. Standard library only.
"""

from __future__ import annotations

import json
import socket

from .cni import spec
from .cni.errors import DECODING_FAILURE, IO_FAILURE, PLUGIN_NOT_AVAILABLE, TRY_AGAIN_LATER, CniError

DEFAULT_SOCKET = "/run/sluice/agent.sock"
# With many pods starting at once the answer can take a while.
CNI_TIMEOUT = 120
# The plugin's errors when the agent does not answer (str.format fields: socket, seconds, reason); the
# code is "try again later" (a runtime retries ADD, DEL, CHECK and GC on it), for STATUS "plugin not
# available"; an unreadable answer is an I/O failure.
UNREACHABLE = "the Sluice agent at {socket} is unreachable: {reason}"
SILENT = "the Sluice agent at {socket} did not answer within {seconds} s"
CLOSED = "the Sluice agent at {socket} closed the connection without an answer"
UNREADABLE = "the Sluice agent at {socket} sent an unreadable reply: {reason}"


class NoAnswer(ConnectionError):
    """The agent closed the connection without answering."""


# ---- client ----------------------------------------------------------------------------------

def request(socket_path: str, payload: dict, timeout: float) -> dict:
    """The agent's reply to one request. OSError when the agent cannot be reached, TimeoutError when it
    does not answer within `timeout` seconds, NoAnswer when it closes the connection without a reply,
    ValueError when the reply is not a JSON object."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            line += chunk
    finally:
        sock.close()
    if not line:
        raise NoAnswer(CLOSED.format(socket=socket_path))
    reply = json.loads(line.decode())
    if not isinstance(reply, dict):
        raise ValueError(f"the reply is not a JSON object: {line[:200]!r}")
    return reply


# ---- server ----------------------------------------------------------------------------------

def answer(line: bytes, handle) -> bytes:
    """The reply line to one request line: handle(request) -> reply for a JSON object, an error otherwise."""
    try:
        received = json.loads(line.decode())
    except ValueError as e:     # (UnicodeDecodeError is one)
        reply = error_reply(CniError(DECODING_FAILURE, f"request is not JSON: {e}"))
    else:
        if isinstance(received, dict):
            reply = handle(received)
        else:
            reply = error_reply(CniError(DECODING_FAILURE, "request is not a JSON object"))
    return json.dumps(reply).encode() + b"\n"


def error_reply(error: CniError) -> dict:
    return {"ok": False, "error": error.to_dict()}


def cni_reply(result: dict | None) -> dict:
    """The reply to a "cni" request that succeeded."""
    if result is None:
        return {"ok": True, "result": None}
    return {"ok": True, "result": result, "output": json.dumps(result)}


def cni_error_reply(error: CniError, command: str, stdin: str) -> dict:
    """The reply to a "cni" request that failed; the error result is in the configuration's cniVersion
    when the configuration is one this plugin reads, in spec.CNI_VERSION otherwise."""
    try:
        version = spec.parse_config(stdin, spec.check_command(command))["cniVersion"]
    except Exception:  # noqa: BLE001 - whatever the request holds, its error result gets a version
        version = spec.CNI_VERSION
    return {**error_reply(error), "output": error.to_json(version)}


# ---- the C plugin's header -------------------------------------------------------------------

def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _c_format(template: str) -> str:
    """A str.format template as a printf format: %s for socket, reason and near, %d for seconds."""
    return _c_string(template.replace("%", "%%").format(socket="%s", reason="%s", near="%s", seconds="%d"))


def c_header() -> str:
    """The constants the C plugin (cni/sluice.c) is compiled with."""
    lines = ["/* Generated by `python -m sluice.agent_protocol` (src/sluice/agent_protocol.py): do not edit. */",
             "#pragma once",
             f"#define SL_DEFAULT_SOCKET {_c_string(DEFAULT_SOCKET)}",
             f"#define SL_CNI_TIMEOUT_S {CNI_TIMEOUT}",
             f"#define SL_CNI_VERSION {_c_string(spec.CNI_VERSION)}",
             f"#define SL_SUPPORTED_VERSIONS {{{', '.join(_c_string(v) for v in spec.SUPPORTED_VERSIONS)}}}",
             f"#define SL_VERSION_OUTPUT {_c_string(json.dumps(spec.version_info()))}",
             f"#define SL_TRY_AGAIN_LATER {TRY_AGAIN_LATER}",
             f"#define SL_PLUGIN_NOT_AVAILABLE {PLUGIN_NOT_AVAILABLE}",
             f"#define SL_IO_FAILURE {IO_FAILURE}",
             f"#define SL_DECODING_FAILURE {DECODING_FAILURE}",
             f"#define SL_UNREACHABLE {_c_format(UNREACHABLE)}",
             f"#define SL_SILENT {_c_format(SILENT)}",
             f"#define SL_CLOSED {_c_format(CLOSED)}",
             f"#define SL_UNREADABLE {_c_format(UNREADABLE)}",
             f"#define SL_NOT_JSON {_c_format(spec.NOT_JSON)}",
             f"#define SL_NOT_OBJECT {_c_format(spec.NOT_OBJECT)}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(c_header(), end="")
