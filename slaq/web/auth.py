"""``Authorization: Bearer <key>`` → the calling tenant, or a 401."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import g, request
from sqlalchemy.orm import Session, sessionmaker

from slaq.platform.admission import TenantInfo
from slaq.web import context
from slaq.web.errors import invalid_api_key


def bearer_key() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def authenticate(session_factory: sessionmaker[Session], key: str) -> TenantInfo | None:
    """Look the key up (only its hash is stored) and detach what admission needs."""
    from slaq.platform import tenants

    with session_factory() as session:
        tenant = tenants.authenticate(session, key)
        if tenant is None:
            return None
        return TenantInfo(id=tenant.id, name=tenant.name, default_tier=tenant.default_tier,
                          allowed_tiers=tuple(tenant.allowed_tiers))


def require_tenant(view: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: authenticate the caller into ``g.tenant`` before the view runs."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = bearer_key()
        if key is None:
            raise invalid_api_key("You didn't provide an API key. Send it as "
                                  "'Authorization: Bearer <key>'.")
        tenant = authenticate(context().session_factory, key)
        if tenant is None:
            shown = key[:8] + "…" if len(key) > 8 else "…"
            raise invalid_api_key(f"Incorrect API key provided: {shown}.")
        g.tenant = tenant
        return view(*args, **kwargs)

    return wrapper
