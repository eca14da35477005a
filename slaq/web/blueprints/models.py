"""``GET /v1/models`` and ``GET /v1/models/<id>``: the model this deployment serves."""

from __future__ import annotations

from flask import Blueprint

from slaq.platform.admission import ServedModel
from slaq.web import context
from slaq.web.auth import require_tenant
from slaq.web.errors import model_not_found

bp = Blueprint("models", __name__)


def _model_object(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "slaq"}


@bp.get("/v1/models")
@require_tenant
def list_models() -> dict:
    return {"object": "list", "data": [_model_object(context().model)]}


@bp.get("/v1/models/<path:model_id>")
@require_tenant
def retrieve_model(model_id: str) -> dict:
    model = context().model
    if not model.matches(model_id):
        raise model_not_found(model_id)
    return _model_object(model)
