"""The zero-config path: no SLAQ_* URLs, so `slaq up` starts embedded PostgreSQL and Redis.

A second `slaq up` on the same data dir must reuse the data: same dev key, old rows kept.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select

from slaq.platform.db import dispose_engines, session_factory
from slaq.platform.models import RequestRow
from slaq.platform.services import ensure_services
from slaq.platform.settings import Settings

from .conftest import start_stack

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

UNSET = {"SLAQ_DATABASE_URL": None, "SLAQ_REDIS_URL": None, "SLAQ_BROKER_URL": None,
         "SLAQ_MODEL": "tiny-random"}


def _ask(stack) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.api_key,
                           max_retries=0, timeout=120)
    return client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hello"}],
        max_completion_tokens=8, temperature=0)


def _count_rows(data_dir) -> int:
    services = ensure_services(Settings(data_dir=data_dir))
    try:
        with session_factory(services.database_url)() as s:
            return s.scalar(select(func.count()).select_from(RequestRow))
    finally:
        dispose_engines()
        services.stop()


def test_embedded_services_and_restart_reuses_data():
    # Not pytest's tmp_path: as root, pgserver runs PostgreSQL as another user, which cannot
    # enter /tmp/pytest-of-root (mode 0700).
    data_dir = Path(tempfile.mkdtemp(prefix="slaq-embedded-")) / "data"
    first = start_stack(UNSET, data_dir)
    try:
        r1 = _ask(first)
        assert r1.choices[0].finish_reason in ("stop", "length")
        assert r1.service_tier == "default"
    finally:
        assert first.stop() == 0, first.log_path.read_text()[-3000:]

    second = start_stack(UNSET, data_dir)
    try:
        assert second.api_key == first.api_key
        _ask(second)
    finally:
        assert second.stop() == 0, second.log_path.read_text()[-3000:]
    assert _count_rows(data_dir) == 2
    shutil.rmtree(data_dir.parent, ignore_errors=True)
