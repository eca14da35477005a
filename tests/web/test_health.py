"""``GET /healthz`` against real and unreachable services."""

from __future__ import annotations

import httpx

from slaq.web import create_app


def test_healthy(live_api):
    resp = httpx.get(live_api.base_url + "/healthz", timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_unreachable_services_are_503_with_details(web_config, web):
    # Port 1 on localhost refuses connections at once: nothing listens there.
    config = {**web_config, "REDIS_URL": "redis://127.0.0.1:1/0",
              "DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nope",
              "TICKET_SENDER": lambda *_: None}
    server = web.start_server(create_app(config))
    try:
        resp = httpx.get(server.base_url + "/healthz", timeout=30)
    finally:
        server.stop()
    assert resp.status_code == 503
    body = resp.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("error")
    assert body["checks"]["redis"].startswith("error")


def test_one_service_down_is_503(web_config, web):
    config = {**web_config, "REDIS_URL": "redis://127.0.0.1:1/0",
              "TICKET_SENDER": lambda *_: None}
    server = web.start_server(create_app(config))
    try:
        resp = httpx.get(server.base_url + "/healthz", timeout=30)
    finally:
        server.stop()
    assert resp.status_code == 503
    assert resp.json()["checks"]["database"] == "ok"
