"""Heartbeat schema round trip and the KV-pressure routing choice (IO-free)."""

from __future__ import annotations

import pytest

from slaq.platform.pressure import Heartbeat, kv_pressure, pick_decode_worker


def _hb(worker: str, role: str = "decode", used: int = 0, reserved: int = 0, total: int = 100,
        t: float = 1000.0) -> Heartbeat:
    return Heartbeat(worker=worker, role=role, num_blocks_total=total, num_blocks_used=used,
                     num_blocks_reserved=reserved, time=t)


def test_kv_pressure_bounds():
    assert kv_pressure(0, 0, 100) == 0.0
    assert kv_pressure(30, 20, 100) == pytest.approx(0.5)
    assert kv_pressure(90, 50, 100) == 1.0
    assert kv_pressure(0, 0, 0) == 1.0


def test_round_trip_str_and_bytes():
    hb = Heartbeat(worker="decode-0", role="decode", device="cpu", model="tiny",
                   num_blocks_total=64, num_blocks_used=16, num_blocks_reserved=4,
                   num_blocks_leased=2, num_running=3, num_waiting=1, num_preemptions=5,
                   prefill_tokens_per_s=12.5, decode_tokens_per_s=99.0, last_batch_size=3,
                   max_batch_size=7, ttft_ms=None, tpot_ms=12.25, num_finished=9,
                   queues=["decode.decode-0", "decode.any"], pid=42, host="h", time=1.5)
    mapping = hb.to_mapping()
    assert all(isinstance(v, str) for v in mapping.values())
    assert float(mapping["pressure"]) == pytest.approx(20 / 64)
    assert Heartbeat.from_mapping(mapping) == hb
    as_bytes = {k.encode(): v.encode() for k, v in mapping.items()}
    assert Heartbeat.from_mapping(as_bytes) == hb


def test_from_mapping_tolerates_new_fields_and_rejects_garbage():
    mapping = _hb("d").to_mapping() | {"future_field": "x"}
    assert Heartbeat.from_mapping(mapping).worker == "d"
    with pytest.raises(ValueError):
        Heartbeat.from_mapping({})
    with pytest.raises(ValueError):
        Heartbeat.from_mapping({"worker": "d", "role": "decode", "num_blocks_used": "lots"})
    with pytest.raises(ValueError):
        Heartbeat(worker="d", role="juggler")


def test_pick_lowest_pressure_live_decode_worker():
    hbs = [_hb("busy", used=80), _hb("idle", used=10), _hb("stale", used=0, t=900.0),
           _hb("pre", role="prefill", used=0), _hb("reserved", used=5, reserved=50)]
    assert pick_decode_worker(hbs, now=1001.0, max_age_s=3.0).worker == "idle"
    assert pick_decode_worker(hbs, 1001.0, 3.0, exclude=["idle"]).worker == "reserved"
    assert pick_decode_worker([_hb("pre", role="prefill")], 1001.0, 3.0) is None
    # Equal pressure: the larger pool has more headroom.
    tie = [_hb("small", used=5, total=10), _hb("large", used=50, total=100)]
    assert pick_decode_worker(tie, 1000.0, 3.0).worker == "large"
