"""Sluice node runtime: the one implementation behind the agent, the CNI plugin, the CLI and the Ansible modules."""

__version__ = "0.1.0"
