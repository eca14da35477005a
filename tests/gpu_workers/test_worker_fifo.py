"""The fifo policy on the worker side: work items carry no tier order, so the engine serves
tiers in arrival order; under the other policies a priority request overtakes batch work.

The ledger is the real PostgreSQL one; the engine is the sim engine a sim worker builds (its
runner at a high speed, so steps take microseconds)."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.cost_model import get_profile
from slaq.gpu_workers.engine.llm_engine import LLMEngine
from slaq.gpu_workers.engine.testing import engine_config
from slaq.gpu_workers.service import FIFO_RANK, SqlLedger
from slaq.gpu_workers.worker import SimTransport, _sim_runner
from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.tiers import TierTable
from slaq.tasks.config import DEFAULT_PRIORITY

TIERS = TierTable()
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _add(database_url: str, tier: str, prompt: list[int]) -> str:
    t = TIERS[tier]
    with session_factory(database_url)() as s:
        return ledger.create_request(
            s, kind="completion", model="tiny-random", tier_used=tier, ttft_target_ms=t.ttft_ms,
            tpot_target_ms=t.tpot_ms, prompt_token_ids=prompt, params=PARAMS.to_dict()).id


def _finish_order(tiny_model_path, items) -> list[str]:
    """Run the batch item alone for a step, then add the priority one; the order in which
    they finish. One seat: whoever holds it runs to the end unless preempted."""
    engine = LLMEngine(engine_config(tiny_model_path, max_num_seqs=1),
                       runner=_sim_runner(get_profile("llama-8b-h100"), 1000.0))
    batch, prio = items
    engine.add_request(batch.tier, batch.prompt_token_ids, batch.params, rank=batch.rank)
    engine.step()
    engine.add_request(prio.tier, prio.prompt_token_ids, prio.params, rank=prio.rank)
    order: list[str] = []
    for _ in range(200):
        order += [o.request_id for o in engine.step() if o.finished]
        if not engine.has_unfinished():
            break
    return order


@pytest.mark.parametrize("fifo", [True, False])
def test_fifo_work_items_have_one_rank_and_the_engine_serves_arrival_order(
        module_database_url, tiny_model_path, fifo):
    rids = [_add(module_database_url, "batch", list(range(20, 52))),
            _add(module_database_url, "priority", list(range(60, 80)))]
    items = [SqlLedger(module_database_url, TIERS, fifo=fifo).load(r) for r in rids]
    assert [i.tier for i in items] == ["batch", "priority"]  # the tier itself is kept
    if fifo:
        assert [(i.rank, i.queue_priority) for i in items] == [(FIFO_RANK, DEFAULT_PRIORITY)] * 2
        assert _finish_order(tiny_model_path, items) == ["batch", "priority"]
    else:
        assert [i.rank for i in items] == [TIERS["batch"].rank, TIERS["priority"].rank]
        assert [i.queue_priority for i in items] == [TIERS["batch"].queue_priority,
                                                      TIERS["priority"].queue_priority]
        # The priority request takes the seat from the batch one (preempted, recomputed).
        assert _finish_order(tiny_model_path, items) == ["priority", "batch"]


def test_sim_transport_hands_over_empty_blocks_of_the_leased_count():
    from slaq.gpu_workers.kv_transfer.lease import Lease

    lease = Lease(request_id="r", attempt=1, prefill_worker="p", transport="sim",
                  block_ids=[4, 9, 2], num_tokens=40, first_token_id=7, expires_at=0.0,
                  descriptor={})
    kv = SimTransport(get_profile("llama-8b-h100"), speed=1000.0).pull(lease)
    assert kv.shape[2] == 3 and kv.nbytes == 0
