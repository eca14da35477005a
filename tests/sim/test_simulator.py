"""The discrete-event simulator on small synthetic traces: bookkeeping, determinism, the
policies' effects, and that it calls the very policy function the live beat job calls."""

from __future__ import annotations

import random

import pytest

from slaq.platform import policy
from slaq.platform.snapshot import SetAdmission, takes_budget
from slaq.sim.report import format_table, plot, summarise, write_json
from slaq.sim.simulator import SimConfig, Simulator, run_simulation
from slaq.sim.traces import Trace, TraceRequest

TIER_CYCLE = ("priority", "default", "default", "flex", "batch")


def synthetic(n: int, rate: float, seed: int = 0, prompt: tuple[int, int] = (200, 3000),
              output: tuple[int, int] = (5, 200)) -> Trace:
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        reqs.append(TraceRequest(t, rng.randint(*prompt), rng.randint(*output),
                                 tier=TIER_CYCLE[i % len(TIER_CYCLE)]))
    return Trace("synthetic", tuple(reqs))


def check_clean(sim: Simulator) -> None:
    for w in sim.workers:
        w.scheduler.check_integrity()
        assert not w.scheduler.has_unfinished() and w.scheduler.num_leased == 0
        assert not w.pending and w.unstarted_tokens == 0


@pytest.mark.parametrize("policy_name,disagg", [("fifo", False), ("static", True),
                                                ("slaq", True), ("slaq", False)])
def test_every_request_is_served_once_and_the_engines_end_clean(policy_name, disagg):
    trace = synthetic(300, rate=40.0)
    sim = Simulator(SimConfig(trace=trace, policy=policy_name, num_gpus=4,
                              disaggregated=disagg))
    res = sim.run()
    check_clean(sim)
    served = [r for r in res.records if not r.refused]
    assert all(r.finish_s is not None and r.first_token_s is not None for r in served)
    for r in served:
        assert r.arrival_s <= r.first_token_s <= r.finish_s
        assert (r.tpot_s is None) == (r.num_output_tokens == 1)
    tokens = sum(w.runner.stats.num_decode_tokens for w in sim.workers)
    # Every output token after the first is one decode token (no preemption at this load).
    assert res.num_preemptions == 0
    assert tokens == sum(r.num_output_tokens - 1 for r in served)
    assert (res.num_prefill, res.num_decode, res.num_aggregated) == (
        (sim.cfg.num_prefill or res.num_prefill, 4 - res.num_prefill, 0) if disagg else (0, 0, 4))


def test_simulation_is_deterministic():
    trace = synthetic(200, rate=60.0, seed=3)
    a = run_simulation(SimConfig(trace=trace, policy="slaq", num_gpus=3))
    b = run_simulation(SimConfig(trace=trace, policy="slaq", num_gpus=3))
    assert [(r.first_token_s, r.finish_s, r.tier_used) for r in a.records] == [
        (r.first_token_s, r.finish_s, r.tier_used) for r in b.records]


def test_prefix_sharing_prompts_hit_the_real_prefix_cache():
    reqs = tuple(TraceRequest(0.01 * i, 2048, 4, hash_ids=(0, 1, 2, 3)) for i in range(20))
    res = run_simulation(SimConfig(trace=Trace("shared", reqs), policy="fifo", num_gpus=1))
    hits = [r.num_cached_tokens for r in res.records]
    assert hits[0] == 0 and all(h >= 2032 for h in hits[1:])  # all but the last block


def overloaded() -> Trace:
    # ~2.5x what two H100s prefill (~7.5 req/s of ~8k-token prompts); priority and default
    # alone are 1.5x.
    return synthetic(600, rate=19.0, seed=1, prompt=(6000, 10000), output=(20, 60))


def test_under_overload_tiers_and_policy_protect_the_priority_tier():
    trace = overloaded()
    results = {name: summarise(run_simulation(SimConfig(trace=trace, policy=p, num_gpus=2,
                                                        disaggregated=False)), name)
               for name, p in (("fifo", "fifo"), ("static", "static"), ("slaq", "slaq"))}
    prio = {k: v.tiers["priority"].ttft_attainment for k, v in results.items()}
    assert prio["fifo"] < 0.5
    assert prio["static"] > prio["fifo"] and prio["slaq"] > 0.9
    assert results["slaq"].goodput > results["fifo"].goodput
    # Only slaq acts on admission: defaults downgraded, flex refused when they cannot make it.
    assert results["fifo"].num_downgraded == results["static"].num_downgraded == 0
    assert results["slaq"].num_downgraded > 0 and results["slaq"].num_refused > 0
    assert results["slaq"].decisions.get("admission", 0) > 0
    served = results["slaq"].tiers["default"].ttft_attainment_served
    assert served is not None and served > results["static"].tiers["default"].ttft_attainment


def test_aged_tickets_supersede_stale_ones_without_duplicate_work():
    trace = overloaded()
    sim = Simulator(SimConfig(trace=trace, policy="slaq", num_gpus=2, disaggregated=False))
    res = sim.run()
    check_clean(sim)
    assert res.decisions.get("age", 0) > 0
    aged = [r for r in res.records if r.attempt > 0]
    assert aged and all(r.finish_s is not None for r in aged)
    # Work done = work asked: a stale ticket never started a second copy of its request.
    prefill = sum(w.runner.stats.num_prefill_tokens for w in sim.workers)
    asked = sum(r.num_prompt_tokens - r.num_cached_tokens for r in res.records if not r.refused)
    assert prefill == asked


