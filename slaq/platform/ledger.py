"""Ledger operations: every state change of a request is a *claim*.

State machine (one row per request; ``attempt`` starts at 1)::

    queued ──start_prefill──▶ prefilling ──start_decode──▶ decoding ──finish_request──▶ finished
      │                         │  record_first_token        │
      │                         └────────finish_request──────┼──▶ finished  (done in prefill)
      ├──reject_request──▶ rejected                          │
      └── any of queued / prefilling / decoding ─────────────┴──▶ failed | cancelled
    queued / prefilling / decoding ──retry──▶ queued with attempt + 1

A claim is ONE ``UPDATE requests SET … WHERE id = :id AND attempt = :attempt AND state IN (…)``;
exactly one row updated means the caller won. A duplicate ticket (state already moved on) or a
stale one (the attempt was bumped by :func:`retry`) updates nothing, and the caller drops it.

Each operation commits by default (``commit=False`` to compose several in one transaction).
Times are tz-aware UTC: pass ``at`` explicitly, or leave it ``None`` for the database's
``now()`` (the transaction's start time).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, DateTime, func, literal, select, update
from sqlalchemy.orm import Session

from slaq.platform.models import (
    ACTIVE_STATES,
    CANCELLED,
    DECODING,
    FAILED,
    FINISHED,
    PREFILLING,
    QUEUED,
    REJECTED,
    REQUEST_KINDS,
    REQUEST_STATES,
    RequestRow,
    SchedulingDecision,
)

_COLUMNS = frozenset(c.key for c in RequestRow.__mapper__.column_attrs)
# Set by claims themselves; callers may not override them through **set_fields.
_GUARDED = frozenset({"id", "state", "attempt"})


def _when(at: datetime | None) -> ColumnElement[datetime]:
    if at is None:
        return func.now()
    if at.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return literal(at, DateTime(timezone=True))


def _done(session: Session, commit: bool) -> None:
    if commit:
        session.commit()
    else:
        session.flush()


def new_request_id() -> str:
    """A fresh ledger id (32 hex digits; the API's response id ends with it)."""
    return uuid.uuid4().hex


def create_request(session: Session, *, commit: bool = True, **fields: Any) -> RequestRow:
    """Insert a request in state ``queued``, attempt 1, and return the row.

    Required: ``kind``, ``model``, ``tier_used``, ``ttft_target_ms``, ``tpot_target_ms``,
    ``prompt_token_ids``. ``id`` defaults to :func:`new_request_id`, ``tier_asked`` to
    ``tier_used``, ``prompt_tokens`` to ``len(prompt_token_ids)``.
    """
    unknown = set(fields) - _COLUMNS
    if unknown:
        raise ValueError(f"unknown request fields {sorted(unknown)}")
    if fields.get("kind") not in REQUEST_KINDS:
        raise ValueError(f"kind must be one of {REQUEST_KINDS}, got {fields.get('kind')!r}")
    for name in ("model", "tier_used", "ttft_target_ms", "tpot_target_ms", "prompt_token_ids"):
        if fields.get(name) is None:
            raise ValueError(f"create_request needs {name}")
    for name in ("received_at", "enqueued_at", "deadline_at"):
        value = fields.get(name)
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (UTC)")
    # None means "not given": server defaults (received_at = now()) then apply.
    fields = {k: v for k, v in fields.items() if v is not None}
    fields.setdefault("id", new_request_id())
    fields.setdefault("tier_asked", fields["tier_used"])
    fields.setdefault("params", {})
    fields["prompt_token_ids"] = [int(t) for t in fields["prompt_token_ids"]]
    fields.setdefault("prompt_tokens", len(fields["prompt_token_ids"]))
    fields["state"] = QUEUED
    fields["attempt"] = 1
    row = RequestRow(**fields)
    session.add(row)
    _done(session, commit)
    return row


def claim(session: Session, request_id: str, attempt: int | None, from_states: Iterable[str],
          to_state: str, *, commit: bool = True, **set_fields: Any) -> bool:
    """Move ``request_id`` from one of ``from_states`` to ``to_state`` if ``attempt`` matches.

    ``attempt=None`` matches any attempt (for callers that do not hold a ticket, e.g. a client
    cancelling). ``set_fields`` are columns to set in the same UPDATE (values or SQL
    expressions). Returns True when this call won the claim.
    """
    from_states = tuple(from_states)
    bad = [s for s in (*from_states, to_state) if s not in REQUEST_STATES]
    if bad or not from_states:
        raise ValueError(f"invalid states {bad or 'none'}; known: {REQUEST_STATES}")
    unknown = set(set_fields) - (_COLUMNS - _GUARDED)
    if unknown:
        raise ValueError(f"cannot set {sorted(unknown)} in a claim")
    conditions = [RequestRow.id == request_id, RequestRow.state.in_(from_states)]
    if attempt is not None:
        conditions.append(RequestRow.attempt == attempt)
    stmt = (update(RequestRow).where(*conditions).values(state=to_state, **set_fields)
            .execution_options(synchronize_session=False))
    won = session.execute(stmt).rowcount == 1
    _done(session, commit)
    if won:
        _expire(session, request_id)
    return won


def _expire(session: Session, request_id: str) -> None:
    # A row already loaded in this session must not keep showing the pre-claim values.
    row = session.identity_map.get(session.identity_key(RequestRow, request_id))
    if row is not None:
        session.expire(row)


def mark_enqueued(session: Session, request_id: str, attempt: int, at: datetime | None = None,
                  *, commit: bool = True) -> bool:
    """Record when the ticket for ``(request_id, attempt)`` was sent (state stays queued)."""
    return claim(session, request_id, attempt, (QUEUED,), QUEUED, commit=commit,
                 enqueued_at=_when(at))


def start_prefill(session: Session, request_id: str, attempt: int, worker: str,
                  at: datetime | None = None, *, commit: bool = True) -> bool:
    """queued → prefilling, owned by ``worker``."""
    return claim(session, request_id, attempt, (QUEUED,), PREFILLING, commit=commit,
                 prefill_worker=worker, prefill_started_at=_when(at))


def record_first_token(session: Session, request_id: str, attempt: int, worker: str,
                       at: datetime | None = None, *, commit: bool = True) -> bool:
    """Stamp the first token's time (state stays prefilling).

    The earliest stamp wins: after a re-prefill the client has already seen a first token.
    """
    return claim(session, request_id, attempt, (PREFILLING,), PREFILLING, commit=commit,
                 prefill_worker=worker,
                 first_token_at=func.coalesce(RequestRow.first_token_at, _when(at)))


def start_decode(session: Session, request_id: str, attempt: int, worker: str,
                 at: datetime | None = None, *, commit: bool = True) -> bool:
    """prefilling → decoding, owned by ``worker`` (also the prefill worker in aggregated mode)."""
    return claim(session, request_id, attempt, (PREFILLING,), DECODING, commit=commit,
                 decode_worker=worker, decode_started_at=_when(at))


def _ms_between(later: Any, earlier: Any) -> ColumnElement[float]:
    return func.extract("epoch", later - earlier) * 1000.0


def finish_request(session: Session, request_id: str, attempt: int, *, output_text: str,
                   finish_reason: str, completion_tokens: int, cached_tokens: int = 0,
                   worker: str | None = None, at: datetime | None = None,
                   commit: bool = True) -> bool:
    """prefilling | decoding → finished, with the result and the SLA verdict.

    Computed in the same UPDATE: ``ttft_ms = first_token_at − received_at``; ``tpot_ms =
    (finished_at − first_token_at) / (completion_tokens − 1)`` (NULL for a single token);
    ``sla_met`` = TTFT within ``ttft_target_ms`` and TPOT (when defined) within
    ``tpot_target_ms``. A missing first-token stamp counts as the finish time.
    """
    if completion_tokens < 0 or cached_tokens < 0:
        raise ValueError("token counts must be >= 0")
    done = _when(at)
    first = func.coalesce(RequestRow.first_token_at, done)
    ttft = _ms_between(first, RequestRow.received_at)
    if completion_tokens > 1:
        tpot: Any = _ms_between(done, first) / (completion_tokens - 1)
        sla: Any = (ttft <= RequestRow.ttft_target_ms) & (tpot <= RequestRow.tpot_target_ms)
    else:
        tpot = None
        sla = ttft <= RequestRow.ttft_target_ms
    fields: dict[str, Any] = dict(
        # PostgreSQL text cannot hold NUL; a model may still emit one (the stream keeps it).
        output_text=output_text.replace("\x00", "\ufffd"), finish_reason=finish_reason,
        completion_tokens=completion_tokens, cached_tokens=cached_tokens, finished_at=done,
        first_token_at=first, ttft_ms=ttft, tpot_ms=tpot, sla_met=sla)
    if worker is not None:
        # A request finished in prefill (one token, or EOS first) has no decode stamp yet.
        fields["decode_worker"] = func.coalesce(RequestRow.decode_worker, worker)
    return claim(session, request_id, attempt, (PREFILLING, DECODING), FINISHED, commit=commit,
                 **fields)


def fail_request(session: Session, request_id: str, attempt: int | None, error: str,
                 at: datetime | None = None, *, commit: bool = True) -> bool:
    """queued | prefilling | decoding → failed, keeping ``error``."""
    return claim(session, request_id, attempt, ACTIVE_STATES, FAILED, commit=commit,
                 error=error, finished_at=_when(at))


def cancel_request(session: Session, request_id: str, attempt: int | None = None,
                   reason: str | None = None, at: datetime | None = None, *,
                   commit: bool = True) -> bool:
    """queued | prefilling | decoding → cancelled (any attempt unless one is given)."""
    return claim(session, request_id, attempt, ACTIVE_STATES, CANCELLED, commit=commit,
                 error=reason, finished_at=_when(at))


def reject_request(session: Session, request_id: str, attempt: int, reason: str,
                   at: datetime | None = None, *, commit: bool = True) -> bool:
    """queued → rejected: admission or the reprioritiser refused it before any work began."""
    return claim(session, request_id, attempt, (QUEUED,), REJECTED, commit=commit,
                 error=reason, finished_at=_when(at))


def retry(session: Session, request_id: str, attempt: int, reason: str | None = None,
          at: datetime | None = None, *, commit: bool = True) -> int | None:
    """Back to queued with ``attempt + 1`` (orphan recovery, re-prefill); returns the new attempt.

    Tickets for the old attempt become stale. Returns None when ``(request_id, attempt)`` was
    not active (someone else retried or finished it first); the caller then sends nothing.
    ``first_token_at`` is kept: the client saw that token.
    """
    values: dict[str, Any] = dict(
        state=QUEUED, attempt=RequestRow.attempt + 1, enqueued_at=_when(at), prefill_worker=None,
        decode_worker=None, prefill_started_at=None, decode_started_at=None)
    if reason is not None:
        values["error"] = reason  # why the last attempt was abandoned
    stmt = (update(RequestRow)
            .where(RequestRow.id == request_id, RequestRow.attempt == attempt,
                   RequestRow.state.in_(ACTIVE_STATES))
            .values(**values)
            .returning(RequestRow.attempt)
            .execution_options(synchronize_session=False))
    new_attempt = session.execute(stmt).scalar_one_or_none()
    _done(session, commit)
    if new_attempt is not None:
        _expire(session, request_id)
    return new_attempt


def get_request(session: Session, request_id: str) -> RequestRow | None:
    """The row as stored now (re-read even if this session already holds it)."""
    return session.execute(
        select(RequestRow).where(RequestRow.id == request_id)
        .execution_options(populate_existing=True)).scalar_one_or_none()


def find_requests(session: Session, states: Sequence[str] = ACTIVE_STATES,
                  limit: int = 1000) -> list[RequestRow]:
    """Requests in ``states``, oldest first (sweeper, reprioritiser, status)."""
    return list(session.scalars(
        select(RequestRow).where(RequestRow.state.in_(tuple(states)))
        .order_by(RequestRow.received_at).limit(limit)))


def count_by_state(session: Session) -> dict[str, int]:
    """``{state: count}`` for every state (zeros included)."""
    counts = dict.fromkeys(REQUEST_STATES, 0)
    rows = session.execute(select(RequestRow.state, func.count()).group_by(RequestRow.state))
    counts.update({state: n for state, n in rows})
    return counts


def record_decision(session: Session, kind: str, target: str | None, reason: str | None,
                    inputs: dict[str, Any] | None = None, at: datetime | None = None, *,
                    commit: bool = True) -> SchedulingDecision:
    """Append one reprioritiser decision to ``scheduling_decisions``."""
    row = SchedulingDecision(kind=kind, target=target, reason=reason, inputs=inputs or {})
    if at is not None:
        if at.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware (UTC)")
        row.at = at
    session.add(row)
    _done(session, commit)
    return row
