"""A small Kubernetes API client: a kubeconfig, paged LISTs and WATCH streams over one HTTPS connection each.

Standard library only (plus PyYAML for the kubeconfig): the agent needs four read-only calls, and the
official client costs far more to import and to hold (docs/kubernetes.md has the measurements).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import tempfile
import urllib.parse
from dataclasses import dataclass

import yaml

PAGE_SIZE = 500


class ApiError(Exception):
    """The API server answered with an error, or could not be reached; `code` is the HTTP status (0: none)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class Gone(ApiError):
    """410: the resourceVersion a watch asked for is too old; the caller must list again."""


class KubeconfigError(ValueError):
    """The kubeconfig is missing, unreadable or lacks what a client needs; the message names the value."""


@dataclass
class Kubeconfig:
    server: str
    ssl_context: ssl.SSLContext
    token: str | None = None

    @classmethod
    def load(cls, path: str) -> "Kubeconfig":
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise KubeconfigError(f"cannot read kubeconfig {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise KubeconfigError(f"kubeconfig {path} is not YAML: {e}") from None
        if not isinstance(raw, dict):
            raise KubeconfigError(f"kubeconfig {path}: expected a mapping")
        base = os.path.dirname(os.path.abspath(path))
        current = raw.get("current-context")
        context = _named(raw, "contexts", current, path).get("context") or {}
        cluster = _named(raw, "clusters", context.get("cluster"), path).get("cluster") or {}
        user = _named(raw, "users", context.get("user"), path).get("user") or {}
        server = cluster.get("server")
        if not server or not str(server).startswith("https://"):
            raise KubeconfigError(f"kubeconfig {path}: cluster server {server!r} is not an https:// URL")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # hostname checked, certificate required
        if cluster.get("insecure-skip-tls-verify"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ca = _pem(cluster, "certificate-authority", base, path)
            if ca is None:
                ctx.load_default_certs()
            else:
                ctx.load_verify_locations(cadata=ca.decode())
        cert, key = _pem(user, "client-certificate", base, path), _pem(user, "client-key", base, path)
        if (cert is None) != (key is None):
            raise KubeconfigError(f"kubeconfig {path}: user {context.get('user')!r} has a client certificate "
                                  "or a client key, not both")
        if cert is not None:
            _load_client_pair(ctx, cert, key)
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = _read(os.path.join(base, user["tokenFile"]), path).decode().strip()
        return cls(server=str(server).rstrip("/"), ssl_context=ctx, token=token or None)


def _named(raw: dict, section: str, name, path: str) -> dict:
    for item in raw.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item
    raise KubeconfigError(f"kubeconfig {path}: no entry named {name!r} in {section}")


def _read(file: str, path: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read()
    except OSError as e:
        raise KubeconfigError(f"kubeconfig {path}: cannot read {file}: {e.strerror}") from None


def _pem(section: dict, field: str, base: str, path: str) -> bytes | None:
    """The PEM of `field`, inline (`field`-data, base64) or in a file relative to the kubeconfig."""
    if section.get(f"{field}-data"):
        try:
            return base64.b64decode(section[f"{field}-data"], validate=True)
        except ValueError:
            raise KubeconfigError(f"kubeconfig {path}: {field}-data is not base64") from None
    if section.get(field):
        return _read(os.path.join(base, section[field]), path)
    return None


def _load_client_pair(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads a client certificate only from files: a private directory for the moment it takes."""
    with tempfile.TemporaryDirectory(prefix="sluice-kubeconfig-") as tmp:
        os.chmod(tmp, 0o700)
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for file, data in ((cert_file, cert), (key_file, key)):
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as e:
            raise KubeconfigError(f"kubeconfig: the client certificate and key do not load: {e}") from None


class ApiClient:
    """Read-only calls to one API server. Each call opens its own connection, so a WATCH can run in one
    thread per resource."""

    def __init__(self, config: Kubeconfig, timeout: float = 10.0):
        self.config = config
        self.timeout = timeout
        url = urllib.parse.urlsplit(config.server)
        self.host, self.port = url.hostname, url.port or 443
        self.prefix = url.path.rstrip("/")

    def _request(self, path: str, query: dict, timeout: float) -> tuple[http.client.HTTPSConnection,
                                                                        http.client.HTTPResponse]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.config.ssl_context, timeout=timeout)
        headers = {"Accept": "application/json", "User-Agent": "sluice-agent"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        try:
            conn.connect()
            _keepalive(conn.sock)
            conn.request("GET", f"{self.prefix}{path}?{urllib.parse.urlencode(query)}", headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ApiError(f"GET {path}: {e}") from None
        if resp.status != 200:
            body = resp.read(4096)
            conn.close()
            message = _status_message(body) or resp.reason
            error = Gone if resp.status == 410 else ApiError
            raise error(f"GET {path}: {resp.status} {message}", resp.status)
        return conn, resp

    def list(self, path: str) -> tuple[list[dict], str]:
        """Every item of a collection (paged), and the resourceVersion to watch from."""
        items, query = [], {"limit": PAGE_SIZE}
        while True:
            conn, resp = self._request(path, query, self.timeout)
            try:
                body = json.loads(resp.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise ApiError(f"GET {path}: {e}") from None
            finally:
                conn.close()
            items += body.get("items") or []
            meta = body.get("metadata") or {}
            if not meta.get("continue"):
                return items, meta.get("resourceVersion", "")
            query = {"limit": PAGE_SIZE, "continue": meta["continue"]}

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300):
        """The events of a collection after `resource_version`, bookmarks included, as (type, object),
        until the server ends the watch (after about `timeout_seconds`). An ERROR event with code 410
        raises Gone."""
        query = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_seconds)}
        # A silent connection is dead once the server's own timeout has long passed.
        conn, resp = self._request(path, query, timeout_seconds + 30)
        try:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise ApiError(f"watch {path}: {e}") from None
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as e:
                    raise ApiError(f"watch {path}: undecodable event: {e}") from None
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    code = obj.get("code", 0)
                    error = Gone if code == 410 else ApiError
                    raise error(f"watch {path}: {code} {obj.get('message', '')}", code)
                yield kind, obj
        finally:
            conn.close()


def _keepalive(sock) -> None:
    """A watch is silent between events: TCP keepalive notices a peer that is gone within about 30 s,
    instead of at the end of the watch's timeout."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _status_message(body: bytes) -> str:
    try:
        return json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        return body.decode(errors="replace").strip()[:200]
