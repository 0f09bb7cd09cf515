"""Running the real sluice-agent in a test node namespace."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

from lib.netns import ns_popen

VENV_BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".venv", "bin")


class AgentProcess:
    def __init__(self, ns: str, config: dict, workdir: str):
        self.ns = ns
        self.config = config
        self.config_path = os.path.join(workdir, "agent.json")
        self.log_path = os.path.join(workdir, "agent.log")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self.proc = None

    def argv(self) -> list[str]:
        """The agent's command line."""
        return [os.path.join(VENV_BIN, "sluice-agent"), "--config", self.config_path]

    def start(self, timeout: float = 15.0) -> None:
        self.log = open(self.log_path, "a")  # pylint: disable=consider-using-with
        self.proc = ns_popen(self.ns, *self.argv(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice-agent exited {self.proc.returncode}: {self.logs()}")
            with contextlib.suppress(OSError, ValueError):
                if self.request({"op": "health"})["ok"]:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"sluice-agent not answering on {self.config['socket']}: {self.logs()}")

    def request(self, payload: dict) -> dict:
        from sluice.agent_protocol import request

        return request(self.config["socket"], payload, timeout=30)

    def health(self) -> dict:
        return self.request({"op": "health"})["result"]

    def settled(self) -> None:
        """Wait for the CNI commands under way to end, with the work they leave after answering (a DEL's veth
        deletion)."""
        self.wait_for(lambda: self.health()["cni_in_progress"] == 0, what="CNI commands ended")

    def logs(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig: int = 15) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{what} not reached within {timeout}s; agent log:\n{self.logs()}")
