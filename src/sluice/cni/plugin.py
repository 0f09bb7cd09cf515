"""sluice-cni: the binary a container runtime executes for every pod.

It answers VERSION itself, checks the request as far as it can without the
node, and hands everything else to the agent (sluice.agent_protocol), which
answers with the text to print. Standard library only: it starts once per pod
under `python -I -S`, so it imports as little as it can: `_socket` rather than
socket (selectors, enum) and spec's JSON helpers rather than json (re, enum).
"""

from __future__ import annotations

import os
import sys

from .. import agent_protocol
from . import spec
from .errors import DECODING_FAILURE, INTERNAL_FAILURE, CniError


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
        output = agent_protocol.cni(conf.get("agentSocket") or agent_protocol.DEFAULT_SOCKET, command, env, raw)
    except CniError as e:
        return 1, e.to_json(cni_version)
    except Exception as e:  # noqa: BLE001 - the runtime must get an error result, not a traceback
        return 1, CniError(INTERNAL_FAILURE, f"sluice-cni failed: {e!r}").to_json(cni_version)
    return 0, output or ""


def main() -> int:
    status, output = run(dict(os.environ), sys.stdin.buffer)
    if output:
        print(output)
    return status
