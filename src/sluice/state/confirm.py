"""Commit-confirm for the state file: a change the plan could not foresee is undone unless the controller
confirms, within a bounded time, that it still reaches the node (a router's "commit confirmed",
linux-system-roles' checkpoint and rollback).

Beside the state file (default /etc/sluice/state.json):

    state.json.checkpoint   the state in force before the change
    state.json.pending      {"deadline", "armed", "plan"}: a change waits for its confirmation
    state.json.reverted     what the last revert restored, and when

The state module arms a change (arm) before it writes the new state; `sluice confirm`, run by the
controller over a new connection, confirms it (confirm); the agent, each time it polls, reverts a change
whose deadline passed (revert_if_due): it restores the checkpoint as the state file and applies it. All
three take the same lock, so a confirmation and a revert never both win. Files, not the agent's memory:
an agent restarted meanwhile (or a node rebooted) still reverts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time


def _paths(state_file: str) -> tuple[str, str, str]:
    return state_file + ".checkpoint", state_file + ".pending", state_file + ".reverted"


@contextlib.contextmanager
def _locked(state_file: str):
    fd = os.open(state_file + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    """Atomically, and on disk before it counts: a revert must survive a crash or a reboot."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".confirm-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}       # unreadable: treated as due, the checkpoint decides


def arm(state_file: str, previous: str, timeout: float, plan: dict) -> dict:
    """Before the state file changes from `previous` (its text): keep `previous` as the checkpoint and
    wait `timeout` seconds for a confirmation. A change armed while another waits keeps the older
    checkpoint, the last state that was confirmed."""
    checkpoint, pending, _reverted = _paths(state_file)
    with _locked(state_file):
        waiting = _read_json(pending)
        if waiting is None:
            _write(checkpoint, previous)
        record = {"armed": time.time(), "deadline": time.time() + timeout, "plan": plan}
        _write(pending, json.dumps(record))
    return record


def pending(state_file: str) -> dict | None:
    """The change waiting for its confirmation, or None."""
    return _read_json(_paths(state_file)[1])


def confirm(state_file: str, deadline: float | None = None) -> dict:
    """{"confirmed": True} when a change was waiting (it stands now), {"confirmed": False} when none was;
    {"confirmed": False, "reverted": ...} when the change armed with `deadline` was reverted, its time run out."""
    checkpoint, waiting, reverted = _paths(state_file)
    with _locked(state_file):
        if _read_json(waiting) is None:
            last = _read_json(reverted)
            if deadline is not None and last and last.get("deadline") == deadline:
                return {"confirmed": False, "reverted": last}
            return {"confirmed": False}
        os.unlink(waiting)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(checkpoint)
    return {"confirmed": True}


def revert_if_due(state_file: str, now: float | None = None) -> dict | None:
    """Restore the checkpoint as the state file when a change's deadline passed (the caller applies it);
    what was reverted, or None."""
    checkpoint, waiting, reverted = _paths(state_file)
    now = time.time() if now is None else now
    if not os.path.exists(waiting):     # the agent asks every poll: no lock for the common answer
        return None
    with _locked(state_file):
        record = _read_json(waiting)
        if record is None or record.get("deadline", 0) > now:
            return None
        try:
            with open(checkpoint) as f:
                previous = f.read()
        except FileNotFoundError:
            previous = None
        if previous is not None:
            _write(state_file, previous)
            os.unlink(checkpoint)
        done = {"time": now, "armed": record.get("armed"), "deadline": record.get("deadline"),
                "plan": record.get("plan"), "restored": previous is not None}
        _write(reverted, json.dumps(done))
        os.unlink(waiting)
    return done
