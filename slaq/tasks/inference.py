"""The two tasks. Thin: they hand the ticket to the worker's service, which owns the flow.

``slaq.prefill(request_id, attempt)`` and ``slaq.decode(request_id, attempt)``; both are
idempotent (the ledger claim drops stale and duplicate tickets), so late acks and
redelivery are safe. Importing this module does not import torch; the service does, and only
a worker process has one.
"""

from __future__ import annotations

import logging

from celery import shared_task

from slaq.tasks.config import DECODE_TASK, PREFILL_TASK

log = logging.getLogger(__name__)


@shared_task(name=PREFILL_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def prefill(request_id: str, attempt: int) -> str:
    """Claim, prefill, publish the first token, then lease and route (or decode, role both)."""
    from slaq.gpu_workers.service import current

    outcome = str(current().prefill(str(request_id), int(attempt)))
    log.info("prefill %s#%s: %s", request_id, attempt, outcome)
    return outcome


@shared_task(name=DECODE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def decode(request_id: str, attempt: int) -> str:
    """Claim, pull the leased KV (or re-prefill), stream the tokens, finish."""
    from slaq.gpu_workers.service import current

    outcome = str(current().decode(str(request_id), int(attempt)))
    log.info("decode %s#%s: %s", request_id, attempt, outcome)
    return outcome
