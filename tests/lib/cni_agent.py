"""A stand-in for sluice-agent's CNI endpoint: a thread serving a Unix socket with
the agent's protocol (one JSON request line, one JSON reply line) and running
sluice.cni.ops.handle one request at a time, as the agent does."""

from __future__ import annotations

import contextlib
import json
import os
import socketserver
import threading
from typing import Iterator

from sluice.cni import ops
from sluice.cni.errors import DECODING_FAILURE, INVALID_ENVIRONMENT_VARIABLES, CniError


def answer(line: bytes, node: ops.NodeContext, lock: threading.Lock) -> dict:
    try:
        request = json.loads(line)
        if request.get("op") != "cni":
            raise CniError(INVALID_ENVIRONMENT_VARIABLES, f"unknown request op {request.get('op')!r}")
        with lock:
            result = ops.handle(request["command"], request["env"], request["stdin"], node)
        return {"ok": True, "result": result}
    except ValueError as e:
        return {"ok": False, "error": {"code": DECODING_FAILURE, "msg": f"request is not JSON: {e}"}}
    except CniError as e:
        return {"ok": False, "error": e.to_dict()}


@contextlib.contextmanager
def serve(node: ops.NodeContext, directory: str) -> Iterator[str]:
    """Serve CNI requests for `node` on `directory`/agent.sock; yields the socket path."""
    path = os.path.join(directory, "agent.sock")
    lock = threading.Lock()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            reply = answer(self.rfile.readline(), node, lock)
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    server = socketserver.ThreadingUnixStreamServer(path, Handler)
    server.daemon_threads = True
    # A short poll interval: shutdown() waits for it at the end of every test.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="cni-test-agent", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        os.unlink(path)
