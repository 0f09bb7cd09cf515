"""Commit-confirm for the state file: a change the plan could not foresee is undone unless the controller
confirms, within a bounded time, that it still reaches the node (a router's "commit confirmed",
linux-system-roles' checkpoint and rollback).

Beside the state file (default /etc/sluice/state.json):

    state.json.checkpoint   the state in force before the change
    state.json.pending      {"deadline", "armed", "plan", "hand_edit"}: a change waits for its confirmation
    state.json.reverted     what the last revert restored, and when
    state.json.accepted     the state file's text as the state module wrote it, a confirmation confirmed it
                            or a revert restored it: any other text is a hand edit

The state module arms a change (arm) before it writes the new state (write); `sluice confirm`, run by the
controller over a new connection, confirms it (confirm); the agent, each time it polls, reverts a change
whose deadline passed (revert_if_due): it restores the checkpoint as the state file and applies it. A
state file changed past the module (by hand) arms itself: the agent, before it applies a text that is not
the accepted one, arms it with the accepted text as the checkpoint (arm_hand_edit). All take the same
lock, so a confirmation and a revert never both win, and the agent never takes the module's write for a
hand edit. Files, not the agent's memory: an agent restarted meanwhile (or a node rebooted) still reverts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time


def _paths(state_file: str) -> tuple[str, str, str, str]:
    return state_file + ".checkpoint", state_file + ".pending", state_file + ".reverted", state_file + ".accepted"


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


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, UnicodeDecodeError):     # no state the agent could have applied
        return None


def _same_state(text: str, other: str | None) -> bool:
    """Whether two texts of the state file are one state: rewriting it in another layout (the state module
    indents, an editor or json.dump may not) changes nothing."""
    if other is None:
        return False
    if text == other:
        return True
    try:
        return json.loads(text) == json.loads(other)
    except ValueError:
        return False


def _disarm(state_file: str) -> None:
    checkpoint, pending, _reverted, _accepted = _paths(state_file)
    os.unlink(pending)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(checkpoint)


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
    with _locked(state_file):
        return _arm(state_file, previous, timeout, plan)


def _arm(state_file: str, previous: str, timeout: float, plan: dict | None, hand_edit: bool = False) -> dict:
    checkpoint, pending, _reverted, _accepted = _paths(state_file)
    if _read_json(pending) is None:
        _write(checkpoint, previous)
    now = time.time()
    record = {"armed": now, "deadline": now + timeout, "plan": plan, "hand_edit": hand_edit}
    _write(pending, json.dumps(record))
    return record


def write(state_file: str, text: str) -> None:
    """The state module's write of the state file: `text` recorded as accepted first, under the lock, so
    the agent never arms it as a hand edit. A hand edit waiting for its confirmation is superseded: the
    module's state stands as it did before hand edits were armed (a change the module arms itself has
    replaced the hand edit's record already, keeping its checkpoint)."""
    _checkpoint, pending, _reverted, accepted = _paths(state_file)
    os.makedirs(os.path.dirname(state_file) or ".", mode=0o755, exist_ok=True)
    with _locked(state_file):
        if (_read_json(pending) or {}).get("hand_edit"):
            _disarm(state_file)
        _write(accepted, text)
        _write(state_file, text)


def arm_hand_edit(state_file: str, text: str, timeout: float) -> dict | None:
    """The agent, before it applies the state file's `text`: arm it when it is a hand edit (not the accepted
    state, no change waiting), the accepted text as the checkpoint; the record, or None. With `timeout` 0
    (hand edits not armed) and on the first state a node gets (nothing accepted yet, nothing to go back
    to), `text` becomes the accepted text. A file that no longer holds `text` is left to the agent's next
    look; a hand edit edited back to its checkpoint waits no more."""
    _checkpoint, pending, _reverted, accepted = _paths(state_file)
    with _locked(state_file):
        if _read_text(state_file) != text:
            return None
        known = _read_text(accepted)
        waiting = _read_json(pending)
        if waiting is not None:
            if waiting.get("hand_edit") and _same_state(text, known):
                _disarm(state_file)
            return None
        if _same_state(text, known):
            return None
        if known is None or not timeout:
            _write(accepted, text)
            return None
        return _arm(state_file, known, timeout, None, hand_edit=True)


def pending(state_file: str) -> dict | None:
    """The change waiting for its confirmation, or None."""
    return _read_json(_paths(state_file)[1])


def confirm(state_file: str, deadline: float | None = None) -> dict:
    """{"confirmed": True} when a change was waiting (it stands now), {"confirmed": False} when none was;
    {"confirmed": False, "reverted": ...} when the change armed with `deadline` was reverted, its time run out."""
    _checkpoint, waiting, reverted, accepted = _paths(state_file)
    with _locked(state_file):
        if _read_json(waiting) is None:
            last = _read_json(reverted)
            if deadline is not None and last and last.get("deadline") == deadline:
                return {"confirmed": False, "reverted": last}
            return {"confirmed": False}
        confirmed = _read_text(state_file)
        if confirmed is not None:
            _write(accepted, confirmed)
        _disarm(state_file)
    return {"confirmed": True}


def revert_if_due(state_file: str, now: float | None = None) -> dict | None:
    """Restore the checkpoint as the state file when a change's deadline passed (the caller applies it);
    what was reverted, or None."""
    checkpoint, waiting, reverted, accepted = _paths(state_file)
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
            _write(accepted, previous)
            _write(state_file, previous)
            os.unlink(checkpoint)
        done = {"time": now, "armed": record.get("armed"), "deadline": record.get("deadline"),
                "plan": record.get("plan"), "hand_edit": bool(record.get("hand_edit")),
                "restored": previous is not None}
        _write(reverted, json.dumps(done))
        os.unlink(waiting)
    return done
