"""``slaq status``: the live workers (heartbeats) and the ledger's request counts, as one dict.

Uses the configured services, or embedded ones under the data dir (started only when not already
running, and stopped again afterwards: :meth:`Services.stop` leaves alone what it did not start).
A source that cannot be read is reported under ``errors`` instead of failing the command.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from slaq.gpu_workers.router import read_heartbeats
from slaq.platform.db import normalize_url
from slaq.platform.decisions import read_gates
from slaq.platform.models import ACTIVE_STATES, REQUEST_STATES, RequestRow
from slaq.platform.pressure import ROLES, Heartbeat
from slaq.platform.services import ensure_services
from slaq.platform.settings import Settings

log = logging.getLogger(__name__)

# Short: `slaq status` should answer (with errors) rather than hang on an unreachable service.
CONNECT_TIMEOUT_S = 5


def collect_status(settings: Settings) -> dict[str, Any]:
    """Workers, request counts and gates of the deployment ``settings`` point at.

    Keys: ``time``, ``services``, ``workers`` (one dict per live heartbeat, by role and name),
    ``num_workers`` (by role), ``requests`` (``by_state``, ``by_tier``, ``active``, ``total``;
    None when the ledger cannot be read), ``gates`` (``"<role>:<tier>"`` → ``open``/``closed``),
    ``reprioritiser`` (recent cycle times) and ``errors`` (source → message).
    """
    services = ensure_services(settings)
    try:
        out: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(),
            "services": {
                "database": services.database_url_display,
                "redis": _mask_password(services.redis_url),
                "embedded": [name for name, server in (("postgres", services.postgres),
                                                       ("redis", services.redis))
                             if server is not None],
            },
        }
        errors: dict[str, str] = {}
        out.update(_redis_status(services.redis_url, settings.heartbeat_ttl_s, errors))
        out["requests"] = _ledger_status(services.database_url, errors)
        out["errors"] = errors
        return out
    finally:
        services.stop()


def _mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def worker_entry(hb: Heartbeat, now: float, max_age_s: float) -> dict[str, Any]:
    """One heartbeat as plain JSON-able values, plus its pressure, age and freshness.

    The prefix hashes (up to 128 opaque ints, for affinity routing) are replaced by their
    count: they would bury the rest of the entry. The hand-off counters stay, with the share
    of handed-off blocks found cached here (None before the first hand-off).
    """
    entry = dataclasses.asdict(hb)
    del entry["prefix_hashes"]
    entry.update(kv_pressure=round(hb.pressure, 4), num_blocks_free=hb.num_blocks_free,
                 age_s=round(max(0.0, now - hb.time), 3), fresh=hb.is_fresh(now, max_age_s),
                 num_prefix_hashes=len(hb.prefix_hashes),
                 handoff_reuse_fraction=(
                     round(hb.num_handoff_blocks_reused / hb.num_handoff_blocks, 4)
                     if hb.num_handoff_blocks > 0 else None))
    return entry


def _redis_status(url: str, max_age_s: float, errors: dict[str, str]) -> dict[str, Any]:
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                  socket_timeout=CONNECT_TIMEOUT_S)
    from slaq.tasks.reprioritise import CYCLES_KEY

    out: dict[str, Any] = {"workers": [], "num_workers": dict.fromkeys(ROLES, 0), "gates": {},
                           "reprioritiser": None}
    try:
        heartbeats = sorted(read_heartbeats(client), key=lambda hb: (hb.role, hb.worker))
        gates = read_gates(client)
        cycles = [float(x) for x in client.lrange(CYCLES_KEY, 0, 99)]
    except redis.RedisError as exc:
        errors["redis"] = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        client.close()
    now = time.time()
    out["workers"] = [worker_entry(hb, now, max_age_s) for hb in heartbeats]
    for hb in heartbeats:
        out["num_workers"][hb.role] = out["num_workers"].get(hb.role, 0) + 1
    out["gates"] = {f"{role}:{tier}": "open" if is_open else "closed"
                    for (role, tier), is_open in sorted(gates.items())}
    if cycles:
        out["reprioritiser"] = {"last_cycle_ms": round(cycles[0] * 1000, 3),
                                "max_recent_cycle_ms": round(max(cycles) * 1000, 3),
                                "num_recent_cycles": len(cycles)}
    return out


def request_counts(session: Session) -> dict[str, Any]:
    """``by_state`` (every state, zeros included), ``by_tier`` (tier → state → count, non-zero
    only), ``active`` and ``total``, from one grouped query."""
    by_state = dict.fromkeys(REQUEST_STATES, 0)
    by_tier: dict[str, dict[str, int]] = {}
    rows = session.execute(select(RequestRow.tier_used, RequestRow.state, func.count())
                           .group_by(RequestRow.tier_used, RequestRow.state))
    for tier, state, n in rows:
        by_state[state] = by_state.get(state, 0) + n
        by_tier.setdefault(tier, {})[state] = n
    return {"by_state": by_state, "by_tier": dict(sorted(by_tier.items())),
            "active": sum(by_state[s] for s in ACTIVE_STATES),
            "total": sum(by_state.values())}


def _ledger_status(url: str, errors: dict[str, str]) -> dict[str, Any] | None:
    # A private engine without a pool: nothing stays connected to a server we may stop next.
    engine = create_engine(normalize_url(url), poolclass=NullPool,
                           connect_args=_connect_args(url))
    try:
        with Session(engine) as session:
            return request_counts(session)
    except SQLAlchemyError as exc:
        # e.g. a fresh embedded database before `slaq migrate`, or a server that is down.
        errors["database"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return None
    finally:
        engine.dispose()


def _connect_args(url: str) -> dict[str, Any]:
    if make_url(normalize_url(url)).drivername.endswith("psycopg"):
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}
