"""CNI error results (spec 1.1.0, "Error" section). Standard library only."""

from __future__ import annotations

import json

# Codes 1-99 are reserved by the spec.
INCOMPATIBLE_CNI_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT_VARIABLES = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

# Plugin-specific codes (100 and up).
IPAM_FAILURE = 100       # no address for the pod: pool exhausted or misconfigured
SETUP_FAILURE = 101      # creating or configuring the pod's network failed
CHECK_FAILURE = 102      # CHECK found the attachment differing from what ADD set up
INTERNAL_FAILURE = 999   # unexpected error in the agent (libcni's ErrInternal)


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg} (CNI error {self.code})"

    def to_dict(self) -> dict:
        """The error as the agent sends it to the plugin."""
        out = {"code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, cni_version: str) -> str:
        """The error result a runtime reads from the plugin's stdout."""
        return json.dumps({"cniVersion": cni_version, **self.to_dict()})
