"""Deterministic unit tests of every policy action: gates with hysteresis, release, aging,
routing, admission, orphans, the planner; and that decide() is pure."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import MappingProxyType

import pytest

from slaq.platform.policy import (
    AGED_PRIORITY,
    PolicyConfig,
    PolicyState,
    choose_weighted,
    decide,
    ticket_priority,
)
from slaq.platform.pressure import Heartbeat
from slaq.platform.snapshot import (
    Arrivals,
    InflightRequest,
    Plan,
    QueuedRequest,
    QueueStats,
    Reticket,
    SetAdmission,
    SetGate,
    SetRouting,
    Snapshot,
)
from slaq.platform.tiers import TierTable

NOW = 1000.0
TIERS = TierTable()
CAP = 10_000.0  # prompt tokens/s per prefill worker in these tests


def hb(name: str, role: str, used: int, total: int = 100, age: float = 0.1, **kw) -> Heartbeat:
    return Heartbeat(worker=name, role=role, num_blocks_total=total, num_blocks_used=used,
                     time=NOW - age, **kw)


def cluster(decode_used: int = 10) -> tuple[Heartbeat, ...]:
    return (hb("p0", "prefill", 5), hb("d0", "decode", decode_used),
            hb("d1", "decode", decode_used))


def snap(heartbeats=None, queues=None, queued=(), inflight=(), arrivals=None,
         now: float = NOW) -> Snapshot:
    return Snapshot(now=now, heartbeats=cluster() if heartbeats is None else heartbeats,
                    queues=queues or {}, queued=tuple(queued), inflight=tuple(inflight),
                    arrivals=arrivals or {})


def only(config: PolicyConfig | None = None, **enabled) -> PolicyConfig:
    """A config with every part off except those named, prefill capacity CAP."""
    flags = {f: False for f in ("enable_gates", "enable_release", "enable_aging",
                                "enable_routing", "enable_admission", "enable_orphans")}
    flags.update({f"enable_{k}": v for k, v in enabled.items()})
    return PolicyConfig(prefill_capacity_tok_s=CAP, decode_capacity_tok_s=5_000.0, **flags)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# ---- gates -------------------------------------------------------------------------------


def test_gate_closes_at_high_watermark_and_reopens_only_below_low():
    cfg = only(gates=True)  # flex (0.85, 0.70), batch (0.80, 0.65), default (0.95, 0.85)
    state = PolicyState()
    actions, state = decide(snap(cluster(decode_used=82)), state, TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == {("batch", False)}
    assert all(a.role == "prefill" for a in of(actions, SetGate))

    actions, state = decide(snap(cluster(decode_used=90)), state, TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == {("flex", False)}

    # Between the watermarks: nothing changes (hysteresis).
    actions, state = decide(snap(cluster(decode_used=75)), state, TIERS, cfg)
    assert of(actions, SetGate) == []
    assert not state.is_open("prefill", "flex") and not state.is_open("prefill", "batch")

    actions, state = decide(snap(cluster(decode_used=68)), state, TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == {("flex", True)}
    actions, state = decide(snap(cluster(decode_used=60)), state, TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == {("batch", True)}
    assert state.is_open("prefill", "flex") and state.is_open("prefill", "batch")


def test_default_gate_has_a_narrow_band_and_reopens_just_below_its_high_watermark():
    cfg = only(gates=True)  # default (0.98, 0.96)

    def both(used: int) -> tuple[Heartbeat, ...]:
        return (hb("b0", "both", used), hb("b1", "both", used))

    actions, state = decide(snap(both(97)), PolicyState(), TIERS, cfg)
    assert ("both", "default") not in {(a.role, a.tier) for a in of(actions, SetGate)}
    actions, state = decide(snap(both(98)), state, TIERS, cfg)
    assert ("default", False) in {(a.tier, a.open) for a in of(actions, SetGate)}
    actions, state = decide(snap(both(97)), state, TIERS, cfg)  # inside the band: held
    assert not state.is_open("both", "default")
    # Reopens at 0.96, not after a tenth of the KV has drained (the old 0.85 low mark).
    actions, state = decide(snap(both(96)), state, TIERS, cfg)
    assert ("default", True) in {(a.tier, a.open) for a in of(actions, SetGate)}
    assert state.is_open("both", "default")


def test_ticket_priority_orders_the_priority_queue_shortest_prompt_first():
    cfg = PolicyConfig()  # priority length-ordered, first bucket 1024 tokens
    got = [ticket_priority(TIERS, "priority", n, cfg)
           for n in (1, 1024, 1025, 2048, 2049, 5000, 100_000, 10**7)]
    assert got == [0, 0, 1, 1, 2, 3, 7, 8]
    # Never 9: that stays for requests aged up from default, behind the tier's own.
    assert max(got) < AGED_PRIORITY
    # Other tiers keep arrival order at their queue priority, whatever the prompt.
    for tier in ("default", "flex", "batch"):
        assert {ticket_priority(TIERS, tier, n, cfg) for n in (1, 10**6)} == {
            TIERS[tier].queue_priority}
    cfg2 = PolicyConfig(length_ordered_tiers=("priority", "default"), length_bucket_tokens=100)
    assert [ticket_priority(TIERS, "default", n, cfg2) for n in (100, 101, 401)] == [0, 1, 3]
    # fifo and static have no ticket order of their own: the tier's priority for all.
    for name in ("fifo", "static"):
        assert ticket_priority(TIERS, "priority", 10**6, PolicyConfig.preset(name)) == (
            TIERS["priority"].queue_priority)


def test_priority_is_never_gated_and_aggregated_gates_act_on_both_workers():
    cfg = only(gates=True)
    full = (hb("b0", "both", 100), hb("b1", "both", 99))
    actions, state = decide(snap(full), PolicyState(), TIERS, cfg)
    gated = {(a.role, a.tier) for a in of(actions, SetGate)}
    assert gated == {("both", "default"), ("both", "flex"), ("both", "batch")}
    assert state.is_open("both", "priority")


def test_stale_heartbeats_are_ignored_no_decode_worker_means_full():
    cfg = only(gates=True)
    stale = (hb("p0", "prefill", 0), hb("d0", "decode", 0, age=60.0))
    actions, _ = decide(snap(stale), PolicyState(), TIERS, cfg)
    assert {a.tier for a in of(actions, SetGate) if not a.open} == {"default", "flex", "batch"}


# ---- release into spare capacity ------------------------------------------------------------


def test_flex_and_batch_are_released_only_into_spare_capacity_with_hysteresis():
    cfg = only(release=True)
    # Default queue worth 0.5 x its 3 s target of queueing (1 prefill worker at CAP).
    busy = {"default": QueueStats(10, int(1.5 * CAP))}
    actions, state = decide(snap(queues=busy), PolicyState(), TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == set()  # 0.5 < close 0.6
    busier = {"default": QueueStats(10, int(2.0 * CAP))}  # 0.67 > 0.6
    actions, state = decide(snap(queues=busier), state, TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == {("flex", False),
                                                                  ("batch", False)}
    # 0.5 is above the open threshold 0.3: still held.
    actions, state = decide(snap(queues=busy), state, TIERS, cfg)
    assert of(actions, SetGate) == []
    actions, state = decide(snap(queues={}), state, TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == {("flex", True),
                                                                  ("batch", True)}


def test_release_ignores_the_prefill_time_of_long_prompts():
    cfg = only(release=True)
    state = PolicyState(time=NOW - 1, release_closed=frozenset({"flex", "batch"}))
    # Priority prompts of 5k tokens take half their 1 s target to prefill alone (above the
    # 0.3 open threshold), but nothing is queued: capacity is spare.
    arrivals = {"priority": Arrivals(1, 5_000, 100)}
    actions, state = decide(snap(arrivals=arrivals), state, TIERS, cfg)
    assert {(a.tier, a.open) for a in of(actions, SetGate)} == {("flex", True),
                                                                  ("batch", True)}


# ---- deadline aging ------------------------------------------------------------------------


def queued(rid: str, tier: str, age_s: float, queue_tier: str | None = None, tokens: int = 100):
    return QueuedRequest(rid, 3, tier, NOW - age_s, tokens, queue_tier or tier,
                         TIERS[queue_tier or tier].queue_priority, NOW - age_s)


def test_aging_reticks_at_risk_requests_one_tier_up_at_the_back_of_that_queue():
    cfg = only(aging=True)
    reqs = [
        queued("flex-risk", "flex", 20.0),  # slack 10 s < 15 s
        queued("flex-fresh", "flex", 5.0),  # slack 25 s
        queued("flex-late", "flex", 31.0),  # hopeless: left alone
        queued("default-risk", "default", 2.0),  # slack 1 s < 1.5 s
        queued("prio-risk", "priority", 0.9),  # nothing above priority
        queued("flex-aged", "flex", 25.0, queue_tier="default"),  # already one tier up
    ]
    actions, _ = decide(snap(queued=reqs), PolicyState(), TIERS, cfg)
    got = {a.request_id: a for a in of(actions, Reticket)}
    assert set(got) == {"flex-risk", "default-risk"}
    assert got["flex-risk"].queue_tier == "default"
    assert got["default-risk"].queue_tier == "priority"
    for a in got.values():
        assert a.attempt == 4 and a.priority == AGED_PRIORITY and a.kind == "age"


def test_aging_is_capped_per_cycle_least_slack_first():
    cfg = PolicyConfig(**{**vars_of(only(aging=True)), "max_retickets": 2})
    reqs = [queued(f"r{i}", "flex", 15.5 + i) for i in range(6)]  # slack 14.5 .. 9.5
    actions, _ = decide(snap(queued=reqs), PolicyState(), TIERS, cfg)
    assert sorted(a.request_id for a in of(actions, Reticket)) == ["r4", "r5"]


def vars_of(cfg: PolicyConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


# ---- routing -------------------------------------------------------------------------------


def test_routing_weights_favour_headroom_and_skip_dead_workers():
    cfg = only(routing=True)
    hbs = (hb("p0", "prefill", 0), hb("d0", "decode", 20), hb("d1", "decode", 60),
           hb("d2", "decode", 0, age=30.0))
    actions, _ = decide(snap(hbs), PolicyState(), TIERS, cfg)
    (routing,) = of(actions, SetRouting)
    w = routing.weights
    assert set(w) == {"d0", "d1"}
    assert math.isclose(sum(w.values()), 1.0)
    assert math.isclose(w["d0"] / w["d1"], (0.8 / 0.4) ** 2)


def test_routing_spreads_evenly_when_every_decode_pool_is_full():
    cfg = only(routing=True)
    hbs = (hb("d0", "decode", 100), hb("d1", "decode", 100))
    actions, _ = decide(snap(hbs), PolicyState(), TIERS, cfg)
    (routing,) = of(actions, SetRouting)
    assert dict(routing.weights) == {"d0": 0.5, "d1": 0.5}


def test_choose_weighted_is_proportional_and_deterministic():
    weights = {"a": 0.25, "b": 0.75, "c": 0.0}
    assert choose_weighted(weights, 0.0) == "a"
    assert choose_weighted(weights, 0.24) == "a"
    assert choose_weighted(weights, 0.26) == "b"
    assert choose_weighted(weights, 0.999) == "b"
    assert choose_weighted({}, 0.5) is None


# ---- admission -----------------------------------------------------------------------------


def test_admission_budgets_keep_queued_work_within_each_target():
    cfg = only(admission=True)
    state = PolicyState(time=NOW - 1.0)
    queues = {"priority": QueueStats(1, 2_000), "default": QueueStats(5, 8_000),
              "flex": QueueStats(50, 400_000)}
    # Priority inflow 1,000 prompt tokens/s leaves 9,000 tok/s to default and flex.
    arrivals = {"priority": Arrivals(1, 1_000, 10)}
    actions, state = decide(snap(queues=queues, arrivals=arrivals), state, TIERS, cfg)
    adm = {a.tier: a for a in of(actions, SetAdmission)}
    assert set(adm) == {"default", "flex"}  # priority and batch are never held back
    assert state.rates["priority"] == (1.0, 1_000.0, 10.0)  # first measurement taken as is
    assert adm["default"].mode == "downgrade" and adm["default"].downgrade_to == "flex"
    # (margin 0.9 x 3 s - own prefill 0 s) x (10k - 1k tok/s) - 10k tokens ahead.
    assert adm["default"].budget_tokens == 14_300
    # Flex: 410k tokens ahead cannot drain in 30 s at ~9.x k tok/s: no budget, refuse.
    assert adm["flex"].mode == "refuse" and adm["flex"].budget_tokens == 0
    assert 1 <= adm["flex"].retry_after_s <= 120
    assert adm["flex"].predicted_ttft_ms > 30_000


def test_a_short_budget_cuts_the_longest_prompts_to_serve_more_requests():
    cfg = only(admission=True)
    # Default took 20 requests/s (60k tok/s): far more than 10k tok/s of capacity drains.
    arrivals = {"default": Arrivals(20, 60_000, 200)}
    queues = {"default": QueueStats(5, 10_000)}
    actions, _ = decide(snap(queues=queues, arrivals=arrivals), PolicyState(time=NOW - 1.0),
                        TIERS, cfg)
    (adm,) = [a for a in of(actions, SetAdmission) if a.tier == "default"]
    # Budget (0.9 x 3 s - own 3,000/10,000 s) x 10k tok/s - 10k ahead = 14,000 tokens for the
    # next second; 20 requests a second: a fair share is 700 tokens, the cut 2 x 700.
    assert adm.budget_tokens == 14_000
    assert adm.max_prompt_tokens == 1_400
    # A roomy budget: the cut is far above the prompts that arrive, and with few arrivals
    # (under one a cycle) there is no cut at all.
    calm = {"default": Arrivals(2, 2_000, 20)}
    actions, _ = decide(snap(arrivals=calm), PolicyState(time=NOW - 1.0), TIERS, cfg)
    (adm,) = [a for a in of(actions, SetAdmission) if a.tier == "default"]
    assert adm.max_prompt_tokens >= 10 * 1_000
    actions, _ = decide(snap(arrivals={"default": Arrivals(0, 0, 0)}),
                        PolicyState(time=NOW - 1.0), TIERS, cfg)
    (adm,) = [a for a in of(actions, SetAdmission) if a.tier == "default"]
    assert adm.max_prompt_tokens is None
    off = replace(cfg, admission_share_factor=0.0)
    actions, _ = decide(snap(queues=queues, arrivals=arrivals), PolicyState(time=NOW - 1.0),
                        TIERS, off)
    (adm,) = [a for a in of(actions, SetAdmission) if a.tier == "default"]
    assert adm.max_prompt_tokens is None


def test_admission_without_capacity_gives_no_budget():
    cfg = only(admission=True)
    no_prefill = (hb("d0", "decode", 0),)
    actions, _ = decide(snap(no_prefill), PolicyState(), TIERS, cfg)
    adm = {a.tier: a for a in of(actions, SetAdmission)}
    assert adm["default"].budget_tokens == 0
    assert math.isinf(adm["default"].predicted_ttft_ms)


def test_admission_mode_is_validated():
    with pytest.raises(ValueError):
        SetAdmission("flex", "maybe", 1.0, "x")


# ---- orphans -------------------------------------------------------------------------------


def test_work_of_a_dead_worker_is_reticketed_with_the_next_attempt():
    cfg = only(orphans=True)
    inflight = [
        InflightRequest("dead", 1, "default", "decoding", "d9", NOW - 10),
        InflightRequest("alive", 1, "default", "decoding", "d0", NOW - 10),
        InflightRequest("just-claimed", 1, "default", "prefilling", "p9", NOW - 0.5),
    ]
    actions, _ = decide(snap(inflight=inflight), PolicyState(), TIERS, cfg)
    (a,) = of(actions, Reticket)
    assert (a.request_id, a.attempt, a.queue_tier, a.kind) == ("dead", 2, "default", "orphan")
    assert a.priority == TIERS["default"].queue_priority


def test_queued_requests_whose_ticket_the_broker_lost_are_reticketed_oldest_first():
    cfg = only(orphans=True)  # orphan_timeout_s 30
    queues = {"default": QueueStats(num_queued=3, num_prompt_tokens=300, broker_depth=1)}
    reqs = [queued("old", "default", 100.0), queued("older", "default", 200.0),
            queued("young", "default", 5.0)]
    actions, _ = decide(snap(queues=queues, queued=reqs), PolicyState(), TIERS, cfg)
    assert [a.request_id for a in of(actions, Reticket)] == ["older", "old"]
    # Broker depth unknown: nothing is presumed lost.
    queues = {"default": QueueStats(num_queued=3, num_prompt_tokens=300)}
    actions, _ = decide(snap(queues=queues, queued=reqs), PolicyState(), TIERS, cfg)
    assert of(actions, Reticket) == []


# ---- planner and rates -------------------------------------------------------------------------


def test_planner_sizes_the_cluster_from_arrival_rates():
    cfg = only()  # prefill 10k tok/s, decode 5k tok/s per worker, 80% utilisation
    state = PolicyState(time=NOW - 1.0)
    arrivals = {"default": Arrivals(10, 40_000, 8_000)}
    for i in range(200):  # converge the EWMA to the constant rate
        actions, state = decide(snap(arrivals=arrivals, now=NOW + i), state, TIERS, cfg)
    assert state.plan == (5, 2, 7)  # 40k/8k, 8k/4k, (4 + 1.6) / 0.8
    plans = [a for a in actions if isinstance(a, Plan)]
    assert plans == []  # unchanged plans are not repeated


def test_decide_is_pure_and_deterministic():
    cfg = PolicyConfig(prefill_capacity_tok_s=CAP)
    s = snap(cluster(decode_used=90), queues={"default": QueueStats(5, 50_000)},
             queued=[queued("a", "flex", 20.0)],
             inflight=[InflightRequest("x", 1, "default", "decoding", "gone", NOW - 10)],
             arrivals={"default": Arrivals(5, 5_000, 500)})
    state = PolicyState(time=NOW - 1.0, admission=MappingProxyType({}))
    before = copy.deepcopy((s.queues, s.queued, s.inflight, s.arrivals))
    first = decide(s, state, TIERS, cfg)
    second = decide(s, state, TIERS, cfg)
    assert first == second
    assert before == (s.queues, s.queued, s.inflight, s.arrivals)
    assert state == PolicyState(time=NOW - 1.0)
    kinds = {a.kind for a in first[0]}
    assert {"gate", "age", "orphan", "routing", "admission", "plan"} <= kinds


def test_fifo_and_static_presets_only_recover_orphans_and_plan():
    for name in ("fifo", "static"):
        cfg = PolicyConfig.preset(name, prefill_capacity_tok_s=CAP)
        s = snap(cluster(decode_used=99), queues={"default": QueueStats(5, 500_000)},
                 queued=[queued("a", "flex", 20.0)])
        actions, _ = decide(s, PolicyState(), TIERS, cfg)
        assert {a.kind for a in actions} <= {"plan", "orphan"}
    with pytest.raises(ValueError):
        PolicyConfig.preset("lottery")


def test_config_validation():
    with pytest.raises(ValueError):
        PolicyConfig(watermarks={"flex": (0.5, 0.7)})
    with pytest.raises(ValueError):
        PolicyConfig(release_open=0.7, release_close=0.5)
    with pytest.raises(ValueError):
        PolicyConfig(aging_fraction=1.5)
    with pytest.raises(ValueError):
        PolicyConfig(admission_share_factor=-1.0)
    with pytest.raises(ValueError):
        PolicyConfig(length_ordered_tiers=("gold",))
    with pytest.raises(ValueError):
        PolicyConfig(length_bucket_tokens=0)
