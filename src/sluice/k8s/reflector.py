"""Reflector: one collection of the API kept in a local store by LIST then WATCH, the way client-go does it.

- The watch starts at the list's resourceVersion and every event (bookmarks too) moves it on, so a
  re-established watch resumes where the last one ended: no event missed, none applied twice, and one
  stream per collection keeps them in order.
- 410 Gone (the version was compacted away): list again; objects deleted meanwhile are reported as
  deleted, because the new list is compared with the store.
- Any other failure: retried with exponential backoff and jitter (capped), resuming from the last
  version; `error` says what failed until a list or watch succeeds again.
- `transform` keeps only what the agent uses of each object (memory at 10,000s of objects); it returns
  None for objects to ignore.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Callable

from .client import ApiClient, ApiError, Gone

log = logging.getLogger("sluice.k8s")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0


def object_key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Reflector:
    """Keeps `store` (key -> transformed object) equal to the collection at `path`.

    `on_change(name, keys)` is called, with `lock` held, after the store changed for `keys`; `lock` is
    shared with whoever reads the stores."""

    def __init__(self, client: ApiClient, name: str, path: str, transform: Callable[[dict], object],
                 on_change: Callable[[str, set[str]], None], lock: threading.Lock, watch_timeout: int = 300):
        self.client = client
        self.name = name
        self.path = path
        self.transform = transform
        self.on_change = on_change
        self.lock = lock
        self.watch_timeout = watch_timeout
        self.store: dict[str, object] = {}
        self.resource_version: str | None = None    # None: list (again) before watching
        self.synced = False                         # the store held a complete list once
        self.error: str | None = None
        self.relists = 0
        self.events = 0

    def run(self, stop: threading.Event) -> None:
        delay = BACKOFF_MIN
        while not stop.is_set():
            try:
                if self.resource_version is None:
                    self.relist()
                self.watch(stop)
                delay = BACKOFF_MIN
            except Gone as e:
                log.info("%s: %s; listing again", self.name, e)
                self.resource_version = None
            except ApiError as e:
                if self.error != str(e):
                    log.warning("%s: %s; retrying", self.name, e)
                self.error = str(e)
                stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX)

    def relist(self) -> None:
        items, version = self.client.list(self.path)
        fresh = {}
        for obj in items:
            value = self.transform(obj)
            if value is not None:
                fresh[object_key(obj)] = value
        with self.lock:
            changed = {k for k in self.store.keys() | fresh.keys() if self.store.get(k) != fresh.get(k)}
            self.store = fresh
            self.resource_version = version
            self.synced = True
            self.error = None
            self.relists += 1
            self.on_change(self.name, changed)

    def watch(self, stop: threading.Event) -> None:
        for kind, obj in self.client.watch(self.path, self.resource_version, self.watch_timeout):
            version = (obj.get("metadata") or {}).get("resourceVersion")
            with self.lock:
                self.error = None
                if kind != "BOOKMARK":
                    self.apply_event(kind, obj)
                if version:
                    self.resource_version = version
            if stop.is_set():
                return

    def apply_event(self, kind: str, obj: dict) -> None:
        key = object_key(obj)
        value = None if kind == "DELETED" else self.transform(obj)
        old = self.store.pop(key, None) if value is None else self.store.get(key)
        if value is not None:
            self.store[key] = value
        self.events += 1
        if old != value:
            self.on_change(self.name, {key})

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name=f"watch-{self.name}", daemon=True)
        thread.start()
        return thread
