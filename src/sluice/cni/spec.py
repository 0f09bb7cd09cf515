"""What the CNI spec asks of a request, checked by the plugin before it calls the
agent and again by the agent, which may be called by other clients. Standard
library only.

JSON here goes through the C scanner and string encoder that the json package
itself uses (`_json`), not through the json package: importing json (with re
and enum behind it) costs a `python -IS` process about as much as starting the
interpreter. Whatever the scanner refuses is handed to json.loads, so an error
reads exactly as json's."""

from __future__ import annotations

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


try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner
except ImportError:     # an interpreter without json's C accelerator: the json package does it all
    _quote = _make_scanner = None

_WHITESPACE = " \t\n\r"     # JSON's, what json.loads skips around a document


class _Decoding:
    """The settings json.loads gives the scanner (json.decoder.JSONDecoder's defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


_scan = _make_scanner(_Decoding()) if _make_scanner is not None else None


def loads(text: str):
    """json.loads(text): the same value, or the same exception."""
    if _scan is not None and isinstance(text, str):
        start, end = len(text) - len(text.lstrip(_WHITESPACE)), len(text.rstrip(_WHITESPACE))
        try:
            value, stop = _scan(text, start)
        except Exception:  # noqa: BLE001
            stop = -1   # json.loads below gives the real error
        if stop == end:
            return value
    import json

    return json.loads(text)     # json's own error, or no _json


class _NotPlain(Exception):
    pass


def _encode(value, out: list) -> None:
    if isinstance(value, str):
        out.append(_quote(value))
    elif value is None or isinstance(value, bool):
        out.append({None: "null", True: "true", False: "false"}[value])
    elif isinstance(value, int):    # (bool is handled above) what json.dumps writes for an int
        out.append(int.__repr__(value))
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _encode(item, out)
        out.append("]")
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append(", " if i else "")
            out.append(_quote(key) + ": ")
            _encode(item, out)
        out.append("}")
    else:
        raise _NotPlain


def dumps(value) -> str:
    """json.dumps(value), the same text, for dicts with string keys, lists, strings, ints, booleans and None."""
    if _quote is not None:
        out: list = []
        try:
            _encode(value, out)
            return "".join(out)
        except _NotPlain:
            pass
    import json

    return json.dumps(value)    # anything else (floats, ...)


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
        conf = loads(stdin)
    except ValueError as e:   # json.JSONDecodeError is a ValueError
        if isinstance(getattr(e, "pos", None), int):
            near = stdin[max(0, e.pos - 20):e.pos + 20]  # the bad text itself, not only where it is
            raise CniError(DECODING_FAILURE, f"the network configuration is not valid JSON: {e}, near {near!r}") \
                from None
        raise CniError(DECODING_FAILURE, f"the network configuration is not valid JSON: {e}") from None
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, "the network configuration is not a JSON object")
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
