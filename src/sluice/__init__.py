"""Sluice node runtime: the one implementation behind the agent, the CNI plugin, the CLI and the Ansible modules."""

__version__ = "0.1.0"


def package_fingerprint() -> str:
    """What tells installed code apart: a digest of the package's RECORD (every file with its hash). An agent
    reports the one it started with, `sluice status` the one installed now; the agent role restarts an agent
    whose code was replaced under it. Imports lazily: the CNI plugin imports this package per pod."""
    import hashlib  # pylint: disable=import-outside-toplevel
    from importlib import metadata  # pylint: disable=import-outside-toplevel

    try:
        record = metadata.distribution("sluice").read_text("RECORD") or ""
    except metadata.PackageNotFoundError:
        return ""
    return hashlib.sha256(record.encode()).hexdigest()[:16]
