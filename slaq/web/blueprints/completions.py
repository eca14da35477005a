"""``POST /v1/completions`` (legacy text completions)."""

from __future__ import annotations

from flask import Blueprint, Response

from slaq.web.auth import require_tenant
from slaq.web.streaming import answer
from slaq.web.validation import json_body, parse_completion

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
@require_tenant
def create_completion() -> Response:
    return answer(parse_completion(json_body()))
