"""Files the node package manages (CNI configurations, driver options): read when present, replaced atomically."""

from __future__ import annotations

import os


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write(path: str, text: str, mode: int = 0o644) -> bool:
    """Atomically give `path` this content and mode; False when it has both already. The temporary file is
    hidden, so that a directory's reader (a container runtime's CNI configurations) never takes it."""
    try:
        same_mode = (os.stat(path).st_mode & 0o7777) == mode
    except FileNotFoundError:
        same_mode = False
    if same_mode and read(path) == text:
        return False
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.sluice-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True
