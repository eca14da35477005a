"""Fixtures for the torch engine tests: the HF reference model and small engines.

The model fixtures themselves (``tiny_model_path``, ``smollm2_path``, pulled once through the
model store into a cache dir) live in tests/conftest.py; helpers in
:mod:`slaq.gpu_workers.engine.testing`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slaq.gpu_workers.engine.testing import TINY_PROMPTS, engine_config, hf_causal_lm


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_path: Path) -> Any:
    return hf_causal_lm(tiny_model_path)


@pytest.fixture(scope="session")
def tiny_prompts(tiny_model_path: Path) -> list[list[int]]:
    from slaq.gpu_workers.engine.loader import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    return [tok.encode(p) for p in TINY_PROMPTS]


@pytest.fixture()
def make_engine(tiny_model_path: Path) -> Iterator[Callable[..., Any]]:
    """Build LLMEngines (tiny model unless a path is given); closes them afterwards."""
    from slaq.gpu_workers.engine.llm_engine import LLMEngine

    made: list[Any] = []

    def make(path: Path | None = None, **kw: Any) -> Any:
        eng = LLMEngine(engine_config(path or tiny_model_path, **kw))
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()
