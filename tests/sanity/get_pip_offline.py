"""Offline stand-in for ansible-test's get-pip bootstrap script (see /work/shared/PLATFORM.md).

`make sanity` installs it as ~/.ansible/test/cache/get_pip_24_2.py. ansible-test runs it
(through its quiet_pip wrapper) inside each fresh sanity virtual environment with the pip
arguments it wants: install pip from the interpreter's bundled wheels (ensurepip), then
let that pip install the requested versions through the machine's pip configuration.
"""

from __future__ import annotations

import ensurepip
import os
import subprocess
import sys


def main() -> int:
    env = dict(os.environ)
    # ensurepip points PIP_CONFIG_FILE at /dev/null, which would hide the machine's pip configuration.
    env.pop("PIP_CONFIG_FILE", None)
    args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
    status = 1
    for _attempt in range(2):  # a freshly bootstrapped pip has once failed to import; a second bootstrap fixed it
        ensurepip.bootstrap(upgrade=True)
        status = subprocess.call([sys.executable, "-m", "pip", "install", "--upgrade", *args], env=env)
        if status == 0:
            break
    return status


if __name__ == "__main__":
    sys.exit(main())
