"""Incremental detokenization: whole characters only, stop strings held back and cut."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.detokenizer import IncrementalDetokenizer
from slaq.gpu_workers.engine.loader import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


def _stream(tok, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    prompt = tok.encode("Hello")
    det = IncrementalDetokenizer(tok, prompt, stop)
    deltas = [det.add([t]) for t in tok.encode(text)]
    return deltas, det


def test_multibyte_characters_are_never_split(tok):
    text = "naïve 🙂 emoji 👍🏽 and 東京 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 3, "expected byte-level tokens for the emoji"
    deltas, det = _stream(tok, text)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + det.flush() == text
    assert det.text == text
    assert "" in deltas, "some token ended inside a character and released nothing"


def test_stop_string_is_cut_and_finishes(tok):
    deltas, det = _stream(tok, "one two three four five", stop=("three",))
    assert det.stopped
    assert "".join(deltas) == "one two "
    assert det.flush() == ""
    assert det.add(tok.encode(" more")) == ""


def test_earliest_of_several_stop_strings_wins(tok):
    deltas, det = _stream(tok, "seven eight nine ten", stop=("ten", "eight", "zzz"))
    assert det.stopped and "".join(deltas) == "seven "


def test_possible_stop_prefix_is_held_back_then_released(tok):
    deltas, det = _stream(tok, "the cat sat", stop=("sat on",))
    # "sat" could still become "sat on": it is held, and only the flush releases it.
    assert not det.stopped
    assert "".join(deltas) == "the cat "
    assert det.flush() == "sat"
    assert det.text == "the cat sat"


def test_special_tokens_produce_no_text(tok):
    det = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert det.add([tok.convert_tokens_to_ids("<|im_end|>")]) == ""
