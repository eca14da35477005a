"""Tenants, hashed API keys and the dev tenant of `slaq up`, on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import stat
import uuid

import pytest
from sqlalchemy import select

from slaq.platform import tenants
from slaq.platform.db import session_factory
from slaq.platform.models import ApiKey
from slaq.platform.tiers import TIER_NAMES


@pytest.fixture
def session(database_url):
    with session_factory(database_url)() as s:
        yield s


def _name(prefix: str = "acme") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_key_authenticates_its_tenant_and_only_the_hash_is_stored(session):
    acme = tenants.create_tenant(session, _name(), default_tier="flex",
                                 allowed_tiers=("default", "flex"))
    other = tenants.create_tenant(session, _name("other"))
    key = tenants.create_api_key(session, acme.id)
    tenants.create_api_key(session, other.id)
    assert key.startswith("sk-slaq-") and len(key) > 40
    got = tenants.authenticate(session, key)
    assert got is not None and got.id == acme.id
    assert got.default_tier == "flex" and got.allowed_tiers == ["default", "flex"]
    stored = session.scalars(select(ApiKey).where(ApiKey.tenant_id == acme.id)).one()
    assert stored.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in (stored.key_hash, stored.prefix) and key.startswith(stored.prefix)


def test_unknown_and_revoked_keys_fail(session):
    t = tenants.create_tenant(session, _name())
    key = tenants.create_api_key(session, t.id)
    assert tenants.authenticate(session, key + "x") is None
    assert tenants.authenticate(session, "") is None
    assert tenants.revoke_api_key(session, key)
    assert not tenants.revoke_api_key(session, key)
    assert tenants.authenticate(session, key) is None


def test_keys_are_unique(session):
    t = tenants.create_tenant(session, _name())
    keys = {tenants.create_api_key(session, t.id) for _ in range(5)}
    assert len(keys) == 5


@pytest.mark.parametrize(("args", "kwargs"), [
    ((" ",), {}),
    (("x",), {"default_tier": "gold"}),
    (("x",), {"allowed_tiers": ("flex", "platinum"), "default_tier": "flex"}),
    (("x",), {"default_tier": "priority"}),  # not in the default allowed tiers
])
def test_create_tenant_validates(session, args, kwargs):
    with pytest.raises(ValueError):
        tenants.create_tenant(session, *args, **kwargs)


def test_ensure_dev_tenant_returns_the_key_only_once(session):
    name = _name("dev")
    tenant, key = tenants.ensure_dev_tenant(session, name)
    assert key is not None and tenants.authenticate(session, key).id == tenant.id
    assert tenant.allowed_tiers == list(TIER_NAMES) and tenant.default_tier == "default"
    again, key2 = tenants.ensure_dev_tenant(session, name)
    assert again.id == tenant.id and key2 is None


def test_dev_api_key_is_kept_in_the_data_dir(session, tmp_path):
    name = _name("dev")
    key = tenants.dev_api_key(session, tmp_path, name)
    path = tenants.dev_key_path(tmp_path)
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tenants.dev_api_key(session, tmp_path, name) == key  # second `slaq up`
    # A data dir whose key no longer authenticates (deleted, or another database) gets a new one.
    path.write_text("sk-slaq-stale\n")
    fresh = tenants.dev_api_key(session, tmp_path, name)
    assert fresh != key and tenants.authenticate(session, fresh).name == name
    assert path.read_text().strip() == fresh
    # An existing dev tenant with no key file (fresh data dir, shared database).
    other_dir = tmp_path / "other"
    third = tenants.dev_api_key(session, other_dir, name)
    assert third not in (key, fresh) and tenants.authenticate(session, third).name == name
