"""What the CNI spec asks of a request, checked by the agent (sluice.cni.ops), which any client may
call. Standard library only."""

from __future__ import annotations

import json

from .errors import (DECODING_FAILURE, INCOMPATIBLE_CNI_VERSION, INVALID_ENVIRONMENT_VARIABLES,
                     INVALID_NETWORK_CONFIG, CniError)

CNI_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")

# Variables each command needs besides CNI_COMMAND. DEL works without CNI_NETNS:
# the runtime may call it after the namespace is gone.
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": (),
    "STATUS": (),
    "VERSION": (),
}
# The spec version that introduced a command.
INTRODUCED_IN = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}

IFNAMSIZ = 16

# A configuration that is no JSON object (str.format fields: reason, near, the bad text's repr). The C
# plugin refuses it too, before it reads the agent's socket from it (sluice.agent_protocol.c_header).
NOT_JSON = "the network configuration is not valid JSON: {reason}, near {near}"
NOT_OBJECT = "the network configuration is not a JSON object"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def version_info() -> dict:
    return {"cniVersion": CNI_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def check_command(command: str | None) -> str:
    if not command:
        raise CniError(INVALID_ENVIRONMENT_VARIABLES, "CNI_COMMAND is not set")
    if command not in REQUIRED_ENV:
        raise CniError(INVALID_ENVIRONMENT_VARIABLES,
                       f"CNI_COMMAND {command!r} is not one of {', '.join(REQUIRED_ENV)}")
    return command


def check_env(command: str, env: dict) -> None:
    for name in REQUIRED_ENV[command]:
        if not env.get(name):
            raise CniError(INVALID_ENVIRONMENT_VARIABLES, f"{name} is required for {command} but is not set")
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) >= IFNAMSIZ or ifname in (".", "..") or any(c in ifname for c in "/: \t\n")):
        raise CniError(INVALID_ENVIRONMENT_VARIABLES, f"CNI_IFNAME {ifname!r} is not a valid interface name")


def parse_config(stdin: str, command: str) -> dict:
    """The network configuration, with a cniVersion this plugin speaks and that knows `command`."""
    try:
        conf = json.loads(stdin)
    except json.JSONDecodeError as e:
        near = stdin[max(0, e.pos - 20):e.pos + 20]  # the bad text itself, not only where it is
        raise CniError(DECODING_FAILURE, NOT_JSON.format(reason=e, near=repr(near))) from None
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, NOT_OBJECT)
    version = conf.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_CNI_VERSION,
                       f"cniVersion {version!r} is not supported; supported: {', '.join(SUPPORTED_VERSIONS)}")
    introduced = INTRODUCED_IN.get(command)
    if introduced and _version_tuple(version) < _version_tuple(introduced):
        raise CniError(INCOMPATIBLE_CNI_VERSION, f"{command} needs cniVersion {introduced} or later, "
                                                 f"the configuration has {version}")
    socket_path = conf.get("agentSocket", "")
    if not isinstance(socket_path, str):
        raise CniError(INVALID_NETWORK_CONFIG, f"agentSocket must be a path, not {socket_path!r}")
    return conf