def test_the_simulator_calls_the_policy_function_the_beat_job_calls(monkeypatch):
    from slaq.tasks import reprioritise

    assert reprioritise.decide is policy.decide
    calls = []
    real = policy.decide

    def spy(snapshot, state, tiers, config):
        calls.append(snapshot.now)
        return real(snapshot, state, tiers, config)

    monkeypatch.setattr(policy, "decide", spy)
    res = run_simulation(SimConfig(trace=synthetic(100, rate=20.0), policy="slaq", num_gpus=2))
    assert len(calls) == len(res.policy_cycle_s) >= 4
    assert calls == sorted(calls) and calls[1] - calls[0] == pytest.approx(1.0)


def test_report_tables_json_and_plot(tmp_path):
    trace = synthetic(150, rate=30.0)
    summaries = [summarise(run_simulation(SimConfig(trace=trace, policy=p, num_gpus=2)), p)
                 for p in ("fifo", "slaq")]
    for s in summaries:
        assert s.num_requests == 150 and s.num_lost == 0
        assert 0 <= s.goodput <= s.throughput
        for t in s.tiers.values():
            assert 0 <= t.slo_attainment <= t.ttft_attainment <= 1
            assert t.ttft_p50_ms <= t.ttft_p99_ms
    table = format_table(summaries)
    assert "| fifo | priority |" in table and "| slaq |" in table
    j = write_json(summaries, tmp_path / "r.json", {"trace": "synthetic"})
    assert '"goodput"' in j.read_text()
    png = plot(summaries, tmp_path / "r.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_validation():
    trace = synthetic(5, rate=1.0)
    with pytest.raises(ValueError):
        SimConfig(trace=trace, policy="random")
    with pytest.raises(ValueError):
        run_simulation(SimConfig(trace=trace, num_gpus=2, disaggregated=True, num_prefill=2))


def test_admission_in_the_simulator_applies_budget_and_prompt_cut_as_the_api_does(
        monkeypatch):
    reqs = tuple(TraceRequest(0.001 * i, n, 4, tier="default")
                 for i, n in enumerate((500, 100, 100, 100)))
    sim = Simulator(SimConfig(trace=Trace("cut", reqs), policy="slaq", num_gpus=1))
    # The cut travels as the action's typed field (not in its inputs) from decide to arrivals.
    action = SetAdmission("default", "downgrade", 5000.0, "short", 250, "flex", 3,
                          max_prompt_tokens=200)
    monkeypatch.setattr(policy, "decide", lambda snap, state, tiers, cfg: ([action], state))
    sim._on_tick()
    assert sim.admission["default"] == ["downgrade", 250, 200]
    for i in range(4):
        sim._on_arrival(i)
    # The 500-token prompt is over the cut and spends nothing; two 100s fit the budget.
    assert [r.tier_used for r in sim.records] == ["flex", "default", "default", "flex"]
    assert sim.admission["default"][1] == 50


def test_a_request_that_does_not_fit_the_budget_takes_nothing_from_it():
    # The rule of takes_budget, as the API's Lua script applies it (tests/platform/
    # test_decisions.py checks that side against Redis with the same numbers).
    reqs = tuple(TraceRequest(0.001 * i, n, 4, tier=t) for i, (n, t) in enumerate(
        ((100, "flex"), (200, "flex"), (150, "flex"), (50, "flex"), (10**6, "default"))))
    sim = Simulator(SimConfig(trace=Trace("fit", reqs), policy="slaq", num_gpus=1))
    sim.admission["flex"] = ["refuse", 250, None]
    sim.admission["default"] = ["downgrade", None, None]  # no live budget: admit as asked
    for i in range(5):
        sim._on_arrival(i)
    # 100 fits (150 left); 200 does not and is refused without spending; 150 then fits.
    assert [r.refused for r in sim.records] == [False, True, False, True, False]
    assert sim.admission["flex"][1] == 0  # never below zero
    assert sim.records[4].tier_used == "default"
    assert [takes_budget(150, n) for n in (150, 151)] == [True, False]
    assert takes_budget(None, 10**9, 1) and not takes_budget(10**6, 201, 200)


def test_priority_tickets_are_taken_shortest_prompt_first_as_ticket_priority_orders_them():
    # Arrival order: long, short, medium priority prompts, then a short default one.
    reqs = tuple(TraceRequest(0.001 * i, n, 4, tier=t) for i, (n, t) in enumerate(
        ((20_000, "priority"), (300, "priority"), (3_000, "priority"), (100, "default"))))
    sim = Simulator(SimConfig(trace=Trace("order", reqs), policy="slaq", num_gpus=1,
                              disaggregated=False))
    w = sim.workers[0]
    w.busy = True  # mid-step: the tickets wait in the queues
    for i in range(4):
        sim._on_arrival(i)
    w.busy = False
    taken = []  # popped as the worker would pull them (nothing added: its engine stays empty)
    while (i := sim._take_ticket(w)) is not None:
        taken.append(i)
    # The priority queue by length bucket (policy.ticket_priority), then the default queue.
    assert taken == [1, 2, 0, 3]

