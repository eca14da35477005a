"""``GET /healthz``: PostgreSQL (``SELECT 1``) and Redis (``PING``) reachable → 200, else 503."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.wrappers import Response
from sqlalchemy import text

from slaq.web import context

bp = Blueprint("health", __name__)


def _check(probe) -> str:
    try:
        probe()
    except Exception as exc:  # any failure is "unhealthy", reported, never raised
        return f"error: {type(exc).__name__}: {exc}"[:500]
    return "ok"


@bp.get("/healthz")
def healthz() -> Response:
    ctx = context()

    def database() -> None:
        with ctx.session_factory() as session:
            session.execute(text("SELECT 1")).scalar_one()

    checks = {"database": _check(database), "redis": _check(ctx.redis.ping)}
    healthy = all(v == "ok" for v in checks.values())
    resp = jsonify({"status": "ok" if healthy else "unavailable", "checks": checks})
    resp.status_code = 200 if healthy else 503
    return resp
