"""Where a load test may point: loopback only, unless the operator names the remote URL on purpose.

A load generator is a traffic cannon; a typo in ``--url`` must not aim it at someone else's server.
A non-loopback target runs only when ``--allow-remote`` repeats that exact URL.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class TargetNotAllowed(ValueError):
    pass


def _normalize(url: str) -> str:
    parts = urlsplit(url.strip())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


def is_loopback_host(host: str) -> bool:
    """True when every address the host resolves to is loopback (127.0.0.0/8 or ::1)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_target(url: str, allow_remote: str | None = None) -> str:
    """Return ``url`` if it may be load-tested, else raise TargetNotAllowed with the reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetNotAllowed(f"not an http(s) URL: {url!r}")
    if is_loopback_host(parts.hostname):
        return url
    if allow_remote and _normalize(allow_remote) == _normalize(url):
        return url
    raise TargetNotAllowed(
        f"{parts.hostname} is not a loopback address; pass --allow-remote {url} to load-test it on purpose"
    )
