"""Tenants and API keys.

A key is shown once, when it is made (``sk-slaq-<random>``); the database keeps only its sha256
and a short prefix for display. ``slaq up`` makes a ``dev`` tenant allowed every tier, and keeps
its key in the data dir so that a second ``slaq up`` can print it again.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slaq.platform.models import ApiKey, Tenant
from slaq.platform.tiers import TIER_NAMES

KEY_PREFIX = "sk-slaq-"
# Characters of the key kept in clear for display ("sk-slaq-AbCd…").
DISPLAY_CHARS = len(KEY_PREFIX) + 4
DEV_TENANT = "dev"
DEFAULT_ALLOWED_TIERS: tuple[str, ...] = ("default", "flex", "batch")
DEV_KEY_FILE = "dev_api_key"


def _done(session: Session, commit: bool) -> None:
    if commit:
        session.commit()
    else:
        session.flush()


def hash_key(key: str) -> str:
    """The stored form of a key: sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(session: Session, name: str, default_tier: str = "default",
                  allowed_tiers: Sequence[str] = DEFAULT_ALLOWED_TIERS, *,
                  commit: bool = True) -> Tenant:
    """Add a tenant; ``default_tier`` must be one of ``allowed_tiers``."""
    if not name or not name.strip():
        raise ValueError("tenant name must not be empty")
    allowed = list(dict.fromkeys(allowed_tiers))
    unknown = [t for t in (*allowed, default_tier) if t not in TIER_NAMES]
    if unknown:
        raise ValueError(f"unknown tiers {unknown}; known: {TIER_NAMES}")
    if default_tier not in allowed:
        raise ValueError(f"default_tier {default_tier!r} is not in allowed_tiers {allowed}")
    tenant = Tenant(name=name, default_tier=default_tier, allowed_tiers=allowed)
    session.add(tenant)
    _done(session, commit)
    return tenant


def get_tenant(session: Session, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()


def create_api_key(session: Session, tenant_id: int, *, commit: bool = True) -> str:
    """Make a key for the tenant and return its plaintext; it cannot be recovered later."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:DISPLAY_CHARS]))
    _done(session, commit)
    return key


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant owning ``key``, or None for an unknown or revoked key."""
    if not key:
        return None
    return session.scalars(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))).one_or_none()


def revoke_api_key(session: Session, key: str, *, commit: bool = True) -> bool:
    """Revoke ``key``; False if it was unknown or already revoked."""
    result = session.execute(
        update(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC)))
    _done(session, commit)
    return result.rowcount == 1


def ensure_dev_tenant(session: Session, name: str = DEV_TENANT) -> tuple[Tenant, str | None]:
    """The dev tenant (every tier allowed), made with a key on first call.

    Returns ``(tenant, key)`` where ``key`` is the new plaintext only when this call created the
    tenant, else None. Safe against a concurrent first run (the loser re-reads).
    """
    tenant = get_tenant(session, name)
    if tenant is not None:
        return tenant, None
    try:
        tenant = create_tenant(session, name, "default", TIER_NAMES, commit=False)
        key = create_api_key(session, tenant.id, commit=False)
        session.commit()
    except IntegrityError:
        session.rollback()
        tenant = get_tenant(session, name)
        if tenant is None:
            raise
        return tenant, None
    return tenant, key


def dev_key_path(data_dir: Path) -> Path:
    """Where ``slaq up`` keeps the dev tenant's key between runs."""
    return Path(data_dir) / DEV_KEY_FILE


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    tmp.replace(path)


def dev_api_key(session: Session, data_dir: Path, name: str = DEV_TENANT) -> str:
    """The dev tenant's key, for ``slaq up`` to print; creates tenant, key and file as needed.

    The key file is reused while it still authenticates as the dev tenant. Otherwise (first run,
    a fresh database, a deleted file) a new key is made for the dev tenant and written.
    """
    path = dev_key_path(data_dir)
    tenant, key = ensure_dev_tenant(session, name)
    if key is None and path.is_file():
        saved = path.read_text().strip()
        owner = authenticate(session, saved)
        if owner is not None and owner.id == tenant.id:
            return saved
    if key is None:
        key = create_api_key(session, tenant.id)
    _write_private(path, key)
    return key
