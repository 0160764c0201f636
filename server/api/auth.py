"""Bearer-key authentication, admin rights and per-key adapter allow-lists.

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against *every* configured key,
so neither the length nor the position of a match leaks through timing. A key is never logged or
echoed: a :class:`Principal` carries only a short digest prefix (``key_id``) for logs and metrics.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from server.api.errors import APIError
from server.config import Settings


@dataclass(frozen=True)
class Principal:
    """Who is calling: admin or not, and which adapters they may use and see (``None`` = all)."""

    key_id: str
    is_admin: bool
    allowed_adapters: tuple[str, ...] | None = None

    def can_use(self, adapter: str) -> bool:
        if self.allowed_adapters is None:
            return True
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.allowed_adapters)


ANONYMOUS = Principal(key_id="anonymous", is_admin=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class Authenticator:
    """Maps an ``Authorization`` header to a :class:`Principal`.

    With no ``api_keys`` and no ``admin_keys`` configured, auth is off and every caller is an
    admin (local development). Otherwise admin keys are also valid API keys, and a key listed in
    ``key_adapter_allowlists`` may only use and list adapters matching its glob patterns.
    """

    def __init__(self, settings: Settings) -> None:
        self.enabled = bool(settings.api_keys or settings.admin_keys)
        admins = set(settings.admin_keys)
        self._entries: list[tuple[bytes, Principal]] = []
        for key in dict.fromkeys([*settings.api_keys, *settings.admin_keys]):
            if not key:
                continue
            allow = settings.key_adapter_allowlists.get(key)
            principal = Principal(
                key_id=hashlib.sha256(key.encode("utf-8")).hexdigest()[:8],
                is_admin=key in admins,
                allowed_adapters=tuple(allow) if allow is not None else None,
            )
            self._entries.append((_digest(key), principal))

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        candidate = _digest(token)
        found: Principal | None = None
        for digest, principal in self._entries:  # no early exit: constant work per request
            if hmac.compare_digest(candidate, digest):
                found = principal
        if found is None:
            raise APIError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return found


def require_key(request: Request) -> Principal:
    """FastAPI dependency: any valid key."""
    return request.app.state.loraplex.auth.authenticate(request.headers.get("authorization"))


def require_admin(request: Request) -> Principal:
    """FastAPI dependency: an admin key (adapter mutations, merges)."""
    principal = require_key(request)
    if not principal.is_admin:
        raise APIError(403, "this operation needs an admin key")
    return principal
