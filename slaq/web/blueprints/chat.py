"""``POST /v1/chat/completions``."""

from __future__ import annotations

from flask import Blueprint, Response

from slaq.web.auth import require_tenant
from slaq.web.streaming import answer
from slaq.web.validation import json_body, parse_chat

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
@require_tenant
def create_chat_completion() -> Response:
    return answer(parse_chat(json_body()))
