"""Token streams on real Redis: the write/read helpers workers and the API share."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from slaq.platform import streams
from slaq.platform.keys import token_stream_key


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def r(redis_url, request):
    client = redis.Redis.from_url(redis_url, protocol=request.param)
    yield client
    client.close()


def _rid() -> str:
    return uuid.uuid4().hex


def test_deltas_round_trip_in_order(r):
    rid = _rid()
    streams.append_tokens(r, rid, [5, 6], "Hello")
    streams.append_tokens(r, rid, [7], " wörld", finish_reason="length", cached_tokens=3)
    got = streams.read_tokens(r, rid)
    assert [(d.token_ids, d.text, d.finish_reason) for d in got] == [
        ([5, 6], "Hello", None), ([7], " wörld", "length")]
    assert got[1].cached_tokens == 3 and got[0].cached_tokens is None
    assert got[1].is_final and not got[0].is_final
    # Reading after an entry id returns only what came later.
    assert [d.text for d in streams.read_tokens(r, rid, after=got[0].entry_id)] == [" wörld"]


def test_stream_fields_match_the_documented_format(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    rid = _rid()
    streams.append_tokens(r, rid, [1, 2], "ab", finish_reason="stop")
    (_, fields), = r.xrange(token_stream_key(rid))
    assert fields == {"ids": "[1, 2]", "text": "ab", "finish_reason": "stop"}
    assert token_stream_key(rid).endswith(f"tok:{rid}")


def test_error_entry_ends_the_stream(r):
    rid = _rid()
    streams.append_tokens(r, rid, [1], "a")
    streams.append_error(r, rid, "worker lost")
    streams.append_tokens(r, rid, [2], "never read")
    got = list(streams.follow_tokens(r, rid, idle_timeout_s=5))
    assert [d.error for d in got] == [None, "worker lost"]


def test_follow_waits_for_a_writer(r):
    rid = _rid()

    def writer() -> None:
        for i in range(3):
            time.sleep(0.05)
            streams.append_tokens(r, rid, [i], str(i), finish_reason="stop" if i == 2 else None)

    t = threading.Thread(target=writer)
    t.start()
    got = list(streams.follow_tokens(r, rid, idle_timeout_s=5, block_ms=50))
    t.join()
    assert "".join(d.text for d in got) == "012"
    assert got[-1].finish_reason == "stop"


def test_follow_times_out_without_entries(r):
    with pytest.raises(streams.StreamTimeout):
        list(streams.follow_tokens(r, _rid(), idle_timeout_s=0.2, block_ms=50))


def test_keys_expire_and_shorten_when_finished(r):
    rid = _rid()
    key = token_stream_key(rid)
    streams.append_tokens(r, rid, [1], "a")
    assert streams.FINISHED_TTL_S < r.ttl(key) <= streams.STREAM_TTL_S
    streams.append_tokens(r, rid, [2], "b", finish_reason="stop")
    assert 0 < r.ttl(key) <= streams.FINISHED_TTL_S
    streams.delete_stream(r, rid)
    assert not r.exists(key)


def test_bad_writes_are_refused(r):
    with pytest.raises(ValueError):
        streams.append_tokens(r, _rid(), [1], "a", finish_reason="eos")
    with pytest.raises(ValueError):
        streams.append_error(r, _rid(), "")
