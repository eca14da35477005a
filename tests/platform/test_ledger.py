"""Ledger claims on a real PostgreSQL: each transition wins once, stale tickets do nothing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.models import RequestRow

T0 = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def session(database_url) -> Session:
    with session_factory(database_url)() as s:
        yield s


def _new(session: Session, **over) -> RequestRow:
    fields = dict(kind="chat", model="tiny", tier_asked="auto", tier_used="default",
                  ttft_target_ms=1000.0, tpot_target_ms=100.0, prompt_token_ids=[1, 2, 3],
                  params={"max_tokens": 8, "temperature": 0.0}, received_at=T0)
    fields.update(over)
    return ledger.create_request(session, **fields)


def _ms(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def test_create_request_is_queued_attempt_one(session):
    row = _new(session, client_request_id="abc", user="u1", request_metadata={"k": "v"})
    got = ledger.get_request(session, row.id)
    assert (got.state, got.attempt) == ("queued", 1)
    assert got.prompt_token_ids == [1, 2, 3] and got.prompt_tokens == 3
    assert got.params == {"max_tokens": 8, "temperature": 0.0}
    assert got.request_metadata == {"k": "v"} and got.client_request_id == "abc"
    assert got.tier_asked == "auto" and got.tier_used == "default"
    assert got.received_at == T0 and got.received_at.tzinfo is not None


def test_create_request_defaults_received_at_to_now(session):
    row = _new(session, received_at=None)
    got = ledger.get_request(session, row.id)
    now = session.scalar(text("SELECT now()"))
    assert abs((now - got.received_at).total_seconds()) < 60


@pytest.mark.parametrize("bad", [
    {"kind": "embedding"}, {"model": None}, {"nonsense": 1}, {"received_at": datetime(2026, 1, 1)},
])
def test_create_request_rejects_bad_fields(session, bad):
    with pytest.raises(ValueError):
        _new(session, **bad)


def test_full_lifecycle_computes_ttft_tpot_and_sla(session):
    row = _new(session)
    assert ledger.mark_enqueued(session, row.id, 1, at=_ms(5))
    assert ledger.start_prefill(session, row.id, 1, "prefill-0", at=_ms(10))
    assert ledger.record_first_token(session, row.id, 1, "prefill-0", at=_ms(400))
    assert ledger.start_decode(session, row.id, 1, "decode-0", at=_ms(420))
    assert ledger.finish_request(session, row.id, 1, output_text="Paris.", finish_reason="stop",
                                 completion_tokens=5, cached_tokens=2, at=_ms(800))
    got = ledger.get_request(session, row.id)
    assert got.state == "finished"
    assert got.ttft_ms == pytest.approx(400.0)
    assert got.tpot_ms == pytest.approx((800 - 400) / 4)
    assert got.sla_met is True
    assert (got.prefill_worker, got.decode_worker) == ("prefill-0", "decode-0")
    assert (got.output_text, got.finish_reason) == ("Paris.", "stop")
    assert (got.completion_tokens, got.cached_tokens) == (5, 2)
    assert got.enqueued_at == _ms(5) and got.decode_started_at == _ms(420)


@pytest.mark.parametrize(("first_ms", "end_ms", "n", "met"), [
    (1500, 1600, 2, False),   # TTFT over its 1000 ms target
    (500, 500 + 4 * 150, 5, False),  # TPOT 150 ms over its 100 ms target
    (999, 999 + 4 * 99, 5, True),
])
def test_sla_verdict(session, first_ms, end_ms, n, met):
    row = _new(session)
    ledger.start_prefill(session, row.id, 1, "p", at=_ms(1))
    ledger.record_first_token(session, row.id, 1, "p", at=_ms(first_ms))
    ledger.start_decode(session, row.id, 1, "d", at=_ms(first_ms))
    ledger.finish_request(session, row.id, 1, output_text="x", finish_reason="length",
                          completion_tokens=n, at=_ms(end_ms))
    assert ledger.get_request(session, row.id).sla_met is met


def test_finish_in_prefill_with_one_token_has_no_tpot(session):
    row = _new(session)
    ledger.start_prefill(session, row.id, 1, "both-0", at=_ms(1))
    ledger.record_first_token(session, row.id, 1, "both-0", at=_ms(200))
    assert ledger.finish_request(session, row.id, 1, output_text="Hi", finish_reason="stop",
                                 completion_tokens=1, worker="both-0", at=_ms(200))
    got = ledger.get_request(session, row.id)
    assert got.state == "finished" and got.tpot_ms is None
    assert got.ttft_ms == pytest.approx(200.0) and got.sla_met is True
    assert got.decode_worker == "both-0"


def test_finish_with_database_clock(session):
    row = _new(session, received_at=None)
    ledger.start_prefill(session, row.id, 1, "p")
    ledger.record_first_token(session, row.id, 1, "p")
    ledger.start_decode(session, row.id, 1, "d")
    assert ledger.finish_request(session, row.id, 1, output_text="ok", finish_reason="stop",
                                 completion_tokens=3)
    got = ledger.get_request(session, row.id)
    assert got.finished_at >= got.first_token_at >= got.received_at
    assert got.ttft_ms is not None and got.ttft_ms >= 0 and got.tpot_ms is not None


def test_duplicate_ticket_loses(session):
    row = _new(session)
    assert ledger.start_prefill(session, row.id, 1, "prefill-0")
    assert not ledger.start_prefill(session, row.id, 1, "prefill-1")
    assert ledger.get_request(session, row.id).prefill_worker == "prefill-0"
    assert ledger.start_decode(session, row.id, 1, "decode-0")
    assert not ledger.start_decode(session, row.id, 1, "decode-1")
    assert not ledger.record_first_token(session, row.id, 1, "prefill-0")


def test_retry_makes_old_tickets_stale(session):
    row = _new(session)
    ledger.start_prefill(session, row.id, 1, "prefill-0", at=_ms(10))
    ledger.record_first_token(session, row.id, 1, "prefill-0", at=_ms(100))
    ledger.start_decode(session, row.id, 1, "decode-0")
    assert ledger.retry(session, row.id, 1, "kv lease lost") == 2
    assert ledger.retry(session, row.id, 1) is None  # a second sweeper loses
    got = ledger.get_request(session, row.id)
    assert (got.state, got.attempt, got.error) == ("queued", 2, "kv lease lost")
    assert got.prefill_worker is None and got.decode_worker is None
    assert got.first_token_at == _ms(100)  # the client already saw it
    # the old attempt's tickets can neither start nor finish it
    assert not ledger.start_prefill(session, row.id, 1, "prefill-9")
    assert not ledger.finish_request(session, row.id, 1, output_text="x", finish_reason="stop",
                                     completion_tokens=2)
    assert ledger.start_prefill(session, row.id, 2, "prefill-1", at=_ms(300))
    ledger.record_first_token(session, row.id, 2, "prefill-1", at=_ms(400))
    ledger.start_decode(session, row.id, 2, "decode-1")
    ledger.finish_request(session, row.id, 2, output_text="y", finish_reason="stop",
                          completion_tokens=2, at=_ms(500))
    got = ledger.get_request(session, row.id)
    assert got.state == "finished" and got.ttft_ms == pytest.approx(100.0)


def test_terminal_states_stay_terminal(session):
    row = _new(session)
    assert ledger.cancel_request(session, row.id, reason="client went away")
    assert not ledger.cancel_request(session, row.id)
    assert not ledger.start_prefill(session, row.id, 1, "p")
    assert not ledger.fail_request(session, row.id, 1, "boom")
    assert ledger.retry(session, row.id, 1) is None
    got = ledger.get_request(session, row.id)
    assert (got.state, got.error) == ("cancelled", "client went away")
    assert got.finished_at is not None


def test_fail_and_reject(session):
    failed, rejected = _new(session), _new(session)
    ledger.start_prefill(session, failed.id, 1, "p")
    assert ledger.fail_request(session, failed.id, 1, "engine crashed")
    assert not ledger.reject_request(session, failed.id, 1, "late")
    assert ledger.reject_request(session, rejected.id, 1, "flex overloaded")
    assert ledger.get_request(session, failed.id).state == "failed"
    assert ledger.get_request(session, rejected.id).state == "rejected"


def test_claim_updates_rows_loaded_in_the_session(session):
    row = _new(session)
    assert row.state == "queued"
    ledger.start_prefill(session, row.id, 1, "p")
    assert row.state == "prefilling"  # not a stale cached value


def test_claim_validates_arguments(session):
    row = _new(session)
    with pytest.raises(ValueError):
        ledger.claim(session, row.id, 1, ("queued",), "lost")
    with pytest.raises(ValueError):
        ledger.claim(session, row.id, 1, (), "prefilling")
    with pytest.raises(ValueError):
        ledger.claim(session, row.id, 1, ("queued",), "prefilling", state="finished")
    with pytest.raises(ValueError):
        ledger.claim(session, row.id, 1, ("queued",), "prefilling", bogus=1)
    with pytest.raises(ValueError):
        ledger.start_prefill(session, row.id, 1, "p", at=datetime(2026, 1, 1))


def test_claim_without_commit_composes(session, database_url):
    row = _new(session)
    assert ledger.start_prefill(session, row.id, 1, "p", commit=False)
    with session_factory(database_url)() as other:
        assert ledger.get_request(other, row.id).state == "queued"
    session.rollback()
    assert ledger.get_request(session, row.id).state == "queued"


def test_state_check_constraint(session):
    row = _new(session)
    with pytest.raises(IntegrityError):
        session.execute(text("UPDATE requests SET state = 'lost' WHERE id = :id"), {"id": row.id})
    session.rollback()


def test_concurrent_claims_have_one_winner(database_url):
    factory = session_factory(database_url)
    with factory() as s:
        row = _new(s)
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        with factory() as s:
            barrier.wait()
            if ledger.start_prefill(s, row.id, 1, f"prefill-{i}"):
                wins.append(f"prefill-{i}")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    with factory() as s:
        assert ledger.get_request(s, row.id).prefill_worker == wins[0]


def test_find_and_count(session):
    a, b = _new(session), _new(session)
    ledger.start_prefill(session, a.id, 1, "p")
    ledger.cancel_request(session, b.id)
    active = {r.id for r in ledger.find_requests(session, ("prefilling",))}
    assert a.id in active and b.id not in active
    counts = ledger.count_by_state(session)
    assert set(counts) >= {"queued", "prefilling", "cancelled", "rejected"}
    assert counts["prefilling"] >= 1 and counts["cancelled"] >= 1


def test_record_decision(session):
    d = ledger.record_decision(session, "close_gate", "prefill:flex", "pressure 0.93",
                               {"pressure": 0.93}, at=T0)
    session.expire_all()
    assert d.id is not None and d.at == T0 and d.inputs == {"pressure": 0.93}
