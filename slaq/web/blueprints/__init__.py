"""One blueprint per resource."""

from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    from slaq.web.blueprints import chat, completions, health, metrics, models

    for module in (chat, completions, models, health, metrics):
        app.register_blueprint(module.bp)
